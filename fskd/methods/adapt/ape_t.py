"""``ape-t``: APE-T, the trained form of APE (Zhu et al., "Not All Features Matter: Enhancing
Few-shot CLIP with Adaptive Prior Refinement", ICCV 2023; authors' code:
github.com/yangyangyang127/APE, ``main.py`` (``APE_T``) and ``utils.py`` (``APE_Training``,
``cal_criterion``, ``SmoothCrossEntropy``), read at commit ``70460de``).

What the authors' code trains (the refinement shared with :mod:`fskd.methods.adapt.ape`):

    channels  the Q channels with the largest  -w sim_d + (1 - w) var_d  (ape's criterion), with
              w = 0.2 (their ``w_training`` [0.2, 0.8], the same in all eleven configs) and
              Q = 800/1024 of the channels (the median of their ``training_feat_num``)
    R (N, Q)  a class residual, zeros at the start: added to class n's text weight and to each of
              its K cache keys, in the Q channels only (nothing is normalised again)
    v (S,)    a weight per cache key, ones at the start: the values are v_s L_s (one-hot L_s)
    logits(x) = 100 x^T t'_k + alpha exp(-beta (1 - x^T F'_s)) (v L)     all D channels

Training: AdamW (lr 1e-3, eps 1e-3, weight decay 0.1: the median of their configs' ``lr`` and
``eps``; the decay is fixed in their code), a cosine schedule stepped per batch over 30 epochs
(the median ``train_epoch``) of shuffled batches of 256 shot images, cross-entropy (their
``SmoothCrossEntropy`` at its default smoothing 0), at their ``init_beta`` = 1 and ``init_alpha``
(1: ape's default, the value of most configs). After each epoch the logits at (init_beta,
init_alpha) are scored on validation; the best epoch (the first of equals) is kept, and beta
(200 values) x alpha (20) are then searched on validation with the trained parameters (their
grid of their most common config, as ape; on a non-joint store alpha may also take ape's wide
values). Their training images are freshly augmented crops of the shots each epoch and the
cache keys the mean of 10 augmented epochs: with stored views (``fskd extract
--augment-views``) the all-way fit queries one view of each shot drawn at random per epoch and
the keys are the normalised mean of the views (``text_space.view_keys``); without views every
epoch queries the shots themselves (the keys), as their loop would with no augmentation
(``leave_one_out=true``, fskd's option, keeps each shot off its own key then).

Where fskd departs from their code, each written in docs/methods/baselines-2024.md with its
measured effect: the channel count is their ``training_feat_num`` (their ``APE_Training``
asks ``cal_criterion`` for ``training_free_feat_num`` channels and crashes when the two differ,
their issue #13); the criterion's similarity is of the text weights alone (what
``APE_Training``'s call asks for; their main script would instead load the text + cache
criterion that the training-free run cached under the same file name: ``criterion=text+cache``);
float32 where they train float16 parameters on float16 features; the epoch kept and (beta,
alpha) are chosen on validation rows, as theirs (their print calls it a test accuracy).

Batched over episodes (E, ...): each episode's parameters train on its own loss (the sum of the
per-episode means; AdamW is element-wise), so E episodes train as E separate runs would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fskd.classifiers.base import FittedHead
from fskd.classifiers.cache import TEXT_SCALE, affinity
from fskd.errors import ConfigError
from fskd.methods.adapt.ape import ALPHA, ALPHA_WIDE, BETA, CHUNK, DEFAULT, correct_counts, n_channels, select_channels
from fskd.methods.adapt.method import AdaptMethod, AdaptOptions, Fit
from fskd.methods.adapt.regimes import (
    ALLWAY,
    EPISODIC,
    RegimeHead,
    Task,
    keep_allway_head,
    kept_allway_head,
    learned_mask,
    record_views,
)
from fskd.methods.adapt.text_space import TextSpace, embed_views, regime_text_space, state_text, view_keys
from fskd.methods.adapt.validation import (
    VAL_RANGES,
    Choice,
    check_val_options,
    fixed_or,
    grid_search,
    hp,
    record,
    record_grid,
)
from fskd.methods.base import METHODS, MethodState
from fskd.runtime import single_thread

#: the authors' w_training[0] (every config: [0.2, 0.8]) and the median of their training_feat_num / 1024
W_SIM = 0.2
FEAT_FRAC = 800 / 1024
#: the median of their configs' lr, eps and train_epoch; the weight decay and batch are fixed in their code
LR = 1e-3
ADAMW_EPS = 1e-3
WEIGHT_DECAY = 0.1
EPOCHS = 30
BATCH = 256
#: what the channel criterion's similarity is taken over (see the module docstring)
CRITERIA = ("text", "text+cache")
GRID_JOINT = "the authors': beta 0.1 + 6.9 i / 200, alpha 0.1 + 6.9 i / 20"
GRID_BRIDGE = GRID_JOINT + " + alpha 8 ... 65536 (non-joint store: the bridge's text scale)"
NORMALISATION = (
    "L2 per row; cache keys the L2 mean of a shot's stored views; the trained residual is added to "
    "the text weights and keys as they are (not normalised again, as the authors); a non-joint "
    "store's rows are centred on the support mean first (fskd's bridge space)"
)
FIXED = "fixed (the authors' APE_T recipe: the median of their per-dataset configs)"


@dataclass(frozen=True)
class APETOptions(AdaptOptions):
    beta: float | tuple[float, ...] | None = (
        None  # cache sharpness searched after training (null: the authors' 200-value grid on validation)
    )
    alpha: float | tuple[float, ...] | None = (
        None  # cache weight searched after training (null: the authors' 20-value grid, + wide values on a non-joint store)
    )
    init_beta: float = DEFAULT["beta"]  # the beta the parameters train at (the authors' init_beta)
    init_alpha: float = DEFAULT["alpha"]  # the alpha the parameters train at (the authors' init_alpha of most configs)
    w_sim: float = W_SIM  # channel criterion: -w_sim x inter-class similarity + (1 - w_sim) x text variance (the authors' w_training)
    feat_frac: float = FEAT_FRAC  # share of the channels the residual lives in (the authors' training_feat_num / 1024)
    criterion: str = (
        "text"  # the criterion's similarity over the text weights (their APE_Training) or text + cache keys
    )
    epochs: int = EPOCHS  # epoch budget of the cosine schedule (validation keeps the best epoch)
    lr: float = LR  # AdamW learning rate
    eps: float = ADAMW_EPS  # AdamW epsilon (the authors' eps)
    weight_decay: float = WEIGHT_DECAY  # AdamW weight decay
    batch_size: int = BATCH  # shot images per step
    leave_one_out: bool = False  # without stored views: a shot never meets its own key in training (fskd's option; the authors' crops differ from their keys)
    ridge: float | None = None
    val_way: int = 5
    val_query: int = 15
    val_episodes: int = 300

    RANGES = {
        "beta": (">=", 0),
        "alpha": (">=", 0),
        "init_beta": (">=", 0),
        "init_alpha": (">=", 0),
        "w_sim": (">=", 0),
        "feat_frac": (">", 0),
        "epochs": (">=", 1),
        "lr": (">", 0),
        "eps": (">", 0),
        "weight_decay": (">=", 0),
        "batch_size": (">=", 1),
        "ridge": (">", 0),
        **VAL_RANGES,
    }
    MAXIMA = {"w_sim": 1, "feat_frac": 1}

    def __post_init__(self) -> None:
        check_val_options(self)
        if self.criterion not in CRITERIA:
            raise ConfigError(f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")


# -- the trained parameters ------------------------------------------------------------------------
def channels(weights: torch.Tensor, keys: torch.Tensor, w_sim: float, frac: float, criterion: str) -> torch.Tensor:
    """The refined channels (E, Q) of text weights (E, N, D) and class-major keys (E, N, K, D):
    ape's criterion over the text weights alone (``text``: the keys enter with K = 0) or with the keys."""
    return select_channels(
        weights, keys if criterion == "text+cache" else keys[:, :, :0], w_sim, n_channels(weights.shape[-1], frac)
    )


def trained_parts(
    weights: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor, res: torch.Tensor, value_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The authors' ``APE_Training.forward``, batched: text weights (E, N, D) + the residual
    (E, N, Q) in the channels ``idx`` (E, Q); class-major keys (E, N*K, D) + their class's residual
    there; values (E, N*K, N) = one-hot * value weights (E, N*K). Differentiable in ``res`` and
    ``value_weights``."""
    E, N, D = weights.shape
    K = keys.shape[1] // N
    delta = torch.zeros_like(weights).scatter(2, idx[:, None, :].expand(-1, N, -1), res)  # (E, N, D)
    onehot = F.one_hot(torch.arange(N, device=keys.device).repeat_interleave(K), N).to(keys.dtype)
    return weights + delta, keys + delta.repeat_interleave(K, dim=1), onehot[None] * value_weights[..., None]


def apet_logits(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """100 q t'^T + alpha exp(-beta (1 - q F'^T)) V: (E, M, D) embedded queries -> (E, M, N)."""
    out = TEXT_SCALE * torch.bmm(q, weights.transpose(1, 2))
    if keys.shape[1] == 0:
        return out
    return out + alpha * torch.bmm(affinity(q, keys, beta), values)


@dataclass(frozen=True)
class Recipe:
    """How the parameters train (the options of a fit, or those a state recorded)."""

    init_alpha: float
    init_beta: float
    w_sim: float
    feat_frac: float
    criterion: str
    epochs: int
    lr: float
    eps: float
    weight_decay: float
    batch_size: int
    leave_one_out: bool = False

    @classmethod
    def of(cls, source) -> Recipe:
        """From options (attributes) or a state's hparams (a dict)."""
        get = source.get if isinstance(source, dict) else lambda k: getattr(source, k)
        return cls(
            **{k: get(k) for k in cls.__dataclass_fields__ if k != "leave_one_out"},
            leave_one_out=bool(get("leave_one_out")),
        )


@dataclass
class Trained:
    """Trained text weights (E, N, D), keys (E, S, D) and values (E, S, N); ``epoch`` how many
    epochs made them (the best on validation when scored, else the stop); ``curve`` the mean val
    accuracy (%) after each epoch at (init_alpha, init_beta)."""

    weights: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    epoch: int
    curve: list = field(default_factory=list)


#: the support's own products (E, S, S) are computed once when they hold at most this many values
POOL_VALUES = 1 << 25


@dataclass
class Products:
    """A query set's products with what does not train: ``text`` (E, M, N) = q t^T, ``sims``
    (E, M, S) = q F^T, ``refined`` (E, M, Q) = q's refined channels. With them the trained logits
    need no (E, S, D) tensor: q t'_n = q t_n + q_idx r_n and q F'_s = q F_s + q_idx r_class(s)."""

    text: torch.Tensor
    sims: torch.Tensor
    refined: torch.Tensor

    @classmethod
    def of(cls, q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor) -> Products:
        refined = torch.gather(q, 2, idx[:, None, :].expand(-1, q.shape[1], -1))
        return cls(torch.bmm(q, weights.transpose(1, 2)), torch.bmm(q, keys.transpose(1, 2)), refined)

    def rows(self, r: torch.Tensor) -> Products:
        return Products(self.text[:, r], self.sims[:, r], self.refined[:, r])

    def logits(
        self, res: torch.Tensor, value_weights: torch.Tensor, alpha: float, beta: float, own: torch.Tensor | None = None
    ) -> torch.Tensor:
        """:func:`apet_logits` of the trained parts (:func:`trained_parts`), (E, M, N); ``own`` (M,):
        each query's own key, left out of its cache term (leave-one-out)."""
        E, M, N = self.text.shape
        r = torch.bmm(self.refined, res.transpose(1, 2))  # (E, M, N): q_idx r_n
        K = self.sims.shape[2] // N
        a = torch.exp(-beta * (1.0 - (self.sims + r.repeat_interleave(K, dim=2)))) * value_weights[:, None, :]
        if own is not None:
            a = a.masked_fill(F.one_hot(own, a.shape[2]).bool()[None], 0.0)
        return TEXT_SCALE * (self.text + r) + alpha * a.reshape(E, M, N, K).sum(-1)


def train(
    space: TextSpace,
    recipe: Recipe,
    seed: int,
    *,
    keys: torch.Tensor | None = None,
    views: torch.Tensor | None = None,
    stop: int | None = None,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Trained:
    """Train the residual and the value weights for E episodes at once (module docstring).

    ``keys`` (E, S, D): cache keys in place of the embedded support (the mean of stored views);
    ``views`` (E, V, S, D) embedded views: each epoch queries every shot with one of its views
    drawn at random (else with the shot itself). The cosine schedule spans ``recipe.epochs``;
    training stops after ``stop`` (default: all) epochs, so a refit to the epoch validation chose
    retraces the fit's run exactly (same seed, same batches). ``val`` = (embedded queries (E, M,
    D), way labels (E, M)) keeps the parameters of the epoch with the best mean val accuracy.
    Each step scores its batch through :class:`Products` (the support's own computed once when
    small), so no (E, S, D) tensor is formed until the end."""
    E, N, K, D = space.support.shape
    S = N * K
    k0 = space.support.reshape(E, S, D) if keys is None else keys
    idx = channels(space.weights, k0.reshape(E, N, K, D), recipe.w_sim, recipe.feat_frac, recipe.criterion)
    res = torch.zeros(E, N, idx.shape[1], dtype=k0.dtype, device=k0.device, requires_grad=True)
    vw = torch.ones(E, S, dtype=k0.dtype, device=k0.device, requires_grad=True)
    stop = recipe.epochs if stop is None else min(stop, recipe.epochs)

    def parts() -> Trained:
        with torch.no_grad():
            return Trained(*trained_parts(space.weights, k0, idx, res, vw), 0)

    if S == 0 or stop == 0:
        run = parts()
        run.epoch = stop if S else 0
        return run
    opt = torch.optim.AdamW([res, vw], lr=recipe.lr, eps=recipe.eps, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, recipe.epochs * math.ceil(S / recipe.batch_size))
    gen = torch.Generator().manual_seed(seed)
    gen_views = torch.Generator().manual_seed(seed + 1_000_003)  # its own stream: the batches do not change
    labels = torch.arange(N, device=k0.device).repeat_interleave(K)
    a, b = recipe.init_alpha, recipe.init_beta
    run, best, curve = None, -1.0, []
    pool = Products.of(k0, space.weights, k0, idx) if views is None and E * S * S <= POOL_VALUES else None
    val_products = Products.of(val[0], space.weights, k0, idx) if val is not None else None
    with single_thread(E * S * min(S, recipe.batch_size) * D):
        for epoch in range(stop):
            perm = torch.randperm(S, generator=gen).to(k0.device)
            if views is not None:
                pick = torch.randint(views.shape[1], (S,), generator=gen_views).to(k0.device)
            for i in range(0, S, recipe.batch_size):
                rows = perm[i : i + recipe.batch_size]
                if pool is not None:
                    batch = pool.rows(rows)
                else:  # (E, b, D): the shots themselves, or one view of each
                    batch = Products.of(
                        k0[:, rows] if views is None else views[:, pick[rows], rows], space.weights, k0, idx
                    )
                with torch.enable_grad():
                    logits = batch.logits(res, vw, a, b, rows if views is None and recipe.leave_one_out else None)
                    loss = F.cross_entropy(logits.reshape(-1, N), labels[rows].repeat(E), reduction="none")
                    loss = loss.reshape(E, -1).mean(1).sum()  # episodes train independently
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                sched.step()
            if val is None:
                continue
            with torch.no_grad():
                acc = float((val_products.logits(res, vw, a, b).argmax(-1) == val[1]).float().mean())
            curve.append(round(100 * acc, 2))
            if acc > best:  # the first of equal epochs (the authors' strict >)
                best, run = acc, parts()
                run.epoch = epoch + 1
    if run is None:
        run = parts()
        run.epoch = stop
    run.curve = curve
    return run


def search(q: torch.Tensor, truth: torch.Tensor, run: Trained, betas, alphas) -> tuple[dict, int]:
    """(beta, alpha) with the most right val queries (E, M) for the trained parameters, in the
    authors' loop order (beta outer, alpha inner; the first best kept); every alpha of a beta is
    scored at once (ape's :func:`~fskd.methods.adapt.ape.correct_counts`). Returns the choice and
    its count of right queries."""
    E, M, _ = q.shape
    N = run.weights.shape[1]
    text = TEXT_SCALE * torch.bmm(q, run.weights.transpose(1, 2))
    sims = torch.bmm(q, run.keys.transpose(1, 2))
    a = torch.tensor(alphas, dtype=text.dtype, device=text.device)
    step = max(1, CHUNK // (8 * E * M * N))
    best, best_count = None, -1
    for i in range(0, len(betas), step):
        chunk = betas[i : i + step]
        cache = torch.stack([torch.bmm(torch.exp(-b * (1.0 - sims)), run.values) for b in chunk])  # (G, E, M, N)
        counts = correct_counts(text, cache, truth, a).T  # (G, A): beta outer, alpha inner
        for g, row in enumerate(counts):
            top = int(row.max())
            if top > best_count:
                best_count, best = top, {"beta": chunk[g], "alpha": alphas[int((row == top).nonzero()[0])]}
    return best, best_count


class FittedAPET(FittedHead):
    """APE-T's logits (:func:`apet_logits`) on embedded queries; no keys: the text weights alone."""

    def __init__(
        self, weights: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, alpha: float, beta: float, embed
    ) -> None:
        self.weights, self.keys, self.values, self.embed = weights, keys, values, embed
        self.alpha, self.beta = float(alpha), float(beta)

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        return apet_logits(self.embed(query), self.weights, self.keys, self.values, self.alpha, self.beta)


class APET(AdaptMethod):
    """APE's class residual on refined channels and per-key value weights, trained (AdamW), then beta and alpha on validation."""

    needs_text = True
    transfers_to_new_classes = True  # classes with no shot: no cache, no residual (zero-shot)

    name = "ape-t"
    options = APETOptions

    def fit_state(self, f: Fit) -> None:
        store, config, opts, state, progress = f.store, f.config, f.opts, f.state, f.progress
        recipe = Recipe.of(opts)
        grid = {
            "beta": fixed_or(opts.beta, BETA),
            "alpha": fixed_or(opts.alpha, ALPHA if store.joint else ALPHA + ALPHA_WIDE),
        }
        fixed = {k for k in grid if len(grid[k]) == 1}  # one value: nothing to choose
        val = f.validation()
        ts = val.view_space()
        views = None if ts is None else (embed_views(ts, val.views), view_keys(ts, val.views))
        for regime, task in ((EPISODIC, val.ep_task), (ALLWAY, val.aw_task)):
            kv = views if regime == ALLWAY else None
            self._fit_regime(state, regime, task, val.spaces[regime], recipe, grid, fixed, config.seed, kv)
            state.metrics[f"{regime}.channels"] = n_channels(store.dim, opts.feat_frac)
            if progress and task is not None:
                progress(f"ape-t {regime}", 1, 1, {"val_acc": state.metrics.get(f"{regime}.val_acc")})
        for k, v in vars(recipe).items():  # the epochs option is the budget: each regime keeps its best epoch
            name = "epoch_budget" if k == "epochs" else k
            state.hparams[name] = v
            state.selected_on[name] = "fixed (--set option)" if k in config.options else FIXED
        given = opts.beta is not None or opts.alpha is not None
        sizes = "x".join(str(len(grid[k])) for k in ("beta", "alpha")) if given else None
        record_grid(state, sizes, GRID_JOINT if store.joint else GRID_BRIDGE, "alphas")
        state.hparams["normalisation"] = NORMALISATION
        state.selected_on["normalisation"] = "fixed (the authors' code)"
        record_views(state, ALLWAY, val.views, val.why)

    @staticmethod
    def _fit_regime(
        state: MethodState,
        regime: str,
        task: Task | None,
        space,
        recipe: Recipe,
        grid: dict,
        fixed: set,
        seed: int,
        views: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        """Train on the regime's validation task (the epoch kept by its val accuracy), then search
        (beta, alpha) there; no validation data (or no shot): all epochs, the authors' init values."""
        if task is None or task.shot == 0:
            default = {
                "epochs": recipe.epochs,
                **{k: grid[k][0] if k in fixed else getattr(recipe, f"init_{k}") for k in ("beta", "alpha")},
            }
            record(state, regime, grid_search([], lambda c: 0.0, None, default), fixed)
            for k in ("beta", "alpha"):
                if k not in fixed:
                    state.selected_on[f"{regime}.{k}"] = (
                        "default (no validation data): the authors' init_beta / init_alpha"
                    )
            return
        ts = space(task.support, task.classes)
        q = ts.embed(task.query)
        embedded, keys = views if views is not None else (None, None)
        run = train(ts, recipe, seed, keys=keys, views=embedded, val=(q, task.truth))
        table = [{"epochs": e + 1, "val_acc": a} for e, a in enumerate(run.curve)]
        record(state, regime, Choice({"epochs": run.epoch}, max(run.curve) / 100, task.on, task.description, table))
        best, count = search(q, task.truth, run, grid["beta"], grid["alpha"])
        on = f"{task.on}, with the trained parameters"
        record(state, regime, Choice(best, count / q.shape[0] / q.shape[1], on, task.description), fixed)
        if regime == ALLWAY:
            keep_allway_head(state, task, {"weights": run.weights, "keys": run.keys, "values": run.values})

    def make_head(self, state: MethodState, store, device: torch.device):
        text, bridge = state_text(state, device)
        recipe = Recipe.of({**state.hparams, "epochs": state.hparams["epoch_budget"]})
        seed = int(state.config.get("seed", 1))

        def make(regime: str):
            alpha, beta, epochs = (hp(state, regime, k) for k in ("alpha", "beta", "epochs"))

            def fit(support, classes):
                ts = regime_text_space(state, store, regime, support, classes, bridge, text)
                kept = kept_allway_head(state, support, classes) if regime == ALLWAY else None
                if kept is not None:
                    return FittedAPET(kept["weights"], kept["keys"], kept["values"], alpha, beta, ts.embed)
                run = train(ts, recipe, seed, stop=epochs)  # no shot: S = 0, the text weights alone
                return FittedAPET(run.weights, run.keys, run.values, alpha, beta, ts.embed)

            return fit

        return RegimeHead(self.name, learned_mask(store, device), make(EPISODIC), make(ALLWAY), needs_text=True)


METHODS.register("ape-t", APET)
