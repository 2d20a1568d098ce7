"""``dho``: Dual-Head Optimization (Kang et al., 2025: "Simple yet Effective Semi-supervised
Knowledge Distillation from Vision-Language Models via Dual-Head Optimization", arXiv 2505.07675).

The student is a backbone with two linear heads on its pooled feature: a CE head trained with
cross-entropy on the labelled shots, and a KD head trained to match the teacher's softened
predictions on the labelled and the unlabelled images. The two objectives no longer pull one
head two ways (the paper's gradient conflict); the backbone learns from both. At inference the
heads' predictions are mixed (the authors' ``evaluate`` in ``train_others.py``)::

    p(x) = alpha * softmax(ce_head(f(x))) + (1 - alpha) * softmax(kd_head(f(x)) / beta)

with alpha and beta searched on the val split after every epoch (beta outer, alpha inner, the
first best kept), as the best epoch is. Training follows the authors' few-shot recipe
(``train_others.py``, github.com/erjui/DHO at 846de75): each step takes a batch of the labelled
shots (an epoch is one pass over them, the last batch partial) and a batch of the unlabelled
rows (the rest of the train split), through the backbone separately (batch-norm statistics per
part, as theirs); loss = 0.5 CE(ce head, labelled) + 0.5 (KL_T(kd head, labelled) +
KL_T(kd head, unlabelled)), T = 2, KL averaged over the batch and times T^2; AdamW lr 1e-3
(weight decay 0.01, torch's default, on every parameter), linear warm-up over the first 10% of
the steps then linear decay to 0; 200 epochs; random resized crops of area 0.5-1 and flips.

Everything else is :mod:`fskd.methods.distill.mtkd`'s (the fit's data pipeline, teacher, resume,
DDP, state and student encoder): the teacher is the store's encoder plus its cosine few-shot
head, or any fitted all-way state (``--teacher-state``); only the ``semi`` regime exists (the
heads classify the training classes). The state's all-way head (``fskd eval --state DIR`` on a
store extracted with ``student:DIR``) is the mixed prediction above, as log-probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fskd.classifiers.base import FittedHead, Head
from fskd.config import Config, DistillConfig
from fskd.errors import ConfigError
from fskd.methods.base import METHODS, MethodState
from fskd.methods.distill.losses import TeacherBatch, kl_rows
from fskd.methods.distill.mtkd import MTKD, _features, _Plan, _plan_semi
from fskd.runtime import autocast

#: the authors' grids (train_others.py ``evaluate``): alpha in np.arange(0, 1.05, 0.05), beta listed
ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))
BETA_GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)
#: what the inference rule uses when no validation data chooses it (the authors' starting values)
NO_VAL_CHOICE = {"alpha": 0.0, "beta": 1.0}


@dataclass(frozen=True)
class DHOOptions(Config):
    """``--set key=value`` options of dho. Defaults are the authors' (train_others.py and
    scripts_others.sh of github.com/erjui/DHO at 846de75) unless the comment says fskd."""

    image_size: int = 224  # student input side (authors: RandomResizedCrop(224) / CenterCrop(224); the stored square is image_size / 0.875)
    batch_size: int = (
        64  # labelled rows per step, and as many unlabelled rows (authors: --batch_size 64 for both loaders)
    )
    epochs: int = 200  # passes over the labelled shots, used when --epochs is not given (authors: --train_epoch 200)
    lr: float = 1e-3  # AdamW learning rate (authors: --lr 0.001)
    weight_decay: float = 0.01  # AdamW weight decay on every parameter (authors: torch's AdamW default)
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of the steps, then linear decay to 0 (authors: get_linear_schedule_with_warmup at 0.1)
    crop_scale: tuple[float, float] = (
        0.5,
        1.0,
    )  # area range of the random resized crops (authors: RandomResizedCrop scale=(0.5, 1.0))
    temperature: float = 2.0  # softmax temperature of the KD head's KL to the teacher, times T^2 (authors: 2.0)
    w_ce: float = 0.5  # weight of the CE head's cross-entropy on the labelled rows (authors: 0.5)
    w_kd: float = 0.5  # weight of the KD head's KL, labelled + unlabelled (authors: 0.5)
    alpha_grid: tuple[float, ...] = (
        ALPHA_GRID  # candidate weights of the CE head's softmax in the mixed prediction, chosen on val (authors: 0, 0.05, ..., 1)
    )
    beta_grid: tuple[float, ...] = (
        BETA_GRID  # candidate temperatures dividing the KD head's logits, chosen on val (authors: 0.5 ... 4)
    )
    teacher_scale: float = (
        16.0  # fskd: logit scale of the built-in teacher's cosine head (the authors' CLIP teacher: 100)
    )
    teacher_steps: int = 300  # fskd: most fine-tuning steps of the built-in teacher head (best on val is kept)
    val_every: int = 1  # validate every this many epochs (the best epoch is kept; authors: every epoch)
    decode_threads: int = 2  # fskd: threads decoding the images once into the cache file before training
    image_cache: str = (
        ""  # fskd: folder of the decoded-image cache files (default: $FSKD_CACHE_DIR/images or ~/.cache/fskd/images)
    )
    student_kwargs: dict = field(default_factory=dict)  # fskd: keyword arguments of timm.create_model for the student

    RANGES = {
        "weight_decay": (">=", 0),
        "teacher_steps": (">=", 0),
        "decode_threads": (">=", 1),
        "w_ce": (">=", 0),
        "w_kd": (">=", 0),
        "alpha_grid": (">=", 0),
        "beta_grid": (">", 0),
        "warmup_ratio": (">=", 0),
    }
    MAXIMA = {"alpha_grid": 1.0, "warmup_ratio": 1.0}

    def __post_init__(self) -> None:
        for name in ("image_size", "batch_size", "epochs", "val_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dho option {name} must be >= 1, got {getattr(self, name)}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"dho option crop_scale must be 0 < lo <= hi <= 1, got {self.crop_scale}")
        for name in ("lr", "temperature", "teacher_scale"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"dho option {name} must be > 0, got {getattr(self, name)}")
        if not self.alpha_grid or not self.beta_grid:
            raise ConfigError(
                f"dho options alpha_grid and beta_grid need at least one value each, got "
                f"{list(self.alpha_grid)} and {list(self.beta_grid)}"
            )
        if not isinstance(self.student_kwargs, dict):
            raise ConfigError(f"dho option student_kwargs must be a JSON object, got {self.student_kwargs!r}")


class DualHeadNet(torch.nn.Module):
    """Backbone + two linear heads (with bias) over the training classes on its pooled feature:
    ``ce_head`` (cross-entropy on the labels) and ``kd_head`` (the teacher's soft labels)."""

    def __init__(self, backbone: torch.nn.Module, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        d = int(backbone.num_features)
        self.ce_head = torch.nn.Linear(d, n_classes)
        self.kd_head = torch.nn.Linear(d, n_classes)

    def heads(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, D) -> (CE logits (B, C), KD logits (B, C))."""
        return self.ce_head(f), self.kd_head(f)

    def forward(
        self, x_l: torch.Tensor, x_u: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Labelled views (B_l, 3, R, R) and unlabelled views (B_u, 3, R, R), each through the
        backbone on its own (as the authors' two calls: batch-norm statistics per part) -> CE logits
        (B_l, C), KD logits (B_l, C) of the labelled part, KD logits (B_u, C) of the unlabelled part;
        None for an empty part."""
        ce_l = kd_l = kd_u = None
        if len(x_l):
            ce_l, kd_l = self.heads(self.backbone(x_l))
        if x_u is not None and len(x_u):
            kd_u = self.kd_head(self.backbone(x_u))
        return ce_l, kd_l, kd_u


def dho_loss(
    ce_l: torch.Tensor | None,
    kd_l: torch.Tensor | None,
    kd_u: torch.Tensor | None,
    teacher_l: torch.Tensor,
    teacher_u: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 2.0,
    w_ce: float = 0.5,
    w_kd: float = 0.5,
) -> dict[str, torch.Tensor]:
    """The DHO loss of one step (the authors' ``train_student``).

    ce_l, kd_l (B_l, C): the heads' logits on the labelled rows; kd_u (B_u, C): the KD head on the
    unlabelled rows (None: an empty part); teacher_l (B_l, C), teacher_u (B_u, C): teacher logits
    (constants); labels (B_l,) in [0, C). Returns ``task_loss`` (CE), ``kd_labelled`` and
    ``kd_unlabelled`` (KL(teacher_T || student_T) averaged over rows, times T^2), ``kd_loss`` (their
    sum) and ``loss`` = w_ce * task_loss + w_kd * kd_loss.
    """
    T = float(temperature)
    ref = next(t for t in (ce_l, kd_l, kd_u) if t is not None)
    zero = ref.float().sum() * 0.0  # keeps the graph (DDP) when a part is empty on this rank

    def kd(student: torch.Tensor | None, teacher: torch.Tensor) -> torch.Tensor:
        if student is None or not len(student):
            return zero
        return kl_rows(teacher.detach().float() / T, student.float() / T) * T * T

    out = {
        "task_loss": F.cross_entropy(ce_l.float(), labels) if ce_l is not None and len(ce_l) else zero,
        "kd_labelled": kd(kd_l, teacher_l),
        "kd_unlabelled": kd(kd_u, teacher_u),
    }
    out["kd_loss"] = out["kd_labelled"] + out["kd_unlabelled"]
    out["loss"] = w_ce * out["task_loss"] + w_kd * out["kd_loss"]
    return out


def mixed_probs(ce: torch.Tensor, kd: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """The authors' inference rule: alpha * softmax(ce) + (1 - alpha) * softmax(kd / beta), (..., C)."""
    return alpha * F.softmax(ce.float(), dim=-1) + (1 - alpha) * F.softmax(kd.float() / beta, dim=-1)


def mixed_log_probs(ce: torch.Tensor, kd: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """log of :func:`mixed_probs`, finite (a probability that underflows to 0 gets the smallest
    normal float's log): the head's logits, whose softmax is the mixed prediction itself."""
    p = mixed_probs(ce, kd, alpha, beta)
    return torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


@torch.no_grad()
def search_alpha_beta(
    ce: torch.Tensor, kd: torch.Tensor, labels: torch.Tensor, alphas=ALPHA_GRID, betas=BETA_GRID
) -> tuple[float, float, float]:
    """(accuracy as a fraction, alpha, beta) of the best mixed prediction on ``labels``: every beta
    (outer) and alpha (inner) in grid order, a strictly better accuracy replacing the best, starting
    from accuracy 0 at alpha 0, beta 1 (the authors' search, ties and all). ce, kd (n, C); labels (n,)."""
    best_hits, best_alpha, best_beta = 0, NO_VAL_CHOICE["alpha"], NO_VAL_CHOICE["beta"]
    p_ce = F.softmax(ce.float(), dim=-1)
    for beta in betas:
        p_kd = F.softmax(kd.float() / beta, dim=-1)
        for alpha in alphas:
            hits = int(((alpha * p_ce + (1 - alpha) * p_kd).argmax(-1) == labels).sum())
            if hits > best_hits:
                best_hits, best_alpha, best_beta = hits, float(alpha), float(beta)
    return best_hits / max(1, len(labels)), best_alpha, best_beta


def linear_warmup_decay(total: int, ratio: float):
    """The step -> lr factor of ``transformers.get_linear_schedule_with_warmup`` with
    ``num_warmup_steps = ratio * total`` (the authors' schedule: 0 at step 0, 1 at the end of the
    warm-up, 0 at ``total``)."""
    warm = ratio * total

    def factor(step: int) -> float:
        if step < warm:
            return step / max(1.0, warm)
        return max(0.0, (total - step) / max(1.0, total - warm))

    return factor


class DHO(MTKD):
    """Dual-head student (CE head on the shots, KD head on the teacher) -> mixed prediction; semi."""

    name = "dho"
    kind = "distill"
    regimes = ("semi",)  # no base-novel form (its heads classify the classes it was trained on)
    options = DHOOptions

    # -- the hooks of mtkd's fit ----------------------------------------------------------------------
    def _terms(self, store, cfg: DistillConfig) -> tuple[str, ...]:
        if cfg.losses != "all":
            raise ConfigError(
                f"--losses {cfg.losses}: --losses picks mtkd's loss terms; dho's loss is its own (CE head "
                f"on the labels + KD head on the teacher: --set w_ce=... w_kd=... temperature=...)"
            )
        return (
            "logit",
        )  # the teacher's logits are the soft labels (the built-in head is fitted unless --teacher-state)

    def _plan(self, store, cfg: DistillConfig, opts, text_np: np.ndarray | None) -> _Plan:
        if cfg.regime != "semi":
            raise ConfigError(
                f"--regime {cfg.regime}: dho is semi-supervised distillation (K labelled shots of every "
                f"class + the unlabelled rest of the train split); its heads classify the classes it was "
                f"trained on, so it has no base-novel form. Use --regime semi, or --method mtkd"
            )
        return _plan_semi(store, cfg, opts, text_np)

    def _student(self, backbone, n_cls: int, store, terms, opts: DHOOptions, plan: _Plan, teacher_head):
        net = DualHeadNet(backbone, n_cls)

        def loss(train_net: torch.nn.Module, x: torch.Tensor, tb: TeacherBatch) -> dict[str, torch.Tensor]:
            lab = tb.labels >= 0
            with autocast(x.device):
                ce_l, kd_l, kd_u = train_net(x[lab], x[~lab])
            return dho_loss(
                ce_l,
                kd_l,
                kd_u,
                tb.logits[lab],
                tb.logits[~lab],
                tb.labels[lab],
                opts.temperature,
                opts.w_ce,
                opts.w_kd,
            )

        return net, loss

    def _shown(self, terms: tuple[str, ...]) -> tuple[str, ...]:
        return ("kd_labelled", "kd_unlabelled")

    def _batching(self, plan: _Plan, opts: DHOOptions) -> tuple[int, int]:
        # the authors zip a labelled and an unlabelled loader (drop_last=False): an epoch ends with
        # the shorter one, the labelled shots in the few-shot setting
        n_l = int((plan.labels >= 0).sum())
        n_u = plan.n_train - n_l
        steps = math.ceil(n_l / opts.batch_size)
        if n_u:
            steps = min(steps, math.ceil(n_u / opts.batch_size))
        return opts.batch_size, max(1, steps)

    def _optimizer(self, net: torch.nn.Module, opts: DHOOptions, steps: int, total: int):
        opt = torch.optim.AdamW(net.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(total, opts.warmup_ratio))

    def _epoch_batches(
        self, plan: _Plan, cfg: DistillConfig, terms, epoch: int, steps: int, gbatch: int
    ) -> list[np.ndarray]:
        """Per step: ``gbatch`` labelled rows, then ``gbatch`` unlabelled rows (both reshuffled every
        epoch, as the authors' two shuffling loaders restart)."""
        rng = np.random.default_rng(cfg.seed * 1000 + epoch)
        perm_l = rng.permutation(np.flatnonzero(plan.labels >= 0))
        perm_u = rng.permutation(np.flatnonzero(plan.labels < 0))
        return [
            np.concatenate([perm_l[s * gbatch : (s + 1) * gbatch], perm_u[s * gbatch : (s + 1) * gbatch]])
            for s in range(steps)
        ]

    def _default_choice(self) -> dict:
        return dict(NO_VAL_CHOICE)

    @torch.no_grad()
    def _validate(
        self, net: DualHeadNet, images, plan: _Plan, opts: DHOOptions, device, mean_t: torch.Tensor, std_t: torch.Tensor
    ) -> tuple[float, dict]:
        """Val accuracy (fraction) of the best mixed prediction and its alpha, beta, on centre views."""
        net.eval()
        feats = _features(net.backbone, images, plan.val_query, opts.image_size, device, mean_t, std_t)
        ce, kd = net.heads(feats)
        y = torch.from_numpy(plan.val_labels).to(device)
        acc, alpha, beta = search_alpha_beta(ce, kd, y, opts.alpha_grid, opts.beta_grid)
        return acc, {"alpha": alpha, "beta": beta}

    def _head_state(
        self, st: dict[str, torch.Tensor], cfg: DistillConfig, opts: DHOOptions, terms, best: dict, sel: str
    ) -> tuple[dict, dict, dict]:
        tensors = {k: v for k, v in st.items() if k.startswith(("ce_head.", "kd_head."))}
        hparams = {
            "loss": "w_ce * CE(ce_head, labelled) + w_kd * (KL_T(kd_head, labelled) + KL_T(kd_head, unlabelled))",
            "weights": {"ce": opts.w_ce, "kd": opts.w_kd},
            "temperature": opts.temperature,
            "alpha": best["alpha"],
            "beta": best["beta"],
            "alpha_grid": list(opts.alpha_grid),
            "beta_grid": list(opts.beta_grid),
            "inference": "alpha * softmax(ce_head) + (1 - alpha) * softmax(kd_head / beta)",
        }
        rule = (
            sel
            if best["score"] >= 0
            else f"fixed (no validation data: the authors' start, alpha {NO_VAL_CHOICE['alpha']}, beta {NO_VAL_CHOICE['beta']})"
        )
        selected = {
            "alpha": rule,
            "beta": rule,
            "loss weights and temperature": "the authors' defaults (DHO train_others.py)",
        }
        return tensors, hparams, selected

    # -- evaluation -----------------------------------------------------------------------------------
    def head(self, state: MethodState, store, device: torch.device) -> Head:
        t = state.tensors
        return DualHead(
            *(t[k].to(device) for k in ("ce_head.weight", "ce_head.bias", "kd_head.weight", "kd_head.bias")),
            t["train_classes"].to(device),
            float(state.hparams["alpha"]),
            float(state.hparams["beta"]),
            store.num_classes,
        )


class FittedDualHead(FittedHead):
    def __init__(self, head: DualHead, columns: torch.Tensor) -> None:
        self.head, self.columns = head, columns  # columns (E, N): store class -> column of the full table

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        full = self.head.log_probs(query)  # (E, M, n_store)
        return torch.gather(full, 2, self.columns[:, None, :].expand(-1, full.shape[1], -1))


class DualHead(Head):
    """The state's two heads and its mixed prediction, as log-probabilities over the training
    classes (a class the student never learned scores the lowest log-probability). The support
    set is not used: the heads were trained on the state's own shots.

    ce_w, kd_w (C_train, D); ce_b, kd_b (C_train,); train_classes (C_train,) store class of each row.
    """

    name = "dho"

    def __init__(
        self,
        ce_w: torch.Tensor,
        ce_b: torch.Tensor,
        kd_w: torch.Tensor,
        kd_b: torch.Tensor,
        train_classes: torch.Tensor,
        alpha: float,
        beta: float,
        n_classes: int,
    ) -> None:
        self.ce_w, self.ce_b, self.kd_w, self.kd_b = (x.float() for x in (ce_w, ce_b, kd_w, kd_b))
        self.train_classes, self.alpha, self.beta = train_classes.long(), alpha, beta
        self.n_classes = max(n_classes, int(self.train_classes.max()) + 1)

    def log_probs(self, query: torch.Tensor) -> torch.Tensor:
        """(E, M, D) student features -> (E, M, n_store) log mixed probabilities."""
        q = query.float()
        lp = mixed_log_probs(q @ self.ce_w.T + self.ce_b, q @ self.kd_w.T + self.kd_b, self.alpha, self.beta)
        full = torch.full((*lp.shape[:-1], self.n_classes), math.log(torch.finfo(lp.dtype).tiny), device=lp.device)
        full[..., self.train_classes] = lp
        return full

    def fit(self, support: torch.Tensor, classes: torch.Tensor) -> FittedDualHead:
        return FittedDualHead(self, classes.long())


METHODS.register("dho", DHO)
