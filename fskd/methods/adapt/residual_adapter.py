"""``residual-adapter``: MTKD stage 2, a CLIP-Adapter-style residual bottleneck MLP after the
frozen encoder (the teacher, or a distilled student's features in its store),

    A(e) = ratio * relu(relu(e W1) W2) + (1 - ratio) * e,    e = normalize(x - c)

trained with class weights (initialised at the class prototypes) by cross-entropy on cosine
logits. The residual ratio and the number of full-batch Adam steps are chosen on validation
data (step 0 is the prototype classifier on e). CLIP-Adapter as its authors wrote it (frozen text
weights, SGD in batches) is ``clip-adapter`` (:mod:`fskd.methods.adapt.clip_adapter`).

- Episodic regime: the adapter is trained on every row of the base classes (c = the base
  mean); novel episodes are classified by prototypes of the adapted features (SimpleShot,
  centred on the adapted base mean). Hyper-parameters from val-class episodes.
- All-way regime: a fresh adapter and class weights are trained on the support itself
  (c = the support mean), hyper-parameters from the val split (K train shots per class).

``features`` (what ``fskd align --base-state DIR`` builds on) returns raw features -> A(e) of
one adapter stored in the state: by default (``--set features=auto``) the one trained at fit
time on ``--shots`` K train shots of every class (all-way pipelines); with ``features=base``
(or ``--shots 0``) the one trained on the base classes, which never saw a val or novel label
(base -> novel pipelines). For a joint (CLIP) store c = 0, so the adapted features stay in
the text's space.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fskd.classifiers.base import FittedHead
from fskd.classifiers.linear import train_steps
from fskd.errors import ConfigError
from fskd.methods.adapt.method import AdaptMethod, AdaptOptions, Fit
from fskd.methods.adapt.regimes import (
    ALLWAY,
    EPISODIC,
    RegimeHead,
    learned_mask,
    prototypes,
    require_shots,
    support_center,
)
from fskd.methods.adapt.validation import VAL_RANGES, check_val_options, fixed_or, grid_search, hp, record
from fskd.methods.base import METHODS, MethodState
from fskd.runtime import single_thread
from fskd.store import sampling

RATIO = (0.2, 0.5)
STEPS = (0, 10, 25, 50)
SCALE = 10.0
FEATURES = ("auto", "shots", "base")


@dataclass(frozen=True)
class ResidualAdapterOptions(AdaptOptions):
    ratio: float | tuple[float, ...] | None = None  # residual ratio (default: a grid chosen on validation)
    steps: int | tuple[int, ...] | None = None  # full-batch Adam steps (default: a grid chosen on validation)
    reduction: int = 4  # bottleneck width = dim / reduction (CLIP-Adapter: 4)
    batch: int = 256  # rows per step when training on more rows than this (the base classes)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    features: str = "auto"  # which adapter `features` exposes: auto | shots | base
    val_way: int = 5
    val_query: int = 15
    val_episodes: int = 300

    RANGES = {
        "ratio": (">=", 0),
        "steps": (">=", 0),
        "reduction": (">=", 1),
        "batch": (">=", 1),
        "lr": (">", 0),
        "weight_decay": (">=", 0),
        **VAL_RANGES,
    }

    def __post_init__(self) -> None:
        check_val_options(self)
        if self.features not in FEATURES:
            raise ConfigError(f"features must be one of {', '.join(FEATURES)}, got {self.features!r}")
        if self.reduction < 1 or self.batch < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("reduction >= 1, batch >= 1, lr > 0 and weight_decay >= 0 are required")
        if self.ratio is not None:
            rs = self.ratio if isinstance(self.ratio, tuple) else (self.ratio,)
            if any(not 0 <= r <= 1 for r in rs):
                raise ConfigError(f"ratio must be in [0, 1], got {self.ratio}")


@dataclass
class AdapterWeights:
    """w1 (E, D, h), w2 (E, h, D), class weights (E, N, D); ratio."""

    w1: torch.Tensor
    w2: torch.Tensor
    classes: torch.Tensor
    ratio: float

    def apply(self, e: torch.Tensor) -> torch.Tensor:
        """(E, n, D) embedded -> (E, n, D) adapted (not normalised)."""
        h = torch.relu(torch.bmm(torch.relu(torch.bmm(e, self.w1)), self.w2))
        return self.ratio * h + (1.0 - self.ratio) * e


def init_adapter(E: int, dim: int, hidden: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear's default (Kaiming-uniform) initialisation, seeded, the same for every episode."""
    g = torch.Generator().manual_seed(seed)
    b1, b2 = 1 / math.sqrt(dim), 1 / math.sqrt(hidden)
    w1 = (torch.rand(dim, hidden, generator=g) * 2 - 1) * b1
    w2 = (torch.rand(hidden, dim, generator=g) * 2 - 1) * b2
    return w1[None].repeat(E, 1, 1).to(device), w2[None].repeat(E, 1, 1).to(device)


def train_adapter(
    e: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    *,
    ratio: float,
    steps,
    lr: float,
    weight_decay: float,
    reduction: int,
    seed: int,
    batch: int = 256,
) -> dict[int, AdapterWeights]:
    """Batched adapters: e (E, n, D) embedded training rows, y (E, n) class index in [0, N).
    Returns the weights after each step count in ``steps``. Each step sees ``batch`` random rows
    (all of them when n <= batch, as for a support set). Deterministic for a seed."""
    E, n, D = e.shape
    steps = sorted(set(int(s) for s in steps))
    w1, w2 = init_adapter(E, D, max(1, D // reduction), seed, e.device)
    onehot = F.one_hot(y, n_classes).to(e.dtype)  # (E, n, N)
    protos = F.normalize(torch.bmm(onehot.transpose(1, 2), e), dim=-1)  # (E, N, D)
    w1, w2, wc = (t.clone().requires_grad_(True) for t in (w1, w2, protos))

    def snap() -> AdapterWeights:
        return AdapterWeights(w1.detach().clone(), w2.detach().clone(), wc.detach().clone(), ratio)

    out = {0: snap()}
    if not steps or steps[-1] == 0:
        return {s: out[0] for s in steps}
    opt = torch.optim.AdamW([w1, w2, wc], lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed + 1)
    small = E * min(n, batch) * D < 2**18  # tiny steps: threads cost more than they give

    def loss(step: int) -> torch.Tensor:
        eb, yb = e, y
        if n > batch:
            idx = torch.randperm(n, generator=gen)[:batch].to(e.device)
            eb, yb = e[:, idx], y[:, idx]
        cur = AdapterWeights(w1, w2, wc, ratio)
        logits = SCALE * torch.bmm(F.normalize(cur.apply(eb), dim=-1), F.normalize(wc, dim=-1).transpose(1, 2))
        return (
            F.cross_entropy(logits.reshape(-1, n_classes), yb.reshape(-1), reduction="none")
            .reshape(E, -1)
            .mean(1)
            .sum()
        )

    with torch.enable_grad(), single_thread() if small else contextlib.nullcontext():
        return train_steps(opt, loss, steps, snap, out)


class FittedAdapted(FittedHead):
    """Cosine scores of adapted queries against per-episode class weights (E, N, D)."""

    def __init__(self, weights: torch.Tensor, features) -> None:
        self.weights, self.features = F.normalize(weights, dim=-1), features

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        return SCALE * torch.bmm(self.features(query), self.weights.transpose(1, 2))


class ResidualAdapter(AdaptMethod):
    """Residual MLP adapter on frozen features with learned class weights (MTKD stage 2)."""

    name = "residual-adapter"
    options = ResidualAdapterOptions

    def fit_state(self, f: Fit) -> None:
        store, config, opts, device, state, progress = f.store, f.config, f.opts, f.device, f.state, f.progress
        ratios, steps = fixed_or(opts.ratio, RATIO), fixed_or(opts.steps, STEPS)
        fixed = {k for k, v in (("ratio", opts.ratio), ("steps", opts.steps)) if v is not None}
        default = {"ratio": ratios[0], "steps": steps[len(steps) // 2]}
        train = dict(
            lr=opts.lr, weight_decay=opts.weight_decay, reduction=opts.reduction, seed=config.seed, batch=opts.batch
        )
        tensors: dict[str, torch.Tensor] = {}

        # episodic: one adapter per ratio trained on the base classes, checkpoints scored on val episodes
        base = sorted(store.class_split("base"))
        ep_task = f.episodic_task()
        if base:
            xb, yb_np = store.gather(base, max_per_class=sampling.CLASS_ROWS)
            x = torch.from_numpy(xb).to(device)
            center = torch.zeros(store.dim, device=device) if store.joint else x.mean(0)
            e = F.normalize(x - center, dim=-1)[None]
            del x, xb  # the raw rows (360,000 x 512 at ImageNet scale): only their embedding is used
            pos = {c: i for i, c in enumerate(base)}
            yb = torch.tensor([pos[int(c)] for c in yb_np], device=device)[None]
            runs = {r: train_adapter(e, yb, len(base), ratio=r, steps=steps, **train) for r in ratios}
            if progress:
                progress("residual-adapter base", 1, 1, {})

            def ep_score(c):
                aw = runs[c["ratio"]][c["steps"]]
                sup, qry = ep_task.mapped(_episodic_features(aw, center, e))
                return ep_task.accuracy(torch.bmm(qry, prototypes(sup).transpose(1, 2)))

            ep = grid_search([{"ratio": r, "steps": s} for r in ratios for s in steps], ep_score, ep_task, default)
            chosen = runs[ep.params["ratio"]][ep.params["steps"]]
            tensors.update(_pack("base.", chosen, center))
            tensors["base.adapted_mean"] = chosen.apply(e)[0].mean(0)
        else:
            ep = grid_search([], lambda c: 0.0, None, default)

        # all-way: adapters trained on K train shots of every class, scored on the val split
        aw_task = f.allway_task() if config.shots > 0 else None
        if aw_task is not None:
            runs_aw = {r: _train_on_support(aw_task.support, store.joint, r, steps, train) for r in ratios}

            def aw_score(c):
                aw, cen = runs_aw[c["ratio"]]
                return aw_task.accuracy(
                    FittedAdapted(aw[c["steps"]].classes, _support_features(aw[c["steps"]], cen)).logits(aw_task.query)
                )

            aw = grid_search([{"ratio": r, "steps": s} for r in ratios for s in steps], aw_score, aw_task, default)
            adapters, cen = runs_aw[aw.params["ratio"]]
            tensors.update(_pack("shots.", adapters[aw.params["steps"]], cen[0, 0]))
        else:
            aw = grid_search([], lambda c: 0.0, None, default)
        record(state, EPISODIC, ep, fixed)
        record(state, ALLWAY, aw, fixed)
        for k in ("reduction", "lr", "weight_decay", "batch"):
            state.hparams[k] = getattr(opts, k)
            state.selected_on[k] = "fixed"
        use = opts.features if opts.features != "auto" else ("shots" if "shots.w1" in tensors else "base")
        if f"{use}.w1" not in tensors:
            raise ConfigError(
                f"features={use}: no adapter was trained for it "
                f"({'--shots is 0' if use == 'shots' else 'the store has no base classes'})"
            )
        state.hparams["features"] = use
        state.selected_on["features"] = "fixed (--set features)" if opts.features != "auto" else "auto"
        state.metrics["features"] = (
            "adapter trained on the base classes"
            if use == "base"
            else f"adapter trained on {config.shots} train shots of every class (seed {config.seed})"
        )
        state.tensors = {k: v.detach().cpu() for k, v in tensors.items()}

    def make_head(self, state: MethodState, store, device: torch.device):
        train = dict(
            lr=state.hparams["lr"],
            weight_decay=state.hparams["weight_decay"],
            reduction=state.hparams["reduction"],
            seed=state.config.get("seed", 1),
            batch=state.hparams["batch"],
        )
        t = {k: v.to(device) for k, v in state.tensors.items()}

        def episodic(support, classes):
            require_shots(support, self.name)
            aw, center = _unpack("base.", t, hp(state, EPISODIC, "ratio"))
            feats = _centred_adapted(aw, center, t["base.adapted_mean"])
            return FittedAdapted(prototypes(feats(support)), feats)

        def allway(support, classes):
            require_shots(support, self.name)
            ratio, steps = hp(state, ALLWAY, "ratio"), hp(state, ALLWAY, "steps")
            runs, cen = _train_on_support(support, store.joint, ratio, [steps], train)
            return FittedAdapted(runs[steps].classes, _support_features(runs[steps], cen))

        # without base classes nothing was learned beforehand: every call learns from its support
        return RegimeHead(self.name, learned_mask(store, device), episodic if "base.w1" in t else allway, allway)

    def features(self, state: MethodState, store, device: torch.device):
        use = state.hparams["features"]
        t = {k: v.to(device) for k, v in state.tensors.items()}
        aw, center = _unpack(f"{use}.", t, state.hparams[f"{EPISODIC if use == 'base' else ALLWAY}.ratio"])

        def fmap(x: torch.Tensor) -> torch.Tensor:
            """raw (n, D) -> adapted (n, D)."""
            return aw.apply(F.normalize(x - center, dim=-1)[None])[0]

        return fmap


def _pack(prefix: str, aw: AdapterWeights, center: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}w1": aw.w1[0],
        f"{prefix}w2": aw.w2[0],
        f"{prefix}classes": aw.classes[0],
        f"{prefix}center": center,
    }


def _unpack(prefix: str, t: dict, ratio: float) -> tuple[AdapterWeights, torch.Tensor]:
    return AdapterWeights(t[f"{prefix}w1"][None], t[f"{prefix}w2"][None], t[f"{prefix}classes"][None], ratio), t[
        f"{prefix}center"
    ]


def _centred_adapted(aw: AdapterWeights, center: torch.Tensor, adapted_mean: torch.Tensor):
    """raw (..., D) -> normalize(A(normalize(x - c)) - adapted base mean): SimpleShot on A."""
    w1, w2 = aw.w1[0], aw.w2[0]

    def f(x: torch.Tensor) -> torch.Tensor:
        e = F.normalize(x - center, dim=-1)
        h = torch.relu(torch.relu(e @ w1) @ w2)
        return F.normalize(aw.ratio * h + (1 - aw.ratio) * e - adapted_mean, dim=-1)

    return f


def _episodic_features(aw: AdapterWeights, center: torch.Tensor, e_base: torch.Tensor):
    return _centred_adapted(aw, center, aw.apply(e_base)[0].mean(0))


def _train_on_support(support: torch.Tensor, joint: bool, ratio: float, steps, train: dict):
    """Adapters trained on each episode's support (E, N, K, D); returns ({step: weights}, centre (E, 1, D))."""
    E, N, K, D = support.shape
    center = torch.zeros(E, 1, D, device=support.device) if joint else support_center(support)
    e = F.normalize(support.reshape(E, N * K, D) - center, dim=-1)
    y = torch.arange(N, device=support.device).repeat_interleave(K)[None].expand(E, -1)
    return train_adapter(e, y, N, ratio=ratio, steps=steps, **train), center


def _support_features(aw: AdapterWeights, center: torch.Tensor):
    def f(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(aw.apply(F.normalize(x - center, dim=-1)), dim=-1)

    return f


METHODS.register("residual-adapter", ResidualAdapter)
