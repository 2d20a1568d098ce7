"""``linear-probe``: one method, two recipes (``--set recipe=NAME``).

- ``published`` (the default): the probe as the CLIP few-shot papers run it, CoOp's lpclip
  all-way and RFS's per episode (:class:`~fskd.methods.adapt.lpclip.LPClip`, ``lpclip.py``).
- ``tuned``: fskd's own probe (:class:`LinearProbeTuned`, below): logistic regression on the
  support features (centred, L2-normalised), initialised at the class prototypes with an L2
  pull towards them; weight decay and the number of full-batch Adam steps are chosen on
  validation data (step 0 is the prototype classifier), batched over episodes and settings.
  Episodic regime: centred on the base-class mean, hyper-parameters from val-class episodes.
  All-way regime: centred on the support mean, hyper-parameters from the val split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fskd.classifiers.linear import (
    GROUP_VALUES,
    SCALE,
    FittedLinear,
    LinearParams,
    Projections,
    dual_inputs,
    params_of,
    train_dual,
    train_linear,
    way_labels,
)
from fskd.errors import ConfigError
from fskd.methods.adapt.lpclip import LPClip
from fskd.methods.adapt.method import AdaptMethod, AdaptOptions, Fit
from fskd.methods.adapt.regimes import (
    ALLWAY,
    EPISODIC,
    RegimeHead,
    Task,
    centred,
    keep_allway_head,
    kept_allway_head,
    learned_mask,
    prototypes,
    require_shots,
    support_center,
)
from fskd.methods.adapt.text_space import TextSpace
from fskd.methods.adapt.validation import VAL_RANGES, Choice, check_val_options, fixed_or, grid_search, hp, record
from fskd.methods.base import METHODS, MethodState, RecipeMethod

WEIGHT_DECAY = (1e-3, 1e-2, 1e-1, 1.0)
STEPS = (0, 10, 25, 50, 100, 200)


@dataclass(frozen=True)
class LinearProbeOptions(AdaptOptions):
    weight_decay: float | tuple[float, ...] | None = None  # one value or a list (default: a grid chosen on validation)
    steps: int | tuple[int, ...] | None = None  # full-batch Adam steps (default: a grid chosen on validation)
    lr: float = 0.1

    RANGES = {
        "weight_decay": (">=", 0),
        "steps": (">=", 0),
        "lr": (">", 0),
        **VAL_RANGES,
    }
    val_way: int = 5
    val_query: int = 15
    val_episodes: int = 300

    def __post_init__(self) -> None:
        check_val_options(self)
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")


def probe_params(
    support: torch.Tensor,
    *,
    steps,
    lr: float,
    weight_decay: float,
    text: torch.Tensor | None = None,
    alpha0: float | None = None,
) -> dict[int, LinearParams]:
    """Probes for embedded support (E, N, K, D); zero weights (text only) when K = 0."""
    E, N, K, D = support.shape
    w0 = prototypes(support) if K > 0 else torch.zeros(E, N, D, device=support.device)
    return train_linear(
        support.reshape(E, N * K, D),
        way_labels(E, N, K, support.device),
        w0,
        steps=steps,
        lr=lr,
        weight_decay=weight_decay,
        text=text,
        alpha0=alpha0,
    )


def search_probe(
    task: Task | None, space: Callable, *, alphas, weight_decays, steps, lr: float, default: dict
) -> Choice:
    """Grid over (alpha0, weight_decay) x checkpoints of ``steps``, scored on ``task``.

    ``space(support, classes)`` -> TextSpace (weights None for a plain linear probe). The
    grid trains as batches of settings (episodes x settings, in groups of at most
    ``GROUP_VALUES`` scores): every episode-setting pair is independent under Adam, so this
    equals separate runs at a fraction of the overhead. ``Choice.fitted`` holds the winning
    probe (its ``LinearParams``): on the all-way task it is the head for the task's own shots.
    """
    if task is None:
        return grid_search([], lambda c: 0.0, None, default)
    ts = space(task.support, task.classes)
    q = ts.embed(task.query)
    E, N, K, D = ts.support.shape
    w0 = prototypes(ts.support) if K > 0 else torch.zeros(E, N, D, device=q.device)
    x = ts.support.reshape(E, N * K, D)
    proj = Projections.of(q, w0, x, ts.weights)
    settings = [(a, w) for a in alphas for w in weight_decays]
    gram, p0, pt = dual_inputs(x, w0, ts.weights)
    y = way_labels(E, N, K, q.device)
    per_group = max(1, int(GROUP_VALUES // max(1, E * N * K * N)))
    probes = {}
    for g in range(0, len(settings), per_group):
        group = settings[g : g + per_group]
        G = len(group)

        # the support, its Gram matrix and projections are shared by a group's settings (batch
        # index: setting-major, then episode); coefficients, bias and alpha are per probe
        def rep(t, G=G):
            return None if t is None else (t if E == 1 else t.repeat(G, *([1] * (t.dim() - 1))))

        wd = torch.tensor([w for _, w in group], device=q.device).repeat_interleave(E)
        a0 = torch.tensor([1.0 if a is None else a for a, _ in group], device=q.device).repeat_interleave(E)
        out = train_dual(
            rep(gram),
            rep(p0),
            rep(pt),
            rep(y),
            steps=steps,
            lr=lr,
            weight_decay=wd,
            alpha0=a0 if ts.weights is not None else None,
            x=rep(x),
            w0=rep(w0),
            text=rep(ts.weights),
        )
        for step, (coef, b, al, primal) in out.items():
            for i, (a_, w_) in enumerate(group):
                sl = slice(i * E, (i + 1) * E)
                probes[(a_, w_, step)] = params_of(w0, x, (coef[sl], b[sl], None if al is None else al[sl], primal))
    results = {key: task.accuracy(proj.logits(p, SCALE)) for key, p in probes.items()}
    grid = [
        {**({"alpha0": a} if a is not None else {}), "weight_decay": w, "steps": s}
        for a in alphas
        for w in weight_decays
        for s in steps
    ]
    key = lambda c: (c.get("alpha0"), c["weight_decay"], c["steps"])  # noqa: E731
    choice = grid_search(grid, lambda c: results[key(c)], task, default)
    choice.fitted = probes.get(key(choice.params)) if choice.score is not None else None
    return choice


def probe_parts(p: LinearParams | None) -> dict[str, torch.Tensor] | None:
    """A trained probe as the tensors a state keeps (explicit weights, bias, alpha)."""
    if p is None:
        return None
    return {"weights": p.weights, "bias": p.bias, **({"alpha": p.alpha} if p.alpha is not None else {})}


def kept_probe(state: MethodState, regime: str, support: torch.Tensor, classes: torch.Tensor) -> LinearParams | None:
    """The state's kept all-way probe when ``support`` is the one it was trained on (see regimes)."""
    if regime != ALLWAY:
        return None
    parts = kept_allway_head(state, support, classes)
    if parts is None:
        return None
    return LinearParams(parts["weights"], None, None, parts["bias"], parts.get("alpha"))


class LinearProbeTuned(AdaptMethod):
    """fskd's probe: logistic regression on the centred support, prototype init, full-batch
    Adam batched over episodes; weight decay and steps chosen on validation.

    ``linear-probe``'s tuned recipe (``--set recipe=tuned``)."""

    name = "linear-probe"
    options = LinearProbeOptions

    def fit_state(self, f: Fit) -> None:
        store, config, opts, device, state = f.store, f.config, f.opts, f.device, f.state
        base = store.class_split("base")
        center = torch.from_numpy(store.mean(base)).to(device) if base else None
        wds = fixed_or(opts.weight_decay, WEIGHT_DECAY)
        steps = fixed_or(opts.steps, STEPS)
        fixed = {k for k, v in (("weight_decay", opts.weight_decay), ("steps", opts.steps)) if v is not None}
        default = {"weight_decay": wds[len(wds) // 2], "steps": steps[len(steps) // 2]}
        space_ep = lambda s, c: TextSpace(None, centred(center), centred(center)(s))  # noqa: E731

        def space_aw(s, c):
            embed = centred(support_center(s))
            return TextSpace(None, embed, embed(s))

        ep = search_probe(
            f.episodic_task(), space_ep, alphas=(None,), weight_decays=wds, steps=steps, lr=opts.lr, default=default
        )
        aw_task = f.allway_task() if config.shots > 0 else None
        aw = search_probe(
            aw_task, space_aw, alphas=(None,), weight_decays=wds, steps=steps, lr=opts.lr, default=default
        )
        record(state, EPISODIC, ep, fixed)
        record(state, ALLWAY, aw, fixed)
        state.hparams["lr"] = opts.lr
        state.selected_on["lr"] = "fixed"
        state.tensors = {"center": center.cpu() if center is not None else torch.zeros(store.dim)}
        keep_allway_head(state, aw_task, probe_parts(aw.fitted))

    def make_head(self, state: MethodState, store, device: torch.device):
        center = state.tensors["center"].to(device)
        center = center if bool(center.abs().sum() > 0) else None
        lr = state.hparams["lr"]

        def make(regime: str):
            wd, steps = hp(state, regime, "weight_decay"), hp(state, regime, "steps")

            def fit(support, classes):
                require_shots(support, self.name)
                embed = centred(center if regime == EPISODIC else support_center(support))
                p = (
                    kept_probe(state, regime, support, classes)
                    or probe_params(embed(support), steps=[steps], lr=lr, weight_decay=wd)[steps]
                )
                return FittedLinear(p, embed)

            return fit

        return RegimeHead(self.name, learned_mask(store, device), make(EPISODIC), make(ALLWAY))


class LinearProbe(RecipeMethod):
    """The linear probe: ``published`` (CoOp's lpclip all-way, RFS's per episode) or ``tuned``
    (fskd's batched Adam probe)."""

    name = "linear-probe"
    recipes = {"published": LPClip, "tuned": LinearProbeTuned}


METHODS.register("linear-probe", LinearProbe)
