"""The two regimes of an adapt state: the shots and episodes each draws, the head that dispatches
between them, the all-way head kept in the state, and the small tensor helpers the heads share.

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

``MethodState.selected_on`` says which of the two chose each hyper-parameter
(:mod:`fskd.methods.adapt.validation`).

The all-way head of the state's own shots
-----------------------------------------
The all-way search trains on exactly the shots ``fskd eval --protocol allway`` draws for the
state's K and seed, so a trained method keeps the winner's trained parts in the state
(:func:`keep_allway_head`, tensors ``allway.fitted.*`` with a digest of the support they were
trained on). Its head uses them when it is given that same support (same rows, same values,
same classes: :func:`kept_allway_head`) and refits on any other; at 16 shots x 1,000 classes
that saves a fit of minutes per evaluation. Refitting gives the same head: training is
deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fskd.classifiers.base import FittedHead, Head
from fskd.errors import ConfigError, EvaluationError, StoreError
from fskd.methods.base import MethodState
from fskd.protocols.episodic import sample_episodes
from fskd.runtime import compute_threads
from fskd.store import sampling

EPISODIC = "episodic"
ALLWAY = "allway"


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
    eps = sample_episodes(labels, classes, way, shot, query, episodes, seed, error=ConfigError)
    return eps.support, eps.query, eps.classes


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


@dataclass
class Task:
    """A validation task in head format: support (E, N, K, D) raw features, classes (E, N)
    store class indices, query (E, M, D) raw features, truth (E, M) way index of each query."""

    support: torch.Tensor
    classes: torch.Tensor
    query: torch.Tensor
    truth: torch.Tensor
    description: str
    on: str  # VAL_CLASSES or VAL_SPLIT (fskd.methods.adapt.validation)
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
        #: the one regime the state learned (``--set regime=allway`` or ``episodic``), else None
        self.only: str | None = None

    def fit(self, support: torch.Tensor, classes: torch.Tensor) -> FittedHead:
        regime = ALLWAY if support_only(classes, self.learned) else EPISODIC
        if self.only is not None and regime != self.only:
            calls = "an all-way call (its classes include learned ones)" if regime == ALLWAY else "an episodic call"
            raise EvaluationError(
                f"{self.name} state was fitted with --set regime={self.only}: it learned no {regime} part, and this "
                f"is {calls}; refit with --set regime=both (the default) or regime={regime}"
            )
        with compute_threads(support.numel()):
            if regime == ALLWAY:
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


# -- the all-way head of the state's own shots ----------------------------------------------------
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
