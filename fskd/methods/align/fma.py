"""``fma``: Flow Matching Alignment on cached features, one method with two recipes
(``--set recipe=NAME``): ``published`` (the default, the reference's recipe) and ``lite``.

A velocity field v(z, t) learns to transport each image feature to its class text feature
along the straight line between them (fixed coupling), optionally with Brownian-bridge noise
``gamma * sqrt(t (1 - t)) * noise`` (noise ~ N(0, I) in the flow's coordinates, as in the
reference) on the path; the field regresses the derivative of that very path. At inference an
image feature is integrated for a few solver steps and classified by the cosine of the
transported feature to the class text features. Where to stop is chosen on validation data.

The ``published`` recipe (:class:`FMAPublished`) follows the reference (HKUST-LongGroup/FMA):
its adaLN-gated 12-block network of width the feature dimension
(:class:`~fskd.methods.align.flow.AdaLNField`), AdamW 2e-4 / weight decay 0.01 over 200 epochs
of batches of 32 with a warm-up epoch and a cosine, gamma 0, Euler steps of 0.1 stopped after
0..10 steps, cosine to the class text alone, the full feature space. One deliberate difference:
validation rows (not the test set, as the reference does) choose the stop. ``--set recipe=lite``
is fskd's fast variant (:class:`FMALite`, :class:`FMALiteOptions`): a 2-block MLP in the top
256 principal directions, 600 steps at 2e-3, gamma in {0, 0.03}, Euler or Heun with 1/2/4/8
steps, and a support-prototype cosine added with a weight chosen on validation. Both share
everything below.

The flow runs in one space: the store's image space, centred and L2-normalised
(``Bridge.embed_images``), in coordinates of its top principal directions (``pca``). Class text
features reach that space through the bridge (the identity for a joint encoder, ridge maps
learned on the training rows otherwise). With ``--base-state DIR`` the raw features first pass
through another method's ``features`` map (e.g. a residual adapter), embedded in this state.

Regimes (``--set regime=...``; ``auto``: ``allway`` when ``--shots`` > 0, else ``episodic``):

- ``allway``: bridge and field learn from K shots of every class (train split, drawn exactly
  as the all-way protocol draws seed ``--seed``'s shots); choices on the val split. Through a
  ridge bridge each class's target comes from a map fitted without that class's shots
  (leave-one-class-out, :func:`allway_bridge`), so the flow moves images toward text, not
  toward their own prototypes. Serves
  ``fskd eval --protocol allway --shots K``.
- ``episodic``: bridge and field learn from every row of the base classes; choices on N-way
  K-shot episodes of the val classes. Serves episodes over classes it never learned from.
- ``both``: fits both parts; the head uses the episodic part for calls without base classes and
  the all-way part for the all-way protocol.

A call that would score rows a part learned from (episodes over classes the all-way part saw,
or base classes for the episodic part) raises EvaluationError instead of reporting a leaked number.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fskd.classifiers.base import FittedHead, Head
from fskd.config import Config
from fskd.errors import ConfigError, EvaluationError, StoreError
from fskd.methods.adapt.method import parse_options
from fskd.methods.adapt.regimes import ALLWAY, EPISODIC, allway_rows
from fskd.methods.adapt.text_space import choose_allway_ridge, store_text
from fskd.methods.adapt.validation import (
    VAL_CLASSES,
    VAL_SPLIT,
    VAL_SPLIT_FEW,
    allway_val_rows,
    no_validation,
    val_episode_rows,
)
from fskd.methods.align.flow import (
    ARCHS,
    NFE_PER_STEP,
    SOLVERS,
    make_field,
    train_field,
    trajectory,
    transport,
)
from fskd.methods.base import METHODS, Method, MethodState, RecipeMethod, TrainProgress, load_state
from fskd.methods.bridge import Bridge, batched_text_to_image
from fskd.runtime import cpu_threads, resolve_device
from fskd.store import sampling

log = logging.getLogger(__name__)

#: ``fma``'s default noise strength: the reference's (gamma 0, the plain straight path)
GAMMAS = (0.0,)
#: ``fma``'s default solver steps: 10 Euler steps of 0.1, stopped after 0..10 (the reference's
#: range of step counts at its step size 0.1), the stop chosen on validation
STEPS = (10,)
#: the lite recipe's candidate noise strengths (the noise is N(0, I) in the flow coordinates, as in
#: the reference, so 0.03 in 256 coordinates is a noise norm of about 0.5 sqrt(t (1 - t)) against
#: unit-norm features): one field per value, the best on validation kept (0: the straight path)
LITE_GAMMAS = (0.0, 0.03)
#: the lite recipe's candidate numbers of solver steps (each integrates t = 0..1; early stopping
#: picks where to stop along it)
LITE_STEPS = (1, 2, 4, 8)
REGIMES = ("auto", ALLWAY, EPISODIC, "both")
BRIDGES = ("auto", "ridge", "none")
MAX_STEPS = 256


@dataclass(frozen=True)
class FMAOptions(Config):
    """``fskd align --method fma --set key=value`` options. The defaults are the FMA reference's
    (HKUST-LongGroup/FMA ``config.py`` / ``train.py`` / ``test.py``): the adaLN network with
    width = the feature dimension and 12 blocks, AdamW 2e-4 with weight decay 0.01, 200 epochs
    of batches of 32 with one warm-up epoch and a cosine, Euler steps of 0.1 (``--flow-steps 10``:
    the stop after 0..10 steps chosen on validation; the reference chooses it on the test set),
    classification by the cosine to the class text alone, the flow in the full feature space."""

    regime: str = "auto"  # auto | allway | episodic | both (see the module docstring)
    arch: str = "adaln"  # adaln: the reference's network | mlp: fskd's small residual MLP (recipe=lite)
    width: int = 0  # hidden width of the velocity network (0: the flow's dimension, as the reference)
    depth: int = 12  # residual blocks
    epochs: int = 200  # passes over the training pairs, in a fresh order each (used when iters = 0)
    warmup_epochs: float = 1.0  # warm-up epochs, then a cosine: the reference's schedule (flow.lr_factor)
    iters: int = 0  # > 0: that many optimiser steps of pairs drawn with replacement instead of epochs
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 0.01
    solver: str = "euler"  # euler | heun | auto (chosen on validation)
    proto_weights: tuple[float, ...] = (0.0,)  # candidate weights of a support-prototype cosine (0: text only)
    bridge: str = "auto"  # auto: identity for a joint store, ridge maps otherwise | ridge | none
    ridge: float | None = None  # bridge ridge strength (None: chosen on validation)
    pca: int = 0  # flow in the top-`pca` principal directions of the training features (0: the full space)
    val_episodes: int = 300  # episodic regime: val-class episodes choosing steps
    val_way: int = 5
    val_query: int = 15
    threads: int = 0  # CPU threads while fitting (0: torch's setting; the reference network is large)

    def __post_init__(self) -> None:
        for name, allowed in (("regime", REGIMES), ("bridge", BRIDGES), ("solver", ("auto", *SOLVERS))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"fma option {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.arch not in ARCHS:
            raise ConfigError(f"fma option arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        for name in ("depth", "batch_size", "val_episodes", "val_query"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"fma option {name} must be an integer >= 1, got {v!r}")
        if not (
            isinstance(self.epochs, int)
            and isinstance(self.iters, int)
            and self.epochs >= 0
            and self.iters >= 0
            and (self.epochs or self.iters)
        ):
            raise ConfigError(
                f"fma options epochs and iters must be integers >= 0, one of them > 0 (iters > 0 wins), "
                f"got epochs={self.epochs!r}, iters={self.iters!r}"
            )
        if not (
            isinstance(self.warmup_epochs, (int, float))
            and self.warmup_epochs >= 0
            and (self.iters or self.warmup_epochs <= self.epochs)
        ):
            raise ConfigError(
                f"fma option warmup_epochs must be between 0 and epochs ({self.epochs}), got {self.warmup_epochs!r}"
            )
        for name in ("width", "pca", "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(
                    f"fma option {name} must be an integer >= 0 (0: the default, see the option), got {v!r}"
                )
        if not isinstance(self.val_way, int) or self.val_way < 2:
            raise ConfigError(f"fma option val_way must be an integer >= 2, got {self.val_way!r}")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ConfigError(
                f"fma options need lr > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}"
            )
        if not self.proto_weights or any(not isinstance(w, (int, float)) or w < 0 for w in self.proto_weights):
            raise ConfigError(f"fma option proto_weights must be non-negative numbers, got {self.proto_weights!r}")
        if self.ridge is not None and not self.ridge > 0:
            raise ConfigError(f"fma option ridge must be > 0, got {self.ridge!r}")


@dataclass(frozen=True)
class FMALiteOptions(FMAOptions):
    """``fskd align --method fma --set recipe=lite`` options: fskd's fast variant of FMA (not the published
    recipe): a 2-block residual MLP of width 512 in the top 256 principal directions, 600
    AdamW steps at 2e-3, Euler or Heun and the step count chosen on validation, and a support-
    prototype cosine added with a weight chosen on validation."""

    arch: str = "mlp"
    width: int = 512
    depth: int = 2
    epochs: int = 0
    warmup_epochs: float = 0.0
    iters: int = 600  # steps of pairs drawn with replacement (iters > 0 wins over epochs)
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    solver: str = "auto"
    proto_weights: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
    pca: int = 256
    threads: int = 1  # the matrices are small: one thread avoids oversubscribing shared cores


# -- the space the flow runs in --------------------------------------------------------------------
FeatureMap = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def _apply(fmap: FeatureMap | None, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Raw store features (n, D) -> the base method's features (n, D') (identity without one)."""
    if fmap is None or len(x) == 0:
        return x
    return torch.cat([fmap(x[s : s + chunk]).float() for s in range(0, len(x), chunk)])


@dataclass
class FlowSpace:
    """Raw features -> the image space (centred, L2-normalised), class text features -> that
    space through the bridge, and both -> the flow's coordinates (the top principal directions
    of the training features and targets, or the whole space when ``basis`` is None)."""

    bridge: Bridge
    fmap: FeatureMap | None = None
    basis: torch.Tensor | None = None  # (D_i, P) orthonormal columns

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(n, D) raw -> (n, D_i) unit-norm image-space features."""
        return self.bridge.embed_images(_apply(self.fmap, x))

    def targets(self, text: torch.Tensor) -> torch.Tensor:
        """(C, d_t) class text features -> (C, D_i) unit-norm targets in image space."""
        return self.bridge.text_to_image(text)

    def to_flow(self, e: torch.Tensor) -> torch.Tensor:
        """(n, D_i) -> (n, P) flow coordinates."""
        return e if self.basis is None else e @ self.basis.to(e.device)


def principal_basis(a: torch.Tensor, p: int) -> torch.Tensor | None:
    """(D, P) top-``p`` right singular vectors of the rows ``a`` (n, D); None when p = 0 or
    p >= D (no projection). The rows are unit-norm and roughly centred already."""
    if p == 0 or p >= a.shape[1]:
        return None
    _, _, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return vh[: min(p, vh.shape[0])].T.float().contiguous()


def ridge_bridge(store, d_img: int, d_txt: int, opts: FMAOptions, base_features: bool) -> bool:
    """Whether the flow needs ridge maps between image features (``d_img`` wide) and class text
    (``d_txt``): False for one space (the identity bridge), refusing a joint store or
    ``bridge=none`` whose widths differ. ``base_features``: the images come from another method's
    feature map, whose width may legitimately differ from the text's (then a ridge bridge)."""
    if opts.bridge == "auto" and store.joint and base_features and d_img != d_txt:
        log.info(
            "fma: the base method's features are %d-d, the text features %d-d: learning a ridge bridge", d_img, d_txt
        )
        return True
    if opts.bridge == "none" or (opts.bridge == "auto" and store.joint):
        if d_img != d_txt:
            why = "the store says its encoder is joint" if opts.bridge == "auto" else "bridge=none was asked"
            raise ConfigError(
                f"{store.path}: image features are {d_img}-d but class text features are {d_txt}-d, so they are not one "
                f"space, and {why}; fma needs both in one space: use --set bridge=ridge (ridge maps learned on the "
                f"training rows) or a joint encoder"
            )
        if not store.joint:
            log.warning("bridge=none on a non-joint store: image and text features are compared directly")
        return False
    return True


def make_bridge(
    store,
    x: torch.Tensor,
    y: torch.Tensor,
    text: torch.Tensor,
    val: tuple[torch.Tensor, torch.Tensor],
    opts: FMAOptions,
    base_features: bool = False,
) -> tuple[Bridge, str]:
    """The episodic bridge for features ``x`` (n, D') labelled ``y``: the identity when image and
    text features share one space, else ridge maps (ridge chosen on ``val``). Returns the bridge
    and a description of how it was made."""
    if not ridge_bridge(store, int(x.shape[1]), int(text.shape[1]), opts, base_features):
        return Bridge.identity(int(x.shape[1]), x.device), "identity"
    bridge = Bridge.fit(x, y, text, ridge=opts.ridge, val=None if opts.ridge is not None else val)
    return bridge, f"ridge {bridge.ridge:g}"


def allway_bridge(
    store,
    config,
    x: torch.Tensor,
    classes: torch.Tensor,
    text: torch.Tensor,
    opts: FMAOptions,
    fmap: FeatureMap | None,
) -> tuple[Bridge, str, torch.Tensor]:
    """The all-way bridge and the class targets (C, D_i) in image space.

    ``x`` (C*K, D'): the all-way shots of ``classes`` (K = ``config.shots``, class-major) through
    ``fmap``. When the spaces differ the ridge maps are fitted on those shots, and each training
    class's target comes from a map fitted *without* that class (exact leave-one-class-out of the
    class-aggregated ridge, as the adapt methods' all-way text weights): a target predicted from
    the class's text alone, not its own prototype. The ridge strength (or ``opts.ridge``) is
    chosen as theirs is (:func:`~fskd.methods.adapt.text_space.choose_allway_ridge`: the zero-shot
    accuracy of those targets on the val rows the selection rule allows). Classes the shots do
    not cover (base-to-new's new classes) get the full map's targets (it never saw them). The
    identity bridge (one space) gives the class texts themselves.
    """
    if not ridge_bridge(store, int(x.shape[1]), int(text.shape[1]), opts, fmap is not None):
        bridge = Bridge.identity(int(x.shape[1]), x.device)
        return bridge, "identity", bridge.text_to_image(text)
    t = F.normalize(text, dim=-1)
    choice = choose_allway_ridge(
        store, t, config, opts.ridge, x.device, transform=lambda r: _apply(fmap, r), joint=False
    )
    lam, shots = float(choice.params["ridge"]), int(config.shots)
    bridge = Bridge.fit(x, classes.repeat_interleave(shots), text, ridge=lam)  # centred on the shots' mean
    e = bridge.embed_images(x).reshape(1, len(classes), shots, -1)
    targets = bridge.text_to_image(text)
    targets[classes] = batched_text_to_image(e, t[classes][None], lam, leave_out=True)[0]
    how = "given" if opts.ridge is not None else "chosen by leave-one-class-out zero-shot accuracy on the val rows"
    return bridge, f"ridge {lam:g} ({how}; targets leave-one-class-out)", targets


# -- choosing solver, steps, early stop and prototype weight on validation ---------------------------
@dataclass
class Choice:
    solver: str
    steps: int
    stop: int
    proto_weight: float
    accuracy: float

    @property
    def nfe(self) -> int:
        return self.stop * NFE_PER_STEP[self.solver]


Scorer = Callable[[torch.Tensor], torch.Tensor]


def select(
    score: Scorer,
    field,
    start: torch.Tensor,
    solvers: tuple[str, ...],
    steps: tuple[int, ...],
    weights: tuple[float, ...],
) -> tuple[Choice, dict[str, torch.Tensor]]:
    """Try every (solver, steps, stop, weight) on validation. ``score(z (n, P)) -> (W,)`` is the
    accuracy per prototype weight when the validation rows ``start`` (n, P) have been moved to
    ``z``. Best accuracy wins; ties go to fewer network evaluations, then the smaller weight.
    Returns the choice and, per (solver, steps), the accuracies (steps + 1, W) after each step."""
    best: Choice | None = None
    curves = {}
    for solver in solvers:
        for m in steps:
            accs = torch.stack([score(z) for z in trajectory(field, start, m, solver=solver)]).cpu()  # (m + 1, W)
            for k in range(m + 1):
                for wi, w in enumerate(weights):
                    c = Choice(solver, m, k, float(w), float(accs[k, wi]))
                    if best is None or (c.accuracy, -c.nfe, -c.proto_weight) > (
                        best.accuracy,
                        -best.nfe,
                        -best.proto_weight,
                    ):
                        best = c
            curves[f"{solver} {m} steps"] = accs
    return best, curves


def curves_at(curves: dict[str, torch.Tensor], weights: tuple[float, ...], w: float) -> dict[str, list[float]]:
    """Validation accuracy (percent) after each solver step, at prototype weight ``w``."""
    wi = list(weights).index(w)
    return {k: [round(100 * float(a), 2) for a in v[:, wi]] for k, v in curves.items()}


def allway_scorer(
    targets: torch.Tensor, protos: torch.Tensor, e_val: torch.Tensor, y_pos: torch.Tensor, weights: tuple[float, ...]
) -> Scorer:
    """All classes at once: targets (C, P), prototypes (C, D_i), val rows e_val (n, D_i) with
    true positions y_pos (n,) into the C classes."""
    s_proto = e_val @ protos.T  # (n, C)
    w = torch.tensor(weights, device=e_val.device)

    def score(z: torch.Tensor) -> torch.Tensor:
        s = F.normalize(z, dim=-1) @ targets.T  # (n, C)
        pred = (s[None] + w[:, None, None] * s_proto[None]).argmax(-1)  # (W, n)
        return (pred == y_pos[None]).float().mean(1)

    return score


def episodic_scorer(
    targets: torch.Tensor,
    e_pool: torch.Tensor,
    support: torch.Tensor,
    query: torch.Tensor,
    classes: torch.Tensor,
    weights: tuple[float, ...],
) -> Scorer:
    """Episodes over a pool of rows e_pool (n, D_i): support (E, N, K) and query (E, N, Q) pool
    indices, classes (E, N) store class indices; targets (C, P) for every store class."""
    E, N, Q = query.shape
    protos = F.normalize(e_pool[support].mean(2), dim=-1)  # (E, N, D_i)
    qflat = query.reshape(E, N * Q)
    s_proto = torch.bmm(e_pool[qflat], protos.transpose(1, 2))  # (E, NQ, N)
    truth = torch.arange(N, device=e_pool.device).repeat_interleave(Q)
    w = torch.tensor(weights, device=e_pool.device)

    def score(z: torch.Tensor) -> torch.Tensor:
        s_all = F.normalize(z, dim=-1) @ targets.T  # (n_pool, C): every row once, then gathered
        s = s_all[qflat[:, :, None], classes[:, None, :]]  # (E, NQ, N)
        pred = (s[None] + w[:, None, None, None] * s_proto[None]).argmax(-1)  # (W, E, NQ)
        return (pred == truth).float().mean((1, 2))

    return score


# -- base states ------------------------------------------------------------------------------------
BASE_PREFIX = "base."
BASE_INFO = "base_state_json"


def _load_base(path: str, store, device: torch.device) -> tuple[MethodState, FeatureMap | None, dict | None]:
    """A base state and what it gives: image features (a residual adapter) and/or learned class
    text features per regime (CoOp's prompts: the flow's targets)."""
    state = load_state(path)
    METHODS.get(state.method)().check_store(state, store, path)
    fmap, texts = _offers(state, store, device)
    if fmap is None and not texts:
        able = [
            n
            for n in METHODS.names()
            if METHODS.get(n).features is not Method.features
            or METHODS.get(n).text_features is not Method.text_features
        ]
        raise ConfigError(
            f"--base-state {path}: method {state.method!r} exposes no features or class text to build on; "
            f"methods that do: {', '.join(able) or '(none registered)'}"
        )
    return state, fmap, texts


def _offers(state: MethodState, store, device) -> tuple[FeatureMap | None, dict | None]:
    """What a base state gives FMA: (its feature map, its learned class text per regime)."""
    method = METHODS.get(state.method)()
    return method.features(state, store, device), method.text_features(state, store, device)


def _regime_text(texts: dict | None, regime: str, default: torch.Tensor) -> torch.Tensor:
    """A prompt-learning base's class text for ``regime``, else the store's (``default``)."""
    if not texts:
        return default
    if regime not in texts:
        raise ConfigError(
            f"the --base-state learned class text for {', '.join(sorted(texts))} only; fma regime={regime} "
            f"needs its {regime} text (refit the base with --set regime=both or regime={regime})"
        )
    return texts[regime]


def _base_tensors(state: MethodState) -> dict[str, torch.Tensor]:
    """The base state inside ours, so an fma state never depends on another directory."""
    info = json.dumps(state.info(), default=str).encode()
    out = {BASE_PREFIX + k: v for k, v in state.tensors.items()}
    out[BASE_INFO] = torch.frombuffer(bytearray(info), dtype=torch.uint8).clone()
    return out


def _base_from_tensors(tensors: dict[str, torch.Tensor], store, device) -> tuple[FeatureMap | None, dict | None]:
    """The kept base state's (feature map, learned class text per regime), or (None, None)."""
    base = _base_state(tensors, device)
    return (None, None) if base is None else _offers(base, store, device)


def _base_state(tensors: dict[str, torch.Tensor], device=None) -> MethodState | None:
    """The base state kept inside an fma state (:func:`_base_tensors`), or None."""
    if BASE_INFO not in tensors:
        return None
    info = json.loads(bytes(tensors[BASE_INFO].to(torch.uint8).tolist()).decode())
    sub = {
        k[len(BASE_PREFIX) :]: (v if device is None else v.to(device))
        for k, v in tensors.items()
        if k.startswith(BASE_PREFIX)
    }
    return MethodState(**info, tensors=sub)


# -- one fitted part (a regime) -------------------------------------------------------------------
@dataclass
class Part:
    """A fitted field with its space, class targets and chosen inference settings."""

    regime: str
    field: torch.nn.Module
    space: FlowSpace
    targets: torch.Tensor  # (C, P) unit-norm class text features in flow coordinates, every store class
    learned: torch.Tensor  # (C,) bool: the classes whose rows the part learned from
    hp: dict

    @property
    def flow_dim(self) -> int:
        return int(self.targets.shape[1])

    def transport(self, z: torch.Tensor) -> torch.Tensor:
        return transport(self.field, z, self.hp["steps"], self.hp["stop"], self.hp["solver"])

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Raw rows (n, D) -> (n, P + D_i): the transported unit-norm feature, then the embedded one."""
        e = self.space.embed(x)
        return torch.cat([F.normalize(self.transport(self.space.to_flow(e)), dim=-1), e], dim=1)


class FMAPublished(Method):
    """FMA as published: a velocity field (the reference's 12-block adaLN network, 200 epochs)
    transports image features to their class text features in Euler steps of 0.1; where to
    stop chosen on validation.

    ``fma``'s published recipe (the default)."""

    needs_text = True
    transfers_to_new_classes = True  # an empty support of unlearned classes: their text alone

    name = "fma"
    kind = "align"
    options = FMAOptions
    gammas, steps = GAMMAS, STEPS  # defaults of --gamma and --steps

    def bound_to_shots(self, state: MethodState) -> bool:
        # the all-way field was trained on the state's own K shots of its seed
        return state.hparams.get("regime") in (ALLWAY, "both")

    def fit(self, store, config, progress: TrainProgress | None = None) -> MethodState:
        opts = parse_options(self.options, config)
        device = resolve_device(config.device)
        with cpu_threads(opts.threads if device.type == "cpu" else 0):
            return self._fit(store, config, opts, device, progress)

    def _fit(
        self, store, config, opts: FMAOptions, device: torch.device, progress: TrainProgress | None
    ) -> MethodState:
        t0 = time.perf_counter()
        given = config.gamma if isinstance(config.gamma, (tuple, list)) else (config.gamma,)
        gammas = self.gammas if config.gamma is None else tuple(float(g) for g in given)
        if not gammas or not all(math.isfinite(g) and g >= 0 for g in gammas):
            raise ConfigError(f"--gamma must be finite numbers >= 0, got {config.gamma}")
        gammas = tuple(dict.fromkeys(gammas))  # unique, in the given order
        steps = tuple(sorted(set(int(s) for s in config.steps))) if config.steps else self.steps
        if any(s < 1 or s > MAX_STEPS for s in steps):
            raise ConfigError(f"--steps must be integers between 1 and {MAX_STEPS}, got {config.steps}")
        regime = opts.regime if opts.regime != "auto" else (ALLWAY if config.shots > 0 else EPISODIC)
        regimes = (ALLWAY, EPISODIC) if regime == "both" else (regime,)
        if ALLWAY in regimes and config.shots < 1:
            raise ConfigError(
                f"regime={regime} learns from K shots per class: --shots must be >= 1 (or use regime=episodic)"
            )
        text = store_text(store, self.name).to(device)
        base_state, fmap, texts, tensors = None, None, None, {}
        if config.base_state:
            base_state, fmap, texts = _load_base(config.base_state, store, device)
            tensors.update(_base_tensors(base_state))
        fixed = "fixed (default)"
        hparams = {
            "regime": regime,
            "gamma": gammas[0] if len(gammas) == 1 else list(gammas),
            "arch": opts.arch,
            "width": opts.width,
            "depth": opts.depth,
            "epochs": opts.epochs,
            "warmup_epochs": opts.warmup_epochs,
            "iters": opts.iters,
            "batch_size": opts.batch_size,
            "lr": opts.lr,
            "weight_decay": opts.weight_decay,
            "pca": opts.pca,
            "shots": int(config.shots),
            "base_method": base_state.method if base_state else None,
        }
        selected_on = {
            "gamma": "given" if len(gammas) == 1 else "per regime, on validation (see <regime>.gamma)",
            "arch": fixed,
            "width": fixed,
            "depth": fixed,
            "epochs": fixed,
            "iters": fixed,
            "lr": fixed,
            "pca": fixed,
        }
        metrics = {}
        for r in regimes:
            t, h, s, m = self._fit_part(
                r, store, config, opts, gammas, steps, _regime_text(texts, r, text), fmap, device, progress
            )
            if texts and r in texts:
                s = {**s, "targets": f"the class text features {base_state.method} learned ({r} part of --base-state)"}
            tensors.update({f"{r}.{k}": v for k, v in t.items()})
            hparams.update({f"{r}.{k}": v for k, v in h.items()})
            selected_on.update({f"{r}.{k}": v for k, v in s.items()})
            metrics.update({f"{r}.{k}": v for k, v in m.items()})
        metrics["fit_seconds"] = round(time.perf_counter() - t0, 3)
        return MethodState.of(
            self.name,
            self.kind,
            store,
            config,
            hparams=hparams,
            selected_on=selected_on,
            metrics=metrics,
            tensors=tensors,
        )

    def _fit_part(
        self,
        regime: str,
        store,
        config,
        opts: FMAOptions,
        gammas: tuple[float, ...],
        steps: tuple[int, ...],
        text: torch.Tensor,
        fmap: FeatureMap | None,
        device: torch.device,
        progress: TrainProgress | None,
    ):
        names = store.class_names
        if no_validation(config):
            raise ConfigError(
                f"{self.name} has no validation-free form: its bridge, solver, number of steps and "
                f"prototype weight are chosen on validation data (--hp-selection few-shot-val or full-val)"
            )
        if regime == ALLWAY:
            for s in ("train", "val"):
                if not store.has_split(s):
                    raise StoreError(
                        f"regime=allway learns from the 'train' split and chooses steps on the 'val' split; "
                        f"{store.path} has sample splits {store.splits} (use --set regime=episodic)"
                    )
            x_np, y_np, classes = allway_rows(store, config.shots, config.seed)
            xv_np, yv_np = allway_val_rows(store, classes, config.shots, config.seed, config.hp_selection)
            if len(yv_np) == 0:
                raise StoreError(
                    f"{store.path}: the 'val' split has no rows of the {len(classes)} classes; fma chooses its steps there"
                )
            val_on = VAL_SPLIT if config.hp_selection == "full-val" else VAL_SPLIT_FEW
        else:
            base = store.class_split("base")
            val_cls = store.class_split("val") if "val" in store.attrs["class_split"] else []
            if not base:
                raise StoreError(
                    f"{store.path}: regime=episodic learns from the base classes, but the base class split is empty"
                )
            if len(val_cls) < 2:
                raise StoreError(
                    f"{store.path}: regime=episodic chooses steps on val-class episodes, but there are "
                    f"{len(val_cls)} val classes (need >= 2)"
                )
            x_np, y_np = store.gather(base, max_per_class=sampling.CLASS_ROWS)
            xv_np, yv_np = store.gather(val_cls, max_per_class=sampling.CLASS_ROWS)
            classes = np.asarray(sorted(base))
            val_on = VAL_CLASSES
        x = _apply(fmap, torch.from_numpy(x_np).to(device))
        xv = _apply(fmap, torch.from_numpy(xv_np).to(device))
        y = torch.from_numpy(y_np).to(device)

        train_cls = torch.from_numpy(classes).to(device)
        if regime == ALLWAY:
            bridge, bridge_desc, targets_img = allway_bridge(store, config, x, train_cls, text, opts, fmap)
        else:
            bridge, bridge_desc = make_bridge(
                store, x, y, text, (xv, torch.from_numpy(yv_np).to(device)), opts, base_features=fmap is not None
            )
            targets_img = bridge.text_to_image(text)  # (C, D_i)
        e_train = bridge.embed_images(x)
        space = FlowSpace(bridge, basis=principal_basis(torch.cat([e_train, targets_img[train_cls]]), opts.pca))
        targets = space.to_flow(targets_img)  # (C, P)
        x0, x1 = space.to_flow(e_train), targets[y]
        log.info("fma %s: %d training pairs in %d-d, bridge %s", regime, len(x0), x0.shape[1], bridge_desc)
        x0_views, views_why = None, "the episodic regime learns from whole base classes"
        if regime == ALLWAY:
            views, views_why = sampling.allway_shot_views(store, config.shots, config.seed, error=ConfigError)
            if views is not None:  # (S, V, D) -> (S, V, P), through the same map, embedding and basis
                S_, V, D = views.shape
                flat = _apply(fmap, torch.from_numpy(views).to(device).reshape(S_ * V, D))
                x0_views = space.to_flow(bridge.embed_images(flat)).reshape(S_, V, -1)

        def train(gamma: float) -> tuple[torch.nn.Module, list[float]]:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                field = make_field(opts.arch, x0.shape[1], opts.width, opts.depth).to(device)
            tag = f"{self.name} {regime}: train" + (f" gamma={gamma:g}" if len(gammas) > 1 else "")
            loss = train_field(
                field,
                x0,
                x1,
                iters=opts.iters,
                epochs=opts.epochs,
                warmup_epochs=opts.warmup_epochs,
                batch_size=opts.batch_size,
                lr=opts.lr,
                weight_decay=opts.weight_decay,
                gamma=gamma,
                seed=config.seed,
                progress=None if progress is None else (lambda s, i, n, d: progress(tag, i, n, d)),
                x0_views=x0_views,
            )
            return field, loss

        # validation: solver, number of steps, early stop and prototype weight
        solvers = SOLVERS if opts.solver == "auto" else (opts.solver,)
        weights = tuple(float(w) for w in opts.proto_weights)
        ev = bridge.embed_images(xv)
        if regime == ALLWAY:
            pos = np.full(store.num_classes, -1)
            pos[classes] = np.arange(len(classes))
            protos = F.normalize(e_train.reshape(len(classes), config.shots, -1).mean(1), dim=-1)
            score = allway_scorer(targets[train_cls], protos, ev, torch.from_numpy(pos[yv_np]).to(device), weights)
            val_desc = (
                f"all {len(classes)} classes, {config.shots} shots each (seed {config.seed}); queries: "
                + sampling.describe_validation(config.hp_selection, config.shots, len(yv_np), len(classes), config.seed)
            )
        else:
            vcls = np.asarray(sorted(store.class_split("val")))
            k_val = max(1, config.shots)
            sup, qry, ecls = val_episode_rows(
                yv_np, vcls, opts.val_way, k_val, opts.val_query, opts.val_episodes, config.seed, names
            )
            score = episodic_scorer(
                targets,
                ev,
                torch.from_numpy(sup).to(device),
                torch.from_numpy(qry).to(device),
                torch.from_numpy(ecls).to(device),
                weights,
            )
            val_desc = (
                f"{len(sup)} {sup.shape[1]}-way {k_val}-shot {qry.shape[2]}-query episodes of the {len(vcls)} "
                f"val classes (seed {config.seed})"
            )
        t1 = time.perf_counter()
        best, gamma_val, start = None, {}, space.to_flow(ev)
        for gamma in gammas:  # one field per noise strength; the best validation accuracy wins (ties: the first)
            field, loss = train(gamma)
            choice, curves = select(score, field, start, solvers, steps, weights)
            gamma_val[f"{gamma:g}"] = round(100 * choice.accuracy, 3)
            if best is None or choice.accuracy > best[3].accuracy:
                best = (gamma, field, loss, choice, curves)
        gamma, field, loss, choice, curves = best
        train_s = time.perf_counter() - t1
        if progress is not None:
            progress(f"fma {regime}: choose steps", 1, 1, {"val_acc": choice.accuracy})
        if choice.stop == 0:
            log.warning(
                "fma %s: validation prefers no transport (stop=0) on %s: the flow did not help there", regime, val_desc
            )
        log.info(
            "fma %s: gamma %g, %s, %d steps, stop after %d, prototype weight %g (val accuracy %.2f%% on %s)",
            regime,
            gamma,
            choice.solver,
            choice.steps,
            choice.stop,
            choice.proto_weight,
            100 * choice.accuracy,
            val_desc,
        )

        tensors = {f"field.{k}": v.detach().cpu() for k, v in field.state_dict().items()}
        tensors.update({k: v.detach().cpu() for k, v in bridge.tensors().items()})
        if space.basis is not None:
            tensors["basis"] = space.basis.cpu()
        hp = {
            "gamma": gamma,
            "solver": choice.solver,
            "steps": choice.steps,
            "stop": choice.stop,
            "proto_weight": choice.proto_weight,
            "bridge": bridge_desc,
            "flow_dim": int(x0.shape[1]),
            "image_dim": int(e_train.shape[1]),
            "train_classes": len(classes),
        }
        tensors["train_classes"] = torch.from_numpy(classes.astype(np.int64))
        if regime == ALLWAY and not bridge.is_identity:
            tensors["targets"] = targets_img.detach().cpu()  # leave-one-class-out (see allway_bridge)
        on = f"{val_on}: {val_desc}"
        hp["views"] = 0 if x0_views is None else int(x0_views.shape[1])
        selected_on = {
            "views": views_why if x0_views is not None else f"none: {views_why}; one feature per shot",
            "gamma": on if len(gammas) > 1 else "given",
            "solver": on if len(solvers) > 1 else "given",
            "steps": on if len(steps) > 1 else "given",
            "stop": on,
            "proto_weight": on if len(weights) > 1 else "given",
            "bridge": (
                "identity (one space)"
                if bridge.is_identity
                else f"ridge maps fitted on the training rows, strength chosen on the {val_on}"
                if opts.ridge is None
                else "ridge given"
            ),
        }
        metrics = {
            "val_accuracy": round(100 * choice.accuracy, 3),
            "val_curves": curves_at(curves, weights, choice.proto_weight),
            "train_loss": [round(v, 5) for v in loss],
            "train_pairs": int(len(x0)),
            "train_select_seconds": round(train_s, 3),
            "val_accuracy_per_gamma": gamma_val,
        }
        if choice.proto_weight and 0.0 in weights:
            metrics["val_curves_text_only"] = curves_at(curves, weights, 0.0)
        return tensors, hp, selected_on, metrics

    # -- inference ---------------------------------------------------------------------------------
    def parts(self, state: MethodState, store, device: torch.device) -> dict[str, Part]:
        """The fitted parts of a state, ready on ``device``."""
        fmap, texts = _base_from_tensors(state.tensors, store, device)
        raw_text = store_text(store, self.name).to(device)
        out = {}
        for r in (ALLWAY, EPISODIC):
            if f"{r}.steps" not in state.hparams:
                continue
            hp = {k[len(r) + 1 :]: v for k, v in state.hparams.items() if k.startswith(f"{r}.")}
            hp["shots"] = state.hparams["shots"]
            t = {k[len(r) + 1 :]: v.to(device) for k, v in state.tensors.items() if k.startswith(f"{r}.")}
            field = make_field(
                state.hparams["arch"], int(hp["flow_dim"]), int(state.hparams["width"]), int(state.hparams["depth"])
            )
            field.load_state_dict({k[len("field.") :]: v for k, v in t.items() if k.startswith("field.")})
            field.to(device).eval()
            space = FlowSpace(Bridge.from_tensors(t), fmap, t.get("basis"))
            learned = torch.zeros(store.num_classes, dtype=torch.bool, device=device)
            learned[t["train_classes"].long()] = True
            targets = (
                t["targets"] if "targets" in t else space.targets(_regime_text(texts, r, raw_text))
            )  # kept: the all-way LOO targets
            out[r] = Part(r, field, space, space.to_flow(targets), learned, hp)
        if not out:
            raise EvaluationError(
                f"fma state for {state.store_path} has no fitted part (hparams {sorted(state.hparams)})"
            )
        return out

    def head(self, state: MethodState, store, device: torch.device) -> FMAHead:
        return FMAHead(self.parts(state, store, device))

    def transfer_state(self, state: MethodState, store) -> MethodState:
        """Cross-dataset: no class of the target store was learned (the field and the bridge carry
        over; the targets are the target store's class texts, or, over a prompt-learning
        ``--base-state``, the base's learned context with the target's class names)."""
        out = super().transfer_state(state, store)
        tensors = {
            **{k: v for k, v in out.tensors.items() if not k.endswith(".targets")},
            **{k: torch.zeros(0, dtype=torch.long) for k in out.tensors if k.endswith(".train_classes")},
        }
        base = _base_state(state.tensors)
        if base is not None:  # the kept base moves too (coop re-encodes the target's names with its context)
            moved = METHODS.get(base.method)().transfer_state(base, store)
            tensors = {k: v for k, v in tensors.items() if not k.startswith(BASE_PREFIX) and k != BASE_INFO}
            tensors.update(_base_tensors(moved))
        out.tensors = tensors
        return out

    def features(self, state: MethodState, store, device: torch.device) -> FeatureMap:
        """Raw features (n, D) -> transported unit-norm features (n, D_i) in the image space (the
        flow coordinates mapped back through the principal basis), of the all-way part (else
        the episodic one), stopped where validation chose."""
        parts = self.parts(state, store, device)
        part = parts.get(ALLWAY) or parts[EPISODIC]
        basis = part.space.basis

        def fmap(x: torch.Tensor) -> torch.Tensor:
            z = part.transport(part.space.to_flow(part.space.embed(x)))
            return F.normalize(z if basis is None else z @ basis.T, dim=-1)

        return fmap


class FittedFMA(FittedHead):
    def __init__(self, part: Part, cols: slice, weights: torch.Tensor, protos: torch.Tensor) -> None:
        self.part, self.cols = part, cols
        self.weights, self.protos = weights, protos  # (E, N, P) class targets, (E, N, D_i) prototypes

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        """(E, M, width) prepared queries -> (E, M, N): cos(transported query, class text)
        + proto_weight * cos(query, support prototype)."""
        q = query[..., self.cols]
        p = self.part.flow_dim
        out = torch.bmm(q[..., :p], self.weights.transpose(1, 2))
        w = self.part.hp["proto_weight"]
        if w and self.protos is not None:
            out = out + w * torch.bmm(q[..., p:], self.protos.transpose(1, 2))
        return out


class FMAHead(Head):
    """``prepare`` transports every pooled row once (with each fitted part); ``fit`` picks the
    part valid for the call and scores queries against the episode's class text features, plus
    the chosen weight times the cosine to the support prototypes."""

    name = "fma"
    needs_text = True

    def __init__(self, parts: dict[str, Part]) -> None:
        self.parts = parts
        self.cols, start = {}, 0
        for r, p in parts.items():
            width = p.flow_dim + int(p.hp["image_dim"])
            self.cols[r] = slice(start, start + width)
            start += width
        self.width = start

    @torch.no_grad()
    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        """Raw pooled rows (n, D) -> (n, width): per part, [transported, embedded] features."""
        return torch.cat([p.prepare(features) for p in self.parts.values()], dim=1)

    def part_for(self, support_shape: torch.Size, classes: torch.Tensor) -> Part:
        E, N, K = support_shape[:3]
        ep, aw = self.parts.get(EPISODIC), self.parts.get(ALLWAY)
        if ep is not None and not bool(ep.learned[classes].any()):
            return ep
        if aw is not None and K == 0 and not bool(aw.learned[classes].any()):
            return aw  # transfer (base-to-new "new"): the field learned on other classes, these classes' texts
        if aw is None:
            raise EvaluationError(
                "this fma state (regime episodic) learned from every row of the base classes, test rows included; this "
                "call scores base classes (the all-way protocol), which would count rows it was trained on. Fit with "
                "--shots K (regime allway) or --set regime=both for the all-way protocol"
            )
        if E > 1 or N > int(aw.learned.sum()):
            raise EvaluationError(
                f"this fma state (regime allway) learned from {aw.hp['shots']} shots of every class, novel ones included; "
                f"{N}-way episodes would score rows it was trained on. Evaluate it with --protocol allway, "
                f"or fit with --set regime=episodic (or both) for episodes"
            )
        if K < aw.hp["shots"]:
            raise EvaluationError(
                f"this fma state learned from {aw.hp['shots']} shots per class; evaluating it at --shots {K} would use "
                f"more labels than the protocol allows: fit with --shots {K}"
            )
        return aw

    def fit(self, support: torch.Tensor, classes: torch.Tensor) -> FittedFMA:
        """support (E, N, K, width) prepared rows, classes (E, N) store class indices."""
        part = self.part_for(support.shape, classes)
        cols = self.cols[part.regime]
        e = support[..., cols][..., part.flow_dim :]
        protos = F.normalize(e.mean(2), dim=-1) if e.shape[2] else None  # no shot: text targets only
        return FittedFMA(part, cols, part.targets[classes], protos)


class FMALite(FMAPublished):
    """fskd's fast FMA variant: a 2-block residual MLP in 256 principal directions, 600 steps;
    solver, steps and a prototype weight chosen on validation.

    ``fma``'s lite recipe (``--set recipe=lite``), not the published one, see
    :class:`FMALiteOptions`. Same regimes, bridge, states and head as the published."""

    options = FMALiteOptions
    gammas, steps = LITE_GAMMAS, LITE_STEPS


class FMA(RecipeMethod):
    """Flow Matching Alignment: ``published`` (the reference's network and schedule) or ``lite``
    (fskd's fast variant)."""

    name = "fma"
    recipes = {"published": FMAPublished, "lite": FMALite}

    def parts(self, state: MethodState, store, device: torch.device) -> dict[str, Part]:
        """The fitted parts of a state, ready on ``device`` (:meth:`FMAPublished.parts`)."""
        return self.recipe(state).parts(state, store, device)


METHODS.register("fma", FMA)
