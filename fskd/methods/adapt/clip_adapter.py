"""``clip-adapter``: CLIP-Adapter as its authors wrote it (Gao et al., "CLIP-Adapter: Better
Vision-Language Models with Feature Adapters", IJCV 2024; authors' code:
github.com/gaopengcuhk/CLIP-Adapter, ``clip_adapter.py``, run with CoOp's Dassl trainer and config).

    A(x) = relu(relu(x W1) W2)                      W1 (D, D/4), W2 (D/4, D), no biases
    x'   = ratio * A(x) + (1 - ratio) * x           ratio 0.2 (the authors' forward)
    logits_k(x) = scale * <x' / |x'|, t_k / |t_k|>   t_k: class k's text weight, frozen

Only W1 and W2 learn: cross-entropy on the shots with CoOp's recipe (the authors' README: "follow
CoOp's command"): SGD lr 0.002, momentum 0.9, weight decay 5e-4, shuffled batches of 32 (the last
short batch dropped once the shots fill one), one warm-up epoch at a constant 1e-5 then a cosine
over the epochs, stepped per epoch; 50 epochs at 1 shot, 100 at 2-4, 200 above (CoOp's scripts);
the last epoch's adapter kept. W1 and W2 start as ``nn.Linear``'s default draw (uniform in
+-1/sqrt(fan_in)), from a generator seeded with the fit's seed. ``scale`` is CLIP's trained
logit scale, 100 (``--set logit_scale``: another model's).

The adapter has no biases and ReLU is positively homogeneous, so x' scales with x and the logits do
not depend on a row's norm: the authors' raw image features and the store's L2-normalised rows
give the same fit. A store whose image and text spaces differ (the offline pair) works in fskd's
bridge space (rows centred on the support mean, the text weights through the support's bridge),
as every text method here.

No validation data is used unless ``ratio`` is a list: then the ratio is chosen on validation (the
all-way task's val rows, val-class episodes in the episodic regime), fskd's addition (the paper
tunes it per dataset). Every candidate ratio trains in the same batch as the others and sees the
same shuffles and view draws, so refitting the winner gives the head the search scored.

Rows: one per shot; with the store's augmented views of the shots (``fskd extract
--augment-views``) each epoch shows every shot as one of its views, as Dassl's loader re-augments
every epoch.

Batched: every episode (and every candidate ratio) trains its own adapter in one (E, D, D/4)
tensor; the loss is the sum over episodes of each episode's mean cross-entropy, so each episode's
gradient, momentum and decay are its own. ``benchmarks/authors_inputs_clip_adapter.py`` exports a
fit's inputs and every draw for the comparison with the authors' trainer
(docs/bench/parity_clip_adapter_authors.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fskd.classifiers.base import FittedHead
from fskd.classifiers.cache import TEXT_SCALE
from fskd.methods.adapt.clap import FittedCosine
from fskd.methods.adapt.coop import dassl_lr, epochs_for
from fskd.methods.adapt.method import AdaptMethod, AdaptOptions, Fit
from fskd.methods.adapt.regimes import (
    ALLWAY,
    EPISODIC,
    RegimeHead,
    Task,
    keep_allway_head,
    kept_allway_head,
    learned_mask,
)
from fskd.methods.adapt.text_space import TextSpace, regime_text_space, shot_rows, state_text
from fskd.methods.adapt.validation import VAL_RANGES, Choice, check_val_options, grid_search, hp
from fskd.methods.base import METHODS, MethodState
from fskd.runtime import single_thread

RATIO = 0.2
RECIPE = (
    "the authors' clip_adapter.py (ratio 0.2, reduction 4) on CoOp's Dassl config: SGD lr 0.002, momentum 0.9, "
    "weight decay 5e-4, batch 32, 1 warm-up epoch at 1e-5 then cosine, CoOp's epochs by shots"
)
NORMALISATION = (
    "none before the adapter (it is scale-free: no biases, ReLU); the adapted row and the text weights "
    "L2-normalised in every forward pass (the authors' CustomCLIP); a non-joint store's rows are centred on "
    "the support mean first (fskd's bridge space)"
)


@dataclass(frozen=True)
class ClipAdapterOptions(AdaptOptions):
    ratio: float | tuple[float, ...] = RATIO  # residual ratio (the authors' 0.2; a list: chosen on validation)
    reduction: int = 4  # bottleneck width = D / reduction (the authors' 4)
    epochs: int | None = None  # passes over the shots (null: CoOp's 50 at 1 shot, 100 at 2-4, 200 above)
    batch_size: int = 32  # shots per SGD step (CoOp's; the last short batch dropped once one is full)
    lr: float = 0.002  # SGD learning rate after the warm-up (CoOp's)
    momentum: float = 0.9  # SGD momentum (CoOp's)
    weight_decay: float = 5e-4  # SGD weight decay (CoOp's)
    warmup_lr: float = 1e-5  # learning rate of the one warm-up epoch (CoOp's)
    logit_scale: float = TEXT_SCALE  # CLIP's trained exp(logit_scale), 100
    ridge: float | None = None
    val_way: int = 5
    val_query: int = 15
    val_episodes: int = 300

    RANGES = {
        "ratio": (">=", 0),
        "reduction": (">=", 1),
        "epochs": (">=", 0),
        "batch_size": (">=", 1),
        "lr": (">", 0),
        "momentum": (">=", 0),
        "weight_decay": (">=", 0),
        "warmup_lr": (">", 0),
        "logit_scale": (">", 0),
        "ridge": (">", 0),
        **VAL_RANGES,
    }

    def __post_init__(self) -> None:
        check_val_options(self)


RECIPE_KEYS = ("reduction", "epochs", "batch_size", "lr", "momentum", "weight_decay", "warmup_lr", "logit_scale")


def init_weights(D: int, hidden: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``nn.Linear(bias=False)``'s default draw, seeded: W1 (D, h) uniform in +-1/sqrt(D), W2 (h, D)
    uniform in +-1/sqrt(h) (stored input-major: x @ W)."""
    g = torch.Generator().manual_seed(int(seed))
    w1 = (torch.rand(hidden, D, generator=g) * 2 - 1) / math.sqrt(D)
    w2 = (torch.rand(D, hidden, generator=g) * 2 - 1) / math.sqrt(hidden)
    return w1.T.contiguous(), w2.T.contiguous()


def adapt(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """x (E, n, D), w1 (E, D, h), w2 (E, h, D), ratio (E, 1, 1) -> the blended rows (E, n, D)."""
    return ratio * torch.relu(torch.bmm(torch.relu(torch.bmm(x, w1)), w2)) + (1 - ratio) * x


def train_adapters(
    rows: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    ratios: Sequence[float],
    seed: int,
    epochs: int,
    recipe: dict,
    orders: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapters of every episode for every ratio: W1 (A, E, D, h), W2 (A, E, h, D).

    rows (E, V, S, D): V >= 1 rows of each of S shots (V > 1: stored views, one drawn per shot per
    epoch); y (E, S) way labels; t (E, N, D) the text weights. The draws (shuffles, views) come from
    generators seeded with ``seed`` and depend on S and V only, so every ratio and every episode
    sees the same batches; ``orders``, when a list, receives each epoch's (order, view pick)."""
    E, V, S, D = rows.shape
    N, A = t.shape[1], len(ratios)
    hidden = max(1, D // int(recipe["reduction"]))
    w1_0, w2_0 = init_weights(D, hidden, seed)
    w1 = w1_0.to(rows)[None].repeat(A * E, 1, 1).requires_grad_(True)
    w2 = w2_0.to(rows)[None].repeat(A * E, 1, 1).requires_grad_(True)
    ratio = torch.tensor([float(r) for r in ratios], dtype=rows.dtype, device=rows.device)
    ratio = ratio.repeat_interleave(E)[:, None, None]
    tn = F.normalize(t, dim=-1).repeat(A, 1, 1)
    yy = y.repeat(A, 1)
    opt = torch.optim.SGD([w1, w2], lr=recipe["lr"], momentum=recipe["momentum"], weight_decay=recipe["weight_decay"])
    bs = min(int(recipe["batch_size"]), S)
    stop = (S // bs) * bs if S >= recipe["batch_size"] else S  # Dassl drops the short batch once one is full
    gen = torch.Generator().manual_seed(int(seed))
    gen_views = torch.Generator().manual_seed(int(seed) + 1_000_003)
    scale = float(recipe["logit_scale"])
    with torch.enable_grad(), single_thread() if A * E * S * D < 2**18 else contextlib.nullcontext():
        for epoch in range(epochs):
            for g in opt.param_groups:
                g["lr"] = dassl_lr(epoch, epochs, recipe["lr"], recipe["warmup_lr"])
            perm = torch.randperm(S, generator=gen)
            pick = torch.randint(V, (S,), generator=gen_views) if V > 1 else None
            if orders is not None:
                orders.append((perm, pick))
            x = rows[:, 0] if pick is None else rows[:, pick.to(rows.device), torch.arange(S, device=rows.device)]
            x = x.repeat(A, 1, 1)
            perm = perm.to(rows.device)
            for i in range(0, stop, bs):
                idx = perm[i : i + bs]
                xa = F.normalize(adapt(x[:, idx], w1, w2, ratio), dim=-1)
                logits = scale * torch.bmm(xa, tn.transpose(1, 2))
                loss = F.cross_entropy(logits.reshape(-1, N), yy[:, idx].reshape(-1), reduction="none")
                loss = loss.reshape(A * E, -1).mean(1).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return w1.detach().reshape(A, E, D, hidden), w2.detach().reshape(A, E, hidden, D)


class FittedAdapter(FittedHead):
    """scale * cos(A-blended embedded query, text weight)."""

    def __init__(self, weights, embed, w1, w2, ratio: float, scale: float) -> None:
        self.weights, self.embed = F.normalize(weights, dim=-1), embed
        self.w1, self.w2, self.scale = w1, w2, scale
        self.ratio = torch.full((w1.shape[0], 1, 1), float(ratio), dtype=w1.dtype, device=w1.device)

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        q = F.normalize(adapt(self.embed(query), self.w1, self.w2, self.ratio), dim=-1)
        return self.scale * torch.bmm(q, self.weights.transpose(1, 2))


def fit_adapters(ts: TextSpace, ratios: Sequence[float], seed: int, recipe: dict, views=None, orders=None):
    """(W1, W2) of a text space's support for each ratio, with the recipe's epochs (null: CoOp's
    epochs for the support's K)."""
    epochs = recipe["epochs"] if recipe["epochs"] is not None else epochs_for(ts.support.shape[2])
    rows, y = shot_rows(ts, views)
    return train_adapters(rows, y, ts.weights, ratios, seed, epochs, recipe, orders)


def search_ratio(task: Task | None, space, ratios, default: dict, seed: int, recipe: dict, views=None) -> Choice:
    """The ratio by accuracy on ``task`` (every ratio trained in one batch); ``fitted``: the winner's adapter."""
    if task is None or task.shot == 0:
        return grid_search([], lambda c: 0.0, None, default)
    ts = space(task.support, task.classes)
    w1, w2 = fit_adapters(ts, ratios, seed, recipe, views)
    acc = {}
    for i, r in enumerate(ratios):
        head = FittedAdapter(ts.weights, ts.embed, w1[i], w2[i], r, recipe["logit_scale"])
        acc[i] = task.accuracy(head.logits(task.query))
    cands = [{"ratio": float(r)} for r in ratios]
    choice = grid_search(cands, lambda c: acc[cands.index(c)], task, default)
    if choice.score is not None:
        i = cands.index(choice.params)
        choice.fitted = (w1[i], w2[i])
    return choice


class ClipAdapter(AdaptMethod):
    """CLIP-Adapter: a residual bottleneck MLP on the image features, the frozen text weights as classifier."""

    needs_text = True
    transfers_to_new_classes = True  # the adapter is class-agnostic; a new class is its text weight

    name = "clip-adapter"
    options = ClipAdapterOptions

    def fit_state(self, f: Fit) -> None:
        config, opts, state = f.config, f.opts, f.state
        user = set(config.options)
        recipe = {k: getattr(opts, k) for k in RECIPE_KEYS}
        for k, v in recipe.items():
            state.hparams[k] = v
            state.selected_on[k] = "fixed (--set option)" if k in user else f"fixed ({RECIPE})"
        if opts.epochs is None:
            state.selected_on["epochs"] += "; null: 50 epochs at 1 shot, 100 at 2-4, 200 above, by each support's K"
        state.hparams["init"] = "nn.Linear's default draw, seeded with --seed"
        state.selected_on["init"] = "fixed (the authors' Adapter: nn.Linear(bias=False))"
        state.hparams["normalisation"] = NORMALISATION
        state.selected_on["normalisation"] = "fixed (the authors' code)"

        def train(ts, ratio, views):
            w1, w2 = fit_adapters(ts, [ratio], config.seed, recipe, views)
            return w1[0], w2[0]

        kept = f.fixed_or_chosen(
            "ratio",
            opts.ratio,
            RATIO,
            RECIPE,
            lambda task, space, cands, first, views: search_ratio(
                task, space, cands, first, config.seed, recipe, views
            ),
            train,
        )
        if config.shots > 0:
            state.hparams["allway.epochs"] = opts.epochs if opts.epochs is not None else epochs_for(config.shots)
            state.selected_on["allway.epochs"] = state.selected_on["epochs"]
        if kept is not None:
            keep_allway_head(state, kept[0], {"w1": kept[1][0], "w2": kept[1][1]})

    def make_head(self, state: MethodState, store, device: torch.device):
        text, bridge = state_text(state, device)
        recipe = {k: state.hparams[k] for k in RECIPE_KEYS}
        seed = int(state.config.get("seed", 1))

        def make(regime: str):
            ratio = float(hp(state, regime, "ratio"))

            def fit(support, classes):
                ts = regime_text_space(state, store, regime, support, classes, bridge, text)
                K = ts.support.shape[2]
                if K == 0:  # no shot, nothing to train: the text weights (zero-shot)
                    return FittedCosine(ts.weights, ts.embed)
                kept = kept_allway_head(state, support, classes) if regime == ALLWAY else None
                if kept is not None:
                    w1, w2 = kept["w1"], kept["w2"]
                else:
                    w1, w2 = (w[0] for w in fit_adapters(ts, [ratio], seed, recipe))
                return FittedAdapter(ts.weights, ts.embed, w1, w2, ratio, recipe["logit_scale"])

            return fit

        return RegimeHead(self.name, learned_mask(store, device), make(EPISODIC), make(ALLWAY), needs_text=True)


METHODS.register("clip-adapter", ClipAdapter)
