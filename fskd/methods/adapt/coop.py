"""``coop`` and ``kgcoop``: prompt learning on cached image features.

- ``coop`` (Zhou et al., IJCV 2022, "Learning to Prompt for Vision-Language Models"): M context
  vectors stand in for the words of a prompt, ``[SOS] v_1 ... v_M <class name> . [EOS]``, shared by
  the classes (``csc=true``: one context per class), the class name at the end (``position``
  ``middle`` or ``front`` as options). The frozen text tower encodes the prompts from their token
  embeddings (``Encoder.prompt_tower``) and the class weights are the normalised text features;
  cross-entropy of ``logit_scale * cos(image, weight)`` on the K shots trains the context alone.
- ``kgcoop`` (Yao et al., CVPR 2023, "Visual-Language Prompt Tuning with Knowledge-guided Context
  Optimization"): CoOp plus ``lam * (1 - mean_c cos(t_c, t^hand_c))``, the distance of the learned
  class text features to the hand-crafted ones (here the store's class text features, i.e. its
  templates), with the reference's lam 8 and its "a photo of a" initialisation (4 vectors).

Only the text tower runs in the training loop, over the C class prompts of a step; the image side
is read from the store (no image forward pass: the point of the store; ``benchmarks/coop_speed.py``
measures the saving). The recipe is the papers' code (KaiyangZhou/CoOp on Dassl): SGD lr 0.002,
momentum 0.9, weight decay 5e-4, batches of 32 (the last short batch dropped), one warm-up epoch
at a constant 1e-5 and a cosine over the epochs; 50 epochs at 1 shot, 100 at 2-4, 200 at 8 and
more (``EPOCHS_BY_SHOTS``), random N(0, 0.02) context or the initial words' embeddings. The
reference keeps the last epoch; fskd keeps the epoch with the best validation accuracy (the val
split with min(K, 4) rows per class all-way, val-class episodes episodic), ties to the earlier one.
With augmented views in the store (``fskd extract --augment-views``) every all-way epoch shows each
shot as one of its views, as the reference re-augments every epoch.

Regimes (``regimes``): the all-way context learns from the K shots of every class of the train
split (seed ``--seed``); the episodic context from K shots of each base class (drawn the same way),
and it classifies the novel (and base-to-new's new) classes through their names. ``--set regime``
(``both``, the default, ``allway`` or ``episodic``) learns one of them only: half the text-tower
work (``fskd bench`` asks for the one its cells score); the state then refuses the other protocol. A store whose
image and text spaces differ (the offline pair) reaches image space through the bridge: the base
classes' ridge maps episodically, the support's leave-one-class-out bridge all-way; gradients flow
through both (they are linear in the text features).

The state holds the context vectors and the class text features they give for every class of the
store, so evaluation needs no text encoder; cross-dataset transfer (another store) encodes the
target's class names with the learned context, so it does need it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fskd.config import Config
from fskd.errors import ConfigError, EncoderError, EvaluationError, FskdError
from fskd.methods.adapt.method import parse_options, text_fit
from fskd.methods.adapt.regimes import (
    ALLWAY,
    EPISODIC,
    FittedWeights,
    RegimeHead,
    allway_rows,
    allway_views,
    learned_mask,
    sample_shots,
)
from fskd.methods.adapt.text_space import embed_views, episodic_text_space, support_text_space
from fskd.methods.adapt.validation import (
    NO_VALIDATION,
    VAL_RANGES,
    allway_val_task,
    check_val_options,
    episodic_val_task,
    hp,
    no_validation,
)
from fskd.methods.base import METHODS, Method, MethodState, TrainProgress
from fskd.methods.bridge import Bridge
from fskd.runtime import autocast, resolve_device
from fskd.store import sampling

log = logging.getLogger(__name__)

#: CoOp's scripts: 50 epochs for 1 shot, 100 for 2 and 4, 200 for 8 and 16 (and more)
EPOCHS_BY_SHOTS = ((1, 50), (4, 100), (None, 200))
POSITIONS = ("end", "middle", "front")
#: which contexts a fit learns: both (the default: the state serves every protocol), or one
REGIMES = ("both", ALLWAY, EPISODIC)
#: the logit scale of a text tower without one (a sentence encoder): CLIP's trained value
DEFAULT_LOGIT_SCALE = 100.0
PLACEHOLDER = "X"


def epochs_for(shots: int) -> int:
    for top, epochs in EPOCHS_BY_SHOTS:
        if top is None or shots <= top:
            return epochs
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class CoOpOptions(Config):
    n_ctx: int | None = None  # context vectors (None: 16, or as many as ctx_init has tokens)
    ctx_init: str = ""  # e.g. "a photo of a": the context starts at these words' embeddings
    csc: bool = False  # class-specific context (all-way only: a class never trained has none)
    position: str = "end"  # where the class name sits: end, middle, front
    regime: str = "both"  # both | allway | episodic: which contexts to learn (fskd bench fits only the one it scores)
    epochs: int | None = None  # None: by shots, as CoOp's configs (EPOCHS_BY_SHOTS)
    batch_size: int = 32  # shots per SGD step (CoOp's 32; the last short batch is dropped)
    lr: float = 0.002  # SGD learning rate after the warm-up (CoOp's)
    momentum: float = 0.9  # SGD momentum (CoOp's)
    weight_decay: float = 5e-4  # SGD weight decay (CoOp's)
    warmup_epochs: int = 1  # epochs at the constant warmup_lr before the cosine (CoOp's 1)
    warmup_lr: float = 1e-5  # learning rate of the warm-up epochs (CoOp's)
    logit_scale: float | None = None  # None: the model's (CLIP: exp(logit_scale)), else 100
    lam: float = 0.0  # kgcoop's weight of the hand-crafted text distance (coop: 0)
    ridge: float | None = None  # bridge ridge (non-joint stores; None: chosen on validation)
    val_way: int = 5
    val_query: int = 15
    val_episodes: int = 300

    RANGES = {
        "n_ctx": (">=", 1),
        "epochs": (">=", 0),
        "batch_size": (">=", 1),
        "lr": (">", 0),
        "momentum": (">=", 0),
        "weight_decay": (">=", 0),
        "warmup_epochs": (">=", 0),
        "warmup_lr": (">", 0),
        "logit_scale": (">", 0),
        "lam": (">=", 0),
        "ridge": (">", 0),
        **VAL_RANGES,
    }

    def __post_init__(self) -> None:
        check_val_options(self)
        if self.position not in POSITIONS:
            raise ConfigError(f"--set position must be one of {', '.join(POSITIONS)}, got {self.position!r}")
        if self.regime not in REGIMES:
            raise ConfigError(f"--set regime must be one of {', '.join(REGIMES)}, got {self.regime!r}")


@dataclass(frozen=True)
class KgCoOpOptions(CoOpOptions):
    ctx_init: str = "a photo of a"  # KgCoOp's configs (ctxv1): 4 vectors from "a photo of a"
    lam: float = 8.0  # KgCoOp's W


class PromptLearner(torch.nn.Module):
    """The context vectors and the frozen rest of every class prompt.

    ``text(idx)`` -> (len(idx), d_t) L2-normalised text features of the store classes ``idx``;
    only ``ctx`` ((M, w) shared, or (C, M, w) class-specific) has a gradient."""

    def __init__(
        self, tower, class_names: list[str], n_ctx: int, ctx_init: str, csc: bool, position: str, seed: int
    ) -> None:
        super().__init__()
        self.tower = tower
        C_, w = len(class_names), tower.width
        p0 = tower.prefix_tokens
        if ctx_init:
            ids, _ = tower.tokenize([ctx_init])
            n_init = tower.word_count([ctx_init])[0]
            if n_ctx is not None and n_ctx != n_init:
                raise ConfigError(
                    f"--set ctx_init {ctx_init!r} is {n_init} tokens, --set n_ctx {n_ctx}: the context "
                    f"takes the initial words' length (leave n_ctx out)"
                )
            n_ctx = n_init
            with torch.no_grad():
                init = tower.embed(ids)[0, p0 : p0 + n_ctx].float()
            prefix = ctx_init
        else:
            n_ctx = 16 if n_ctx is None else n_ctx
            g = torch.Generator().manual_seed(seed)
            init = torch.randn(n_ctx, w, generator=g) * 0.02  # CoOp: nn.init.normal_(std=0.02)
            prefix = " ".join([PLACEHOLDER] * n_ctx)
        self.n_ctx, self.csc, self.position = n_ctx, csc, position
        init = init.to(next(tower.modules()[0].parameters()).device)
        self.ctx = torch.nn.Parameter(init[None].repeat(C_, 1, 1).contiguous() if csc else init.clone())
        prompts = [f"{prefix} {n}." for n in class_names]
        ids, mask = tower.tokenize(prompts)
        L = ids.shape[1]
        lens = tower.word_count(list(class_names))
        need = [p0 + n_ctx + n + 2 for n in lens]  # + the "." and the end token
        if max(need) > L:
            c = int(np.argmax(need))
            raise EncoderError(
                f"the prompt of class {class_names[c]!r} needs {need[c]} token positions with {n_ctx} "
                f"context vectors; the text tower takes {L}: use fewer (--set n_ctx)"
            )
        with torch.no_grad():
            self.register_buffer("frozen", tower.embed(ids).detach(), persistent=False)
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        # layout: a gather index into cat([frozen (C, L, w), ctx (C, M, w)]) for each output position
        idx = torch.empty(C_, L, dtype=torch.long)
        ctx_pos = list(range(L, L + n_ctx))
        for c, n in enumerate(lens):
            after = list(range(p0 + n_ctx, L))  # the class name, ".", end of text, padding
            name, rest = after[:n], after[n:]
            if position == "end":
                order = [*range(p0), *ctx_pos, *after]
            elif position == "middle":
                h = n_ctx // 2
                order = [*range(p0), *ctx_pos[:h], *name, *ctx_pos[h:], *rest]
            else:
                order = [*range(p0), *name, *ctx_pos, *rest]
            idx[c] = torch.tensor(order)
        self.register_buffer("layout", idx.to(ids.device), persistent=False)

    def text(self, idx: torch.Tensor) -> torch.Tensor:
        frozen = self.frozen[idx]
        ctx = self.ctx[idx] if self.csc else self.ctx[None].expand(len(idx), -1, -1)
        both = torch.cat([frozen, ctx.to(frozen.dtype)], dim=1)
        emb = both.gather(1, self.layout[idx][..., None].expand(-1, -1, both.shape[-1]))
        return F.normalize(self.tower.encode(emb, self.ids[idx], self.mask[idx]).float(), dim=-1)

    @torch.no_grad()
    def all_text(self, batch: int = 256) -> torch.Tensor:
        n = self.ids.shape[0]
        return torch.cat(
            [self.text(torch.arange(s, min(s + batch, n), device=self.ids.device)) for s in range(0, n, batch)]
        )


def dassl_lr(epoch: int, epochs: int, lr: float, warmup_lr: float, warmup_epochs: int = 1) -> float:
    """Dassl's ConstantWarmupScheduler over CosineAnnealingLR(T_max=epochs), stepped per epoch
    (CoOp's recipe, and CLAP's, TaskRes's and CLIP-Adapter's, which follow it): ``warmup_lr`` for
    the warm-up epochs, then the cosine from ``lr`` (its step e - warmup)."""
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * lr * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


def lr_at(epoch: int, opts: CoOpOptions, epochs: int) -> float:
    """:func:`dassl_lr` with CoOp's options."""
    return dassl_lr(epoch, epochs, opts.lr, opts.warmup_lr, opts.warmup_epochs)


@dataclass
class ContextRun:
    ctx: torch.Tensor
    epoch: int  # epochs that made ``ctx`` (the best on validation when scored, else all)
    curve: list  # mean val accuracy after each epoch (percent)
    losses: list  # mean training loss of each epoch


def train_context(
    learner: PromptLearner,
    classes: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    weights,
    scale: float,
    opts: CoOpOptions,
    epochs: int,
    seed: int,
    device: torch.device,
    val=None,
    target: torch.Tensor | None = None,
    views: torch.Tensor | None = None,
    progress=None,
    tag: str = "coop",
) -> ContextRun:
    """Train ``learner.ctx`` on embedded image rows ``x`` (n, D) with labels ``y`` (n,) (positions
    in ``classes``, the store classes of the prompts).

    ``weights(t)`` maps the classes' text features (len(classes), d_t) to class weights (len, D)
    in the images' space; ``val()`` -> accuracy in [0, 1] of the current context (None: keep the
    last epoch); ``target`` (len(classes), d_t) the hand-crafted text features (kgcoop);
    ``views`` (n, V, D): every epoch each row is one of its views, drawn from a stream of its own."""
    n = len(x)
    opt = torch.optim.SGD([learner.ctx], lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    gen_views = torch.Generator().manual_seed(seed + 1_000_003)
    bs = min(opts.batch_size, n)
    drop_last = n >= opts.batch_size  # Dassl drops the last short batch when there is a full one
    run = ContextRun(learner.ctx.detach().clone(), 0, [], [])
    best = -1.0
    if val is not None and epochs == 0:
        run.curve.append(round(100 * val(), 2))
    for epoch in range(epochs):
        for g in opt.param_groups:
            g["lr"] = lr_at(epoch, opts, epochs)
        perm = torch.randperm(n, generator=gen).to(device)
        pick = torch.randint(views.shape[1], (n,), generator=gen_views).to(device) if views is not None else None
        stop = (n // bs) * bs if drop_last else n
        total, steps = 0.0, 0
        for i in range(0, stop, bs):
            rows = perm[i : i + bs]
            xb = x[rows] if views is None else views[rows, pick[rows]]
            with torch.enable_grad(), autocast(device):
                t = learner.text(classes)
                logits = scale * xb @ weights(t).T
                loss = F.cross_entropy(logits.float(), y[rows])
                if target is not None and opts.lam > 0:
                    loss = loss + opts.lam * (1.0 - F.cosine_similarity(t, target, dim=-1).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
        run.losses.append(round(total / max(steps, 1), 5))
        if progress is not None:
            progress(tag, epoch + 1, epochs, {"loss": run.losses[-1]})
        if val is None:
            continue
        with torch.no_grad():
            acc = val()
        run.curve.append(round(100 * acc, 2))
        if acc > best + 1e-9:
            best, run.epoch, run.ctx = acc, epoch + 1, learner.ctx.detach().clone()
    if val is None:
        run.ctx, run.epoch = learner.ctx.detach().clone(), epochs
    return run


def prompt_tower(spec: str, device: torch.device, method: str):
    """The store's text tower as a function of token embeddings, rebuilt from the store's spec."""
    from fskd.encoders import build_encoder

    try:
        enc = build_encoder(spec, device)
        if not enc.has_text:
            raise EncoderError(f"encoder {spec!r} has no text tower")
        tower = enc.prompt_tower()
    except FskdError as e:
        raise EncoderError(
            f"{method} learns prompts with the store's text encoder {spec!r}, which cannot be used here: {e}"
        ) from None
    for m in tower.modules():
        m.to(device).eval().requires_grad_(False)
    return tower


class CoOp(Method):
    """CoOp: learned context vectors in the prompts of a frozen text tower, image features cached."""

    needs_text = True
    needs_text_encoder = True
    transfers_to_new_classes = True  # new classes: the learned context with their names

    name = "coop"
    kind = "adapt"
    options = CoOpOptions

    def bound_to_shots(self, state: MethodState) -> bool:
        return True  # the all-way context was trained on the K shots of the state's seed

    def fit(self, store, config, progress: TrainProgress | None = None) -> MethodState:
        t0 = time.perf_counter()
        opts = parse_options(self.options, config)
        if config.shots < 1:
            raise ConfigError(f"method {self.name!r} trains its context on K shots per class: --shots must be >= 1")
        if opts.csc and opts.regime == EPISODIC:
            raise ConfigError(
                f"method {self.name!r}: --set csc=true learns one context per class, none for classes it "
                f"never trained, so regime=episodic has nothing to learn (use regime=allway)"
            )
        device = resolve_device(config.device)
        state, text, bridge, aw_ridge = text_fit(store, config, self.name, opts.ridge, device)
        tower = prompt_tower(store.encoder_spec, device, self.name)
        scale = opts.logit_scale or tower.logit_scale or DEFAULT_LOGIT_SCALE
        epochs = opts.epochs if opts.epochs is not None else epochs_for(config.shots)
        text = text.to(device)
        state.hparams["regime"], state.selected_on["regime"] = opts.regime, "fixed (option)"
        for regime in (ALLWAY, EPISODIC):
            if opts.regime not in ("both", regime):
                state.selected_on[f"{regime}.epochs"] = f"not fitted: regime={opts.regime}"
                continue
            if regime == EPISODIC and opts.csc:
                state.hparams[f"{regime}.epochs"] = 0
                state.selected_on[f"{regime}.epochs"] = (
                    "not fitted: csc=true learns a context per class, none for classes it never trained (novel, new)"
                )
                continue
            learner = PromptLearner(
                tower, store.class_names, opts.n_ctx, opts.ctx_init, opts.csc, opts.position, config.seed
            )
            fitter = self._fit_allway if regime == ALLWAY else self._fit_episodic
            run, on, desc, extra = fitter(
                store, config, opts, learner, text, bridge, aw_ridge, scale, epochs, device, progress
            )
            with torch.no_grad():
                learner.ctx.copy_(run.ctx)
                state.tensors[f"{regime}.ctx"] = run.ctx.cpu()
                state.tensors[f"{regime}.text"] = learner.all_text().cpu()
            state.hparams[f"{regime}.epochs"] = run.epoch
            state.selected_on[f"{regime}.epochs"] = on
            if run.curve:
                state.metrics[f"{regime}.val_acc"] = max(run.curve)
                state.metrics[f"{regime}.val_task"] = desc
                state.metrics[f"{regime}.val_curve"] = run.curve
            state.metrics[f"{regime}.train_loss"] = run.losses
            state.hparams.update({f"{regime}.{k}": v for k, v in extra.get("hparams", {}).items()})
            state.selected_on.update({f"{regime}.{k}": v for k, v in extra.get("selected_on", {}).items()})
            state.hparams["n_ctx"] = learner.n_ctx
        fixed = "fixed (the paper's recipe)" if opts == self.options() else "fixed (option)"
        for k, v in (
            ("ctx_init", opts.ctx_init or "random N(0, 0.02)"),
            ("csc", opts.csc),
            ("position", opts.position),
            ("epoch_budget", epochs),
            ("batch_size", opts.batch_size),
            ("lr", opts.lr),
            ("momentum", opts.momentum),
            ("weight_decay", opts.weight_decay),
            ("warmup_epochs", opts.warmup_epochs),
            ("warmup_lr", opts.warmup_lr),
            ("logit_scale", scale),
            ("lam", opts.lam),
        ):
            state.hparams[k] = v
            state.selected_on[k] = fixed
        state.selected_on["n_ctx"] = fixed
        state.selected_on["epoch_budget"] = (
            f"{fixed}: {epochs} epochs at {config.shots} shots" if opts.epochs is None else fixed
        )
        state.selected_on["logit_scale"] = (
            "the model's"
            if opts.logit_scale is None and tower.logit_scale
            else "fixed (CLIP's 100: the text tower has none)"
            if opts.logit_scale is None
            else "fixed (option)"
        )
        state.metrics["fit_seconds"] = round(time.perf_counter() - t0, 3)
        return state

    @staticmethod
    def _fit_allway(store, config, opts, learner, text, bridge, ridge, scale, epochs, device, progress):
        x_np, y_np, classes_np = allway_rows(store, config.shots, config.seed)
        K = config.shots
        support = torch.from_numpy(x_np).to(device).reshape(len(classes_np), K, -1)[None]
        classes = torch.from_numpy(classes_np).to(device)
        pos = torch.arange(len(classes_np), device=device)[None]
        space = support_text_space(support, pos, text[classes], store.joint, ridge)  # embedding of the images
        x = space.support[0].reshape(len(classes_np) * K, -1)
        y = torch.arange(len(classes_np), device=device).repeat_interleave(K)

        def weights(t):
            return support_text_space(support, pos, t, store.joint, ridge).weights[0]

        views, why = allway_views(store, config, device)
        embedded_views = embed_views(space, views)[0].transpose(0, 1) if views is not None else None  # (S, V, D)
        task = allway_val_task(store, config, device)
        val, desc, on = (
            None,
            "no validation data",
            (
                "default (no val split): the last epoch, as the reference"
                if not no_validation(config)
                else NO_VALIDATION + ": the last epoch"
            ),
        )
        if task is not None:
            q = space.embed(task.query)[0]
            truth = task.truth[0]

            def val():
                return float(((q @ weights(learner.text(classes)).T).argmax(-1) == truth).float().mean())

            desc, on = task.description, task.on
        target = text[classes] if opts.lam > 0 else None
        run = train_context(
            learner,
            classes,
            x,
            y,
            weights,
            scale,
            opts,
            epochs,
            config.seed,
            device,
            val,
            target,
            embedded_views,
            progress,
            f"{CoOp.name} all-way",
        )
        extra = {
            "hparams": {"views": 0 if views is None else int(views.shape[1])},
            "selected_on": {"views": why if views is not None else f"none: {why}; one feature per shot"},
        }
        return run, on, desc, extra

    @staticmethod
    def _fit_episodic(store, config, opts, learner, text, bridge, ridge, scale, epochs, device, progress):
        base = store.class_split("base") if "base" in store.attrs["class_split"] else []
        if not base:
            raise ConfigError(
                f"{store.path}: the episodic context learns from the base classes, but the base class split is empty"
            )
        splits = ("train",) if store.has_split("train") else None
        xb, yb = store.gather(base, splits, max_per_class=sampling.CLASS_ROWS)
        base_np = np.asarray(sorted(base))
        rows = sample_shots(yb, base_np, config.shots, config.seed, store.class_names).reshape(-1)
        classes = torch.from_numpy(base_np).to(device)
        pos = np.full(store.num_classes, -1)
        pos[base_np] = np.arange(len(base_np))
        x = bridge.embed_images(torch.from_numpy(xb[rows]).to(device))
        y = torch.from_numpy(pos[yb[rows]]).to(device)
        task = None if no_validation(config) else episodic_val_task(store, config.shots, opts, config.seed, device)
        val, desc, on = (
            None,
            "no validation data",
            (
                "default (no val classes): the last epoch, as the reference"
                if not no_validation(config)
                else NO_VALIDATION + ": the last epoch"
            ),
        )
        if task is not None:
            vcls = torch.unique(task.classes)
            vpos = torch.full((store.num_classes,), -1, dtype=torch.long, device=device)
            vpos[vcls] = torch.arange(len(vcls), device=device)
            q = bridge.embed_images(task.query)

            def val():
                w = bridge.text_to_image(learner.text(vcls))[vpos[task.classes]]  # (E, N, D)
                return task.accuracy(torch.bmm(q, w.transpose(1, 2)))

            desc, on = task.description, task.on
        target = text[classes] if opts.lam > 0 else None
        run = train_context(
            learner,
            classes,
            x,
            y,
            bridge.text_to_image,
            scale,
            opts,
            epochs,
            config.seed,
            device,
            val,
            target,
            None,
            progress,
            f"{CoOp.name} episodic",
        )
        return (
            run,
            on,
            desc,
            {
                "hparams": {"train_rows": int(len(rows))},
                "selected_on": {
                    "train_rows": f"{config.shots} shots of each of the {len(base_np)} base "
                    f"classes (seed {config.seed})"
                },
            },
        )

    def head(self, state: MethodState, store, device: torch.device):
        bridge = Bridge.from_tensors({k: v.to(device) for k, v in state.tensors.items()})
        ridge = hp(state, ALLWAY, "ridge")
        learned = {r: state.tensors[f"{r}.text"].to(device) for r in (EPISODIC, ALLWAY) if f"{r}.text" in state.tensors}

        def episodic(support, classes):
            if EPISODIC not in learned:
                raise EvaluationError(
                    f"{state.method} state: {state.selected_on.get('episodic.epochs')}; evaluate it "
                    f"with --protocol allway"
                )
            ts = episodic_text_space(bridge, learned[EPISODIC], support, classes)
            return FittedWeights(ts.weights, ts.embed)

        def allway(support, classes):
            if ALLWAY not in learned:
                raise EvaluationError(
                    f"{state.method} state: {state.selected_on.get('allway.epochs')}; evaluate it "
                    f"with --protocol episodic (or refit with --set regime=both)"
                )
            ts = support_text_space(support, classes, learned[ALLWAY], store.joint, ridge)
            return FittedWeights(ts.weights, ts.embed)

        return RegimeHead(self.name, learned_mask(store, device), episodic, allway, needs_text=True)

    def text_features(self, state: MethodState, store, device: torch.device) -> dict[str, torch.Tensor]:
        return {r: state.tensors[f"{r}.text"].to(device) for r in (EPISODIC, ALLWAY) if f"{r}.text" in state.tensors}

    def transfer_state(self, state: MethodState, store) -> MethodState:
        """Cross-dataset: the learned context with the target store's class names (this runs the
        text tower, once per regime)."""
        import dataclasses

        if state.hparams.get("csc"):
            raise ConfigError(
                f"{state.method} state with csc=true learned one context per source class; it has none "
                f"for another store's classes"
            )
        out = super().transfer_state(state, store)
        tower = prompt_tower(store.encoder_spec, torch.device("cpu"), state.method)
        tensors = dict(out.tensors)
        for r in (EPISODIC, ALLWAY):
            if f"{r}.ctx" not in state.tensors:
                continue
            # the layout depends on n_ctx and position only: the context positions are replaced below
            learner = PromptLearner(
                tower, store.class_names, int(state.hparams["n_ctx"]), "", False, state.hparams["position"], 0
            )
            with torch.no_grad():
                learner.ctx.copy_(state.tensors[f"{r}.ctx"])
                tensors[f"{r}.text"] = learner.all_text().cpu()
        return dataclasses.replace(out, tensors=tensors)


class KgCoOp(CoOp):
    """KgCoOp: CoOp whose learned class text stays near the hand-crafted prompts' (weight lam)."""

    name = "kgcoop"
    options = KgCoOpOptions


METHODS.register("coop", CoOp)
METHODS.register("kgcoop", KgCoOp)
