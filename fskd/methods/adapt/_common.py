"""Shared plumbing of the adapt methods and their base class :class:`AdaptMethod` (it registers nothing).

Two regimes, one state
----------------------
Every adapt state serves both evaluation protocols (docs/concepts.md) with one head:

- **episodic** (base -> novel): the parts a method *learns* (bridge, base mean, meta-trained
  generators, adapters) come from the base classes (all their rows); its hyper-parameters are
  chosen on N-way K-shot episodes of the val classes. Used when a head is asked about classes
  the method never learned from (novel or val episodes).
- **support-only** (the all-way protocol): when the classes of a call include a class the
  method learned from (a base class), base-learned parts would leak labels and test rows of
  those classes, so the head learns everything from the support it is given (K shots per
  class); the hyper-parameters were chosen at fit time on the val *split* with K shots per
  class drawn (seeded) from the train split.

``MethodState.selected_on`` says which of the two chose each hyper-parameter.

The all-way head of the state's own shots
-----------------------------------------
The all-way search trains on exactly the shots ``fskd eval --protocol allway`` draws for the
state's K and seed, so a trained method keeps the winner's trained parts in the state
(:func:`keep_allway_head`, tensors ``allway.fitted.*`` with a digest of the support they were
trained on). Its head uses them when it is given that same support (same rows, same values,
same classes: :func:`kept_allway_head`) and refits on any other; at 16 shots x 1,000 classes
that saves a fit of minutes per evaluation. Refitting gives the same head: training is
deterministic.

Threads
-------
Fits and head fits on small problems (below ``fskd.runtime.SMALL_PROBLEM`` feature values, e.g. cub35's
1,994 x 1280) run on one intra-op thread: their tensors are small, and on a busy 2-core machine
two threads fighting over the cores made them 2-5x slower (zero-shot fit 1.46 s -> 0.30 s,
residual-adapter 17-21 s -> 6 s, measured with benchmarks/adapt_speed.py's store).
The guard is ``fskd.runtime.compute_threads``, taken by :meth:`AdaptMethod.fit`; ``fskd.api.evaluate``
runs under it too.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fskd.classifiers.base import FittedHead, Head
from fskd.config import Config
from fskd.errors import ConfigError, EncoderError, FskdError, StoreError
from fskd.methods.base import Method, MethodState, TrainProgress
from fskd.methods.bridge import RIDGE_GRID, Bridge, batched_text_to_image
from fskd.runtime import compute_threads, resolve_device, store_numel
from fskd.store import sampling

log = logging.getLogger(__name__)

EPISODIC = "episodic"
ALLWAY = "allway"
VAL_CLASSES = "val classes"
VAL_SPLIT = "val split"
VAL_SPLIT_FEW = "val split (min(K, 4) per class)"


def parse_options(cls: type[Config], config) -> Config:
    """The method's options from ``config.options`` (unknown keys -> ConfigError listing valid ones)."""
    try:
        return cls.from_dict(dict(config.options))
    except TypeError as e:  # wrong value types reach the dataclass constructor
        raise ConfigError(f"--set options for {cls.__name__}: {e}") from None


def new_state(store, config, method: str) -> MethodState:
    """An empty adapt state for ``store``; first checks that ``--shots`` K shots exist for every
    class in the train split (the all-way shots), naming the first class that falls short."""
    if config.shots > 0 and store.has_split("train"):
        lab = store.labels("train")
        classes = np.unique(lab[lab >= 0])
        sample_shots(lab[lab >= 0], classes, config.shots, config.seed, store.class_names)
    state = MethodState(
        method=method,
        kind="adapt",
        store_path=str(store.path),
        store_fingerprint=store.fingerprint,
        encoder=store.encoder_spec,
        config=config.to_dict(),
    )
    state.hparams["hp_selection"] = config.hp_selection
    state.selected_on["hp_selection"] = "--hp-selection"
    return state


# -- class text -----------------------------------------------------------------------------------
def reject_descriptions(config, method: str) -> None:
    """Methods that use no class semantics refuse ``--descriptions`` rather than ignore it."""
    if config.descriptions:
        raise ConfigError(
            f"method {method!r} uses no class text: --descriptions {config.descriptions} would be ignored; "
            f"methods that use it: zero-shot, lp++, tip-adapter, tip-adapter-f, syntrans"
        )


def class_text(store, config, method: str) -> tuple[torch.Tensor, str]:
    """(C, d_t) L2-normalised class text features and where they came from.

    ``--descriptions FILE`` re-encodes every class (the store's prompt templates filled with the
    name, plus the class's descriptions) with the store's own text encoder, rebuilt from its
    spec; otherwise the store's class text features are used.
    """
    if config.descriptions:
        from fskd.encoders import build_encoder
        from fskd.encoders.prompts import (
            DEFAULT_TEMPLATES,
            class_prompts,
            encode_class_texts,
            load_descriptions,
        )

        desc = load_descriptions(config.descriptions, store.class_keys, store.class_names)
        try:
            encoder = build_encoder(store.encoder_spec)
        except FskdError as e:  # unknown family (arrays, synthetic), missing weights, ...
            raise EncoderError(
                f"--descriptions needs the store's text encoder {store.encoder_spec!r} to encode them: {e}"
            ) from None
        if not encoder.has_text:
            raise EncoderError(f"--descriptions: the store's encoder {store.encoder_spec!r} has no text tower")
        templates = tuple(store.attrs.get("text", {}).get("templates") or DEFAULT_TEMPLATES)
        text = encode_class_texts(encoder, class_prompts(store.class_names, templates, desc))
        n = sum(len(d) for d in desc)
        return F.normalize(text.float(), dim=-1), f"templates + {n} descriptions from {Path(config.descriptions).name}"
    text = store.text_embeddings()
    if text is None:
        raise StoreError(
            f"method {method!r} needs class text features, but {store.path} has none (encoder {store.encoder_spec!r} has "
            f"no text tower); extract with an encoder that has one (lite0-minilm, an open_clip model) or use prototype, "
            f"linear-probe or residual-adapter"
        )
    return F.normalize(torch.from_numpy(np.asarray(text, dtype=np.float32)), dim=-1), "store class text features"


# -- sampling: the same code the evaluation protocols draw with (fskd.store.sampling) ---------
def sample_shots(
    labels: np.ndarray,
    classes: np.ndarray,
    shot: int,
    seed: int,
    class_names: list[str] | None = None,
    split: str = "train",
) -> np.ndarray:
    """(C, K) row indices of the all-way shots for ``--seed`` (so ``--seed 1`` draws the shots
    of evaluation seed 1); a short class is a ConfigError naming ``--shots``."""
    return sampling.sample_shots(labels, classes, shot, seed, class_names, split, option="--shots", error=ConfigError)


def sample_episode_rows(
    labels: np.ndarray, classes: Sequence[int], way: int, shot: int, query: int, episodes: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batched episode sampling: support (E, N, K), query (E, N, Q) row indices, classes (E, N)."""
    eps = sampling.sample_episodes(labels, classes, way, shot, query, episodes, seed, error=ConfigError)
    return eps.support, eps.query, eps.classes


@dataclass
class Task:
    """A validation task in head format: support (E, N, K, D) raw features, classes (E, N)
    store class indices, query (E, M, D) raw features, truth (E, M) way index of each query."""

    support: torch.Tensor
    classes: torch.Tensor
    query: torch.Tensor
    truth: torch.Tensor
    description: str
    on: str  # VAL_CLASSES or VAL_SPLIT
    #: the distinct rows (P, D) the support and query were gathered from, and their indices
    #: (E, N, K) / (E, M) into it: ``mapped`` embeds each row once instead of once per episode
    pool: torch.Tensor | None = None
    support_idx: torch.Tensor | None = None
    query_idx: torch.Tensor | None = None

    @property
    def shot(self) -> int:
        return int(self.support.shape[2])

    def mapped(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(fn(support), fn(query)) for a row-wise ``fn``, computing fn once per distinct row."""
        if self.pool is None:
            return fn(self.support), fn(self.query)
        out = fn(self.pool)
        return out[self.support_idx], out[self.query_idx]

    def accuracy(self, logits: torch.Tensor) -> float:
        """Mean accuracy of (E, M, N) scores (mean over episodes of per-episode accuracy)."""
        return float((logits.argmax(-1) == self.truth).float().mean())

    def score(self, fitted: FittedHead) -> float:
        return self.accuracy(fitted.logits(self.query))


@dataclass(frozen=True)
class ValOptions:
    """How validation episodes are drawn (shared option names of every adapt method)."""

    val_way: int = 5
    val_query: int = 15
    val_episodes: int = 300


def check_val_options(o) -> None:
    if o.val_way < 2 or o.val_query < 1 or o.val_episodes < 1:
        raise ConfigError(
            f"val_way must be >= 2, val_query and val_episodes >= 1; got {o.val_way}, {o.val_query}, {o.val_episodes}"
        )


def episodic_val_task(
    store,
    shots: int,
    opts,
    seed: int,
    device: torch.device,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Task | None:
    """N-way K-shot episodes of the val classes (K = max(1, shots)); None when there are fewer
    than 2 val classes. Queries per class shrink to what the smallest val class allows."""
    val = store.class_split("val") if "val" in store.attrs["class_split"] else []
    if len(val) < 2:
        return None
    x, y = store.gather(val, max_per_class=sampling.CLASS_ROWS)
    k = max(1, shots)
    counts = np.bincount(y, minlength=max(val) + 1)[val]
    q = min(opts.val_query, int(counts.min()) - k)
    if q < 1:
        i = int(np.argmin(counts))
        raise ConfigError(
            f"--shots {shots} is larger than available for validation episodes: val class {store.class_names[val[i]]!r} "
            f"has {counts[i]} samples, fewer than shots + 1 query = {k + 1}"
        )
    way = min(opts.val_way, len(val))
    sup, qry, cls = sample_episode_rows(y, val, way, k, q, opts.val_episodes, seed)
    xt = torch.from_numpy(x).to(device)
    if transform is not None:
        xt = transform(xt)
    E = len(cls)
    si, qi = torch.from_numpy(sup).to(device), torch.from_numpy(qry.reshape(E, -1)).to(device)
    return Task(
        support=xt[si],
        classes=torch.from_numpy(cls).to(device),
        query=xt[qi],
        pool=xt,
        support_idx=si,
        query_idx=qi,
        truth=torch.arange(way, device=device).repeat_interleave(q)[None].expand(E, -1),
        description=f"{opts.val_episodes} {way}-way {k}-shot {q}-query episodes of the {len(val)} val classes (seed {seed})",
        on=VAL_CLASSES,
    )


def allway_rows(store, shots: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The all-way training shots: (features (C*K, D), labels (C*K,), classes (C,)) from the train
    split, class-major (rows of class i are i*K .. i*K+K-1); only the shots' features are read."""
    if not store.has_split("train"):
        raise StoreError(
            f"{store.path} has no 'train' sample split (it has {store.splits}); the all-way shots come from it"
        )
    return sampling.allway_shots(store, shots, seed, error=ConfigError)


def allway_views(store, config, device: torch.device) -> tuple[torch.Tensor | None, str]:
    """The store's augmented views of the all-way shots (``fskd extract --augment-views``):
    ((1, V, C*K, D) class-major like :func:`allway_rows`, description), or (None, why not)."""
    views, why = sampling.allway_shot_views(store, config.shots, config.seed, error=ConfigError)
    if views is None:
        return None, why
    return torch.from_numpy(views).to(device).transpose(0, 1)[None], why


def record_views(state: MethodState, regime: str, views: torch.Tensor | None, why: str) -> None:
    """Say in the state whether the fit used augmented views, and which (or why not)."""
    state.hparams[f"{regime}.views"] = 0 if views is None else int(views.shape[1])
    state.selected_on[f"{regime}.views"] = why if views is not None else f"none: {why}; one feature per shot"


def embed_views(space: TextSpace, views: torch.Tensor) -> torch.Tensor:
    """(E, V, S, D) raw views -> embedded in ``space`` (as its support)."""
    E, V, S, D = views.shape
    return space.embed(views.reshape(E, V * S, D)).reshape(E, V, S, -1)


def view_rows(space: TextSpace, views: torch.Tensor) -> torch.Tensor:
    """GDA's and ProKeR's rows from augmented views: (1, V, N*K, D) raw views of class-major shots ->
    (1, N, K*V, D) embedded rows per class (every view a row, as the authors' augmented crops)."""
    _, N, K, _ = space.support.shape
    e = embed_views(space, views)  # (1, V, N*K, D)
    V = e.shape[1]
    return e.permute(0, 2, 1, 3).reshape(1, N, K * V, -1)


def view_keys(space: TextSpace, views: torch.Tensor) -> torch.Tensor:
    """Tip-Adapter's cache keys from augmented views: the mean of a shot's raw views, embedded
    (normalised), as the reference averages its 10 augmented epochs: (E, S, D)."""
    return space.embed(views.mean(1))


def allway_val_rows(store, classes: np.ndarray, shots: int, seed: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """The val-split rows of ``classes`` that ``rule`` allows (CoOp: min(K, 4) per class, seeded)."""
    return sampling.allway_val(store, classes, shots, seed, rule)


def no_validation(config) -> bool:
    """``--hp-selection none``: the fit reads no val row (each search keeps its fixed default)."""
    return getattr(config, "hp_selection", "few-shot-val") == "none"


NO_VALIDATION = "fixed (--hp-selection none: no validation data)"


def allway_val_task(
    store, config, device: torch.device, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> Task | None:
    """One all-way task: K shots per class from the train split (seeded), as queries the val
    rows that ``config.hp_selection`` allows (CoOp: min(K, 4) per class); None under
    ``--hp-selection none``, when the store has no train or val sample split, or the rule leaves no row."""
    shots, seed = config.shots, config.seed
    if no_validation(config) or not (store.has_split("train") and store.has_split("val")):
        return None
    if shots > 0:
        x, y, classes = allway_rows(store, shots, seed)
    else:
        lab = store.labels("train")
        x, classes = None, np.unique(lab[lab >= 0])
    xv, yv = allway_val_rows(store, classes, shots, seed, config.hp_selection)
    if len(yv) == 0:
        return None
    dev = lambda a: transform(torch.from_numpy(a).to(device)) if transform else torch.from_numpy(a).to(device)  # noqa: E731
    if shots > 0:
        support = dev(x).reshape(len(classes), shots, -1)[None]
    else:
        support = torch.zeros(1, len(classes), 0, store.dim, device=device)
    query = dev(xv)[None]
    n_s = len(classes) * shots
    pos = np.full(int(classes.max()) + 1, -1)
    pos[classes] = np.arange(len(classes))
    return Task(
        support=support,
        classes=torch.from_numpy(classes).to(device)[None],
        query=query,
        truth=torch.from_numpy(pos[yv]).to(device)[None],
        pool=torch.cat([support.reshape(n_s, query.shape[-1]), query[0]]),
        support_idx=torch.arange(n_s, device=device).reshape(1, len(classes), shots),
        query_idx=torch.arange(n_s, n_s + len(yv), device=device)[None],
        description=f"all {len(classes)} classes, {shots} shots per class from the train split (seed {seed}); queries: "
        + sampling.describe_validation(config.hp_selection, shots, len(yv), len(classes), seed),
        on=VAL_SPLIT if config.hp_selection == "full-val" else VAL_SPLIT_FEW,
    )


# -- hyper-parameter search -----------------------------------------------------------------------
@dataclass
class Choice:
    """The outcome of a search on one validation task."""

    params: dict
    score: float | None
    on: str
    description: str
    table: list = field(default_factory=list)
    #: what the winning candidate trained, when the search trained something (see keep_allway_head)
    fitted: object = None


def grid_search(candidates: Sequence[dict], score: Callable[[dict], float], task: Task | None, default: dict) -> Choice:
    """The best candidate on ``task`` (ties: the earlier candidate), or ``default`` when there
    is no validation task (recorded as such)."""
    if task is None or not candidates:
        return Choice(dict(default), None, "default (no validation data)", "no validation data")
    best, best_s, table = None, -1.0, []
    for c in candidates:
        s = score(c)
        table.append({**c, "val_acc": round(100 * s, 2)})
        if s > best_s + 1e-9:
            best, best_s = c, s
    return Choice(dict(best), best_s, task.on, task.description, table)


def record(state: MethodState, regime: str, choice: Choice, fixed: dict | None = None) -> None:
    """Put a regime's chosen hyper-parameters (and where they came from) into the state."""
    for k, v in choice.params.items():
        key = f"{regime}.{k}"
        state.hparams[key] = v
        on = NO_VALIDATION if choice.score is None and state.hparams.get("hp_selection") == "none" else choice.on
        state.selected_on[key] = on if not (fixed and k in fixed) else "fixed (--set option)"
    if choice.score is not None:
        state.metrics[f"{regime}.val_acc"] = round(100 * choice.score, 2)
        state.metrics[f"{regime}.val_task"] = choice.description


def record_grid(state: MethodState, sizes: str | None, grid: str, wide: str) -> None:
    """The grid a search ran: the sizes of the ``--set`` lists, or the authors' ``grid`` (on a
    non-joint store with the ``wide`` values for the bridge's text scale added, fskd's addition)."""
    state.hparams["grid"] = grid if sizes is None else sizes
    state.selected_on["grid"] = (
        "fixed (--set option)"
        if sizes is not None
        else f"fixed (the authors' grid; a non-joint store also the wide {wide})"
    )


FITTED = "allway.fitted"


def support_digest(support: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(32,) uint8 SHA-256 of a support's shape, values and classes: what a kept head was trained on."""
    import hashlib

    h = hashlib.sha256(repr((tuple(support.shape), str(support.dtype))).encode())
    h.update(np.ascontiguousarray(support.detach().cpu().numpy()).tobytes())
    h.update(np.ascontiguousarray(classes.detach().cpu().numpy().astype(np.int64)).tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8).clone()


def keep_allway_head(state: MethodState, task: Task | None, parts: dict[str, torch.Tensor] | None) -> None:
    """Keep the all-way head trained by the search on ``task`` (its own shots) in the state."""
    if task is None or not parts:
        return
    state.tensors[f"{FITTED}.support_sha256"] = support_digest(task.support, task.classes)
    state.tensors.update({f"{FITTED}.{k}": v.detach().cpu() for k, v in parts.items()})


def kept_allway_head(
    state: MethodState, support: torch.Tensor, classes: torch.Tensor
) -> dict[str, torch.Tensor] | None:
    """The kept all-way head's parts when ``support`` / ``classes`` are what it was trained on, else None."""
    digest = state.tensors.get(f"{FITTED}.support_sha256")
    if digest is None or not torch.equal(digest, support_digest(support, classes)):
        return None
    prefix = FITTED + "."
    return {
        k[len(prefix) :]: v.to(support.device)
        for k, v in state.tensors.items()
        if k.startswith(prefix) and k != f"{FITTED}.support_sha256"
    }


def hp(state: MethodState, regime: str, name: str):
    return state.hparams[f"{regime}.{name}"]


def fixed_or(value, grid: Sequence) -> tuple:
    """A user-fixed option (a number or a list) replaces the default grid."""
    if value is None:
        return tuple(grid)
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


# -- regime dispatch ------------------------------------------------------------------------------
def learned_mask(store, device: torch.device) -> torch.Tensor:
    """(C,) bool: the classes whose labels the episodic parts learned from (the base classes)."""
    m = torch.zeros(store.num_classes, dtype=torch.bool, device=device)
    base = store.class_split("base") if "base" in store.attrs["class_split"] else []
    if base:
        m[torch.as_tensor(base, device=device)] = True
    return m


def support_only(classes: torch.Tensor, learned: torch.Tensor) -> bool:
    """Whether a call must learn from its support alone (it includes a learned class)."""
    return bool(learned.to(classes.device)[classes].any())


class RegimeHead(Head):
    """Dispatches ``fit`` to the episodic or the support-only (all-way) builder."""

    def __init__(
        self,
        name: str,
        learned: torch.Tensor,
        episodic: Callable[[torch.Tensor, torch.Tensor], FittedHead],
        allway: Callable[[torch.Tensor, torch.Tensor], FittedHead],
        needs_text: bool = False,
    ) -> None:
        self.name, self.learned, self._episodic, self._allway = name, learned, episodic, allway
        self.needs_text = needs_text

    def fit(self, support: torch.Tensor, classes: torch.Tensor) -> FittedHead:
        with compute_threads(support.numel()):
            if support_only(classes, self.learned):
                return self._allway(support, classes)
            return self._episodic(support, classes)


class FittedWeights(FittedHead):
    """Cosine (or linear) scores against per-episode class weights.

    weights (E, N, D); queries are embedded by ``embed`` (raw (E, M, D) -> (E, M, D)) first.
    """

    def __init__(
        self, weights: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor], bias: torch.Tensor | None = None
    ) -> None:
        self.weights, self.embed, self.bias = weights, embed, bias

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        out = torch.bmm(self.embed(query), self.weights.transpose(1, 2))
        return out if self.bias is None else out + self.bias[:, None, :]


def centred(center: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> normalize(x - center) (center (D,), (E, 1, D) or None)."""

    def f(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x - center if center is not None else x, dim=-1)

    return f


def support_center(support: torch.Tensor) -> torch.Tensor:
    """(E, N, K, D) -> (E, 1, D) per-episode support mean (the all-way stand-in for the base mean)."""
    return support.mean(dim=(1, 2))[:, None]


def prototypes(embedded_support: torch.Tensor) -> torch.Tensor:
    """(E, N, K, D) embedded support -> (E, N, D) normalised class means."""
    return F.normalize(embedded_support.mean(2), dim=-1)


def require_shots(support: torch.Tensor, method: str) -> None:
    if support.shape[2] < 1:
        raise ConfigError(f"method {method!r} needs at least 1 shot per class (got a support set with 0)")


def flat_support_labels(support: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, N, K, D), (1, N) -> rows (N*K, D), store labels (N*K,)."""
    n, k = support.shape[1], support.shape[2]
    return support[0].reshape(n * k, -1), classes[0].repeat_interleave(k)


# -- text weights in image space (the bridge) -----------------------------------------------------
def fit_episodic_bridge(
    store,
    text: torch.Tensor,
    ridge: float | None,
    device: torch.device,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    use_val: bool = True,
) -> tuple[Bridge, Choice]:
    """The identity for a joint store; else ridge maps learned on every row of the base classes,
    the ridge strength chosen by zero-shot accuracy on the val classes (or fixed by ``ridge``, or
    the middle of the grid when ``use_val`` is False: ``--hp-selection none``)."""
    if store.joint:
        return Bridge.identity(store.dim, device), Choice(
            {"ridge": None}, None, "fixed (joint space: identity bridge)", ""
        )
    base = store.class_split("base")
    if not base:
        raise StoreError(
            f"{store.path}: the bridge between its image and text spaces is learned on the base classes, "
            f"but the base class split is empty"
        )
    tf = transform or (lambda t: t)
    x, y = store.gather(base, max_per_class=sampling.CLASS_ROWS)
    val = store.class_split("val")
    v = None
    if len(val) >= 2 and ridge is None and use_val:
        xv, yv = store.gather(val, max_per_class=sampling.CLASS_ROWS)
        v = (tf(torch.from_numpy(xv).to(device)), torch.from_numpy(yv).to(device))
    if ridge is not None:
        lam, on = float(ridge), "fixed (--set option)"
    elif v is None:
        lam, on = RIDGE_GRID[len(RIDGE_GRID) // 2], "default (no val classes)" if use_val else NO_VALIDATION
    else:
        lam, on = None, VAL_CLASSES
    br = Bridge.fit(
        tf(torch.from_numpy(x).to(device)), torch.from_numpy(y).to(device), text.to(device), ridge=lam, val=v
    )
    desc = f"bridge ridge by zero-shot accuracy on the {len(val)} val classes" if on == VAL_CLASSES else ""
    return br, Choice({"ridge": br.ridge}, None, on, desc)


def choose_allway_ridge(
    store,
    text: torch.Tensor,
    config,
    ridge: float | None,
    device: torch.device,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Choice:
    """The ridge strength of the support-fitted, leave-one-class-out bridge (all-way regime):
    fixed, or chosen by the zero-shot accuracy of its text weights on the val split, the bridge
    fitted on K shots per class of the train split."""
    if store.joint:
        return Choice({"ridge": None}, None, "fixed (joint space: identity bridge)", "")
    if ridge is not None:
        return Choice({"ridge": float(ridge)}, None, "fixed (--set option)", "")
    task = allway_val_task(store, config, device, transform) if config.shots > 0 else None
    if task is None:
        return Choice(
            {"ridge": RIDGE_GRID[len(RIDGE_GRID) // 2]},
            None,
            NO_VALIDATION if no_validation(config) else "default (no all-way shots or val split)",
            "",
        )

    def score(c: dict) -> float:
        ts = support_text_space(task.support, task.classes, text, False, c["ridge"])
        return task.accuracy(torch.bmm(ts.embed(task.query), ts.weights.transpose(1, 2)))

    return grid_search([{"ridge": lam} for lam in RIDGE_GRID], score, task, {})


@dataclass
class TextSpace:
    """Everything a text-using head needs for one call: class weights in image space
    (E, N, D), the query embedding, and the embedded support (E, N, K, D)."""

    weights: torch.Tensor
    embed: Callable[[torch.Tensor], torch.Tensor]
    support: torch.Tensor


def episodic_text_space(bridge: Bridge, text: torch.Tensor, support: torch.Tensor, classes: torch.Tensor) -> TextSpace:
    w = bridge.text_to_image(text.to(support.device))[classes]
    return TextSpace(w, bridge.embed_images, bridge.embed_images(support))


def support_text_space(
    support: torch.Tensor, classes: torch.Tensor, text: torch.Tensor, joint: bool, ridge: float | None
) -> TextSpace:
    """Text weights learned from the support alone: the identity for a joint store, else a
    bridge fitted on the support (centred on its mean) with the chosen ridge, leave-one-class-out
    (each class's text weight comes from a bridge that never saw that class's images)."""
    text = text.to(support.device)
    if joint:
        embed = centred(None)
        return TextSpace(text[classes], embed, embed(support))
    E, N, K, D = support.shape
    if K < 1:
        from fskd.errors import EvaluationError

        raise EvaluationError(
            "image and text spaces differ and the call includes classes the bridge was learned on: "
            "the bridge is then learned from the support, which needs at least 1 shot per class"
        )
    embed = centred(support_center(support))
    es = embed(support)
    return TextSpace(batched_text_to_image(es, text[classes], float(ridge), leave_out=True), embed, es)


def text_fit(store, config, method: str, ridge: float | None, device: torch.device):
    """What every text-using adapt fit starts with: the class text, a new state with the episodic
    bridge and the all-way bridge ridge recorded (and where the text came from) that keeps the
    text and the bridge (read back by :func:`state_text`). Returns (state, text, bridge, all-way ridge)."""
    text, source = class_text(store, config, method)
    state = new_state(store, config, method)
    bridge, br_ep = fit_episodic_bridge(store, text, ridge, device, use_val=not no_validation(config))
    br_aw = choose_allway_ridge(store, text, config, ridge, device)
    record(state, EPISODIC, br_ep)
    record(state, ALLWAY, br_aw)
    state.metrics["text"] = source
    state.tensors = {"text": text.cpu(), **{k: v.cpu() for k, v in bridge.tensors().items()}}
    return state, text, bridge, br_aw.params["ridge"]


def regime_text_space(
    state: MethodState,
    store,
    regime: str,
    support: torch.Tensor,
    classes: torch.Tensor,
    bridge: Bridge,
    text: torch.Tensor,
) -> TextSpace:
    """A head's text space: the episodic bridge, or (all-way) a leave-one-class-out bridge from the
    support at the state's all-way ridge."""
    if regime == EPISODIC:
        return episodic_text_space(bridge, text, support, classes)
    return support_text_space(support, classes, text, store.joint, hp(state, ALLWAY, "ridge"))


def state_text(state: MethodState, device: torch.device) -> tuple[torch.Tensor, Bridge]:
    """A text state's class text and episodic bridge on ``device`` (what :func:`text_fit` kept)."""
    text = state.tensors["text"].to(device)
    return text, Bridge.from_tensors({k: v.to(device) for k, v in state.tensors.items()})


# -- the fit every adapt method shares ------------------------------------------------------------
@dataclass
class Validation:
    """A text method's validation: its text spaces per regime, the val-class episodes, the all-way
    task, and the store's augmented views of the all-way shots (``why``: which, or why none)."""

    spaces: dict[str, Callable[[torch.Tensor, torch.Tensor], TextSpace]]
    ep_task: Task | None
    aw_task: Task | None
    views: torch.Tensor | None
    why: str

    def view_space(self) -> TextSpace | None:
        """The all-way task's text space when the store has views of its shots (which it embeds), else None."""
        task = self.aw_task
        if task is None or task.shot == 0 or self.views is None:
            return None
        return self.spaces[ALLWAY](task.support, task.classes)


@dataclass
class Fit:
    """What :meth:`AdaptMethod.fit` hands a method's :meth:`~AdaptMethod.fit_state`. A text method
    also gets the L2-normalised class text and where it came from; unless it learns its own
    bridges, the episodic bridge and the all-way bridge ridge, both recorded in ``state``, which
    keeps the text and the bridge (:func:`text_fit`)."""

    store: object
    config: object
    opts: Config
    device: torch.device
    state: MethodState
    progress: TrainProgress | None = None
    text: torch.Tensor | None = None
    text_source: str | None = None
    bridge: Bridge | None = None
    aw_ridge: float | None = None

    def spaces(self) -> dict[str, Callable[[torch.Tensor, torch.Tensor], TextSpace]]:
        """Per regime, a support's text space: the episodic bridge, or the support's own at the all-way ridge."""
        return {
            EPISODIC: lambda s, c: episodic_text_space(self.bridge, self.text, s, c),
            ALLWAY: lambda s, c: support_text_space(s, c, self.text, self.store.joint, self.aw_ridge),
        }

    def episodic_task(self) -> Task | None:
        """The val-class episodes (:func:`episodic_val_task`); None under ``--hp-selection none``."""
        if no_validation(self.config):
            return None
        return episodic_val_task(self.store, self.config.shots, self.opts, self.config.seed, self.device)

    def allway_task(self) -> Task | None:
        """The all-way validation task (:func:`allway_val_task`)."""
        return allway_val_task(self.store, self.config, self.device)

    def own_shots(self) -> Task:
        """The all-way shots of the state's K and seed (support (1, C, K, D), classes (1, C)): what a
        kept all-way head is trained on (the task has no queries of its own)."""
        config = self.config
        x, _, classes = allway_rows(self.store, config.shots, config.seed)
        support = torch.from_numpy(x).to(self.device).reshape(len(classes), config.shots, -1)[None]
        cls = torch.from_numpy(classes).to(self.device)[None]
        return Task(support=support, classes=cls, query=support[:, 0], truth=cls, description="", on="")

    def validation(self) -> Validation:
        """Both regimes' validation tasks and the stored views of the all-way shots."""
        ep_task, aw_task = self.episodic_task(), self.allway_task()
        config = self.config
        views, why = allway_views(self.store, config, self.device) if config.shots > 0 else (None, "no shots")
        return Validation(self.spaces(), ep_task, aw_task, views, why)


class AdaptMethod(Method):
    """An adapt method: :meth:`fit` is the prologue every adapt fit shares, :meth:`fit_state` the
    method's own part."""

    kind = "adapt"
    #: a text method that learns its own bridges (syntrans: in its transformed space): the class
    #: text is read, no bridge is fitted
    own_bridges: bool = False
    #: False: the fit runs on the CPU whatever ``--device`` says (then not checked)
    uses_device: bool = True

    def fit(self, store, config, progress: TrainProgress | None = None) -> MethodState:
        """Under :func:`compute_threads` for the store's size: refuse ``--descriptions`` (methods
        without text), parse the options, resolve the device, make the new state (a text method:
        read the class text first, and fit the bridges), then :meth:`fit_state`."""
        with compute_threads(store_numel(store)):
            if not self.needs_text:
                reject_descriptions(config, self.name)
            opts = parse_options(self.options, config)
            device = resolve_device(config.device) if self.uses_device else torch.device("cpu")
            text = source = bridge = aw_ridge = None
            if not self.needs_text:
                state = new_state(store, config, self.name)
            elif self.own_bridges:
                text, source = class_text(store, config, self.name)
                state = new_state(store, config, self.name)
            else:
                state, text, bridge, aw_ridge = text_fit(store, config, self.name, opts.ridge, device)
            f = Fit(store, config, opts, device, state, progress, text, source, bridge, aw_ridge)
            self.fit_state(f)
            return f.state

    @abstractmethod
    def fit_state(self, f: Fit) -> None:
        """Fit ``f.state`` (hyper-parameters, tensors, metrics) on the store."""
