"""Seeded, batched row sampling by label: the K shots per class of the all-way protocol and the
validation rows. It sits beside the store so that methods (validation during fitting), the store's
views and evaluation draw rows with the very same code: a method fitted with ``--seed s`` sees the
shots that the all-way protocol draws for seed ``s``. N-way K-shot episodes are the episodic
protocol's (:mod:`fskd.protocols.episodic`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from fskd.config import HP_SELECTIONS
from fskd.errors import EvaluationError, FskdError

if TYPE_CHECKING:
    from fskd.store.store import FeatureStore
    from fskd.store.view import StoreLike

log = logging.getLogger(__name__)


def class_runs(sorted_labels: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each class's rows start in label-sorted order, and how many there are."""
    starts = np.searchsorted(sorted_labels, classes)
    return starts, np.searchsorted(sorted_labels, classes, side="right") - starts


def class_counts(labels: np.ndarray, classes: Sequence[int] | np.ndarray) -> np.ndarray:
    """Rows per class, in the order of ``classes``."""
    return class_runs(np.sort(np.asarray(labels)), np.asarray(classes))[1]


def class_name(classes: np.ndarray, i: int, class_names: list[str] | None) -> str:
    return class_names[int(classes[i])] if class_names else str(classes[i])


def sample_shots(
    labels: np.ndarray,
    classes: Sequence[int] | np.ndarray,
    shot: int,
    seed: int,
    class_names: list[str] | None = None,
    split: str = "train",
    option: str = "--shots",
    error: type[FskdError] = EvaluationError,
) -> np.ndarray:
    """(C, K) row indices: ``shot`` random rows of each class in ``classes``, seeded.

    Raises ``error`` naming the first short class, its count, the split and the option.
    """
    labels = np.asarray(labels)
    classes = np.asarray(classes)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(labels)), labels))  # by label, random within a label
    starts, counts = class_runs(labels[order], classes)
    short = np.flatnonzero(counts < shot)
    if len(short):
        i = int(short[0])
        more = f" ({len(short)} classes are short; the smallest has {int(counts.min())})" if len(short) > 1 else ""
        raise error(
            f"{option} {shot} is larger than available: class {class_name(classes, i, class_names)!r} has "
            f"{counts[i]} samples in the {split!r} split{more}"
        )
    return order[starts[:, None] + np.arange(shot)[None, :]]


#: CoOp: the validation set has min(K, 4) images per class
COOP_VAL_CAP = 4


def val_shots(shots: int) -> int:
    """Validation rows per class under CoOp's few-shot rule: min(K, 4)."""
    return min(int(shots), COOP_VAL_CAP)


def validation_rows(
    labels: np.ndarray, classes: Sequence[int] | np.ndarray, shots: int, seed: int, rule: str
) -> np.ndarray:
    """Indices (ascending) of the val-split rows used to choose hyper-parameters in the all-way
    protocol: ``rule="few-shot-val"``: min(K, 4) random rows per class of ``classes`` (seeded; a
    class with fewer rows gives all of them, as CoOp's sampler), ``"full-val"``: every row of those
    classes. ``"none"`` (``--hp-selection none``) reads no val row: asking for them is a bug."""
    if rule not in HP_SELECTIONS or rule == "none":
        raise ValueError(f"validation rows exist for --hp-selection few-shot-val or full-val, got {rule!r}")
    labels = np.asarray(labels)
    member = np.isin(labels, np.asarray(classes))
    if rule == "full-val":
        return np.flatnonzero(member)
    # its own stream: the train shots of seed s are unchanged
    return first_per_class(labels, member, val_shots(shots), np.random.default_rng([seed, 4]))


def first_per_class(labels: np.ndarray, member: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (ascending) of at most ``k`` rows per label among the ``member`` rows, drawn in a
    random order from ``rng`` (a label with fewer member rows gives all of them)."""
    order = np.lexsort((rng.random(len(labels)), labels))
    sl = labels[order]
    rank = np.arange(len(sl)) - np.searchsorted(sl, sl)  # position within each row's label run
    return np.sort(order[(rank < k) & member[order]])


#: rows per class a method learns from when it trains on whole classes (base classes, val classes):
#: every class of the standard few-shot sets keeps all its rows (miniImageNet has 600, CUB 60),
#: an ImageNet-sized store keeps a seeded 600 of each class's ~1,300
CLASS_ROWS = 600


def allway_shots(
    store: FeatureStore, shots: int, seed: int, error: type[FskdError] = EvaluationError
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The all-way shots of ``seed`` from ``store``'s train split: (features (C*K, D), labels
    (C*K,), classes (C,)), class-major. Sampled on the labels; only the shots' features are read
    (:meth:`FeatureStore.take`), so 16 x 1,000 shots never load the 1.28M-row split."""
    rows, y, classes = allway_shot_rows(store, shots, seed, error)
    return store.take("train", rows), y, classes


def allway_shot_rows(
    store: FeatureStore, shots: int, seed: int, error: type[FskdError] = EvaluationError, option: str = "--shots"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows behind :func:`allway_shots`: (train row indices (C*K,), labels (C*K,), classes (C,))."""
    valid = store.valid_rows("train")
    y = store.labels("train")[valid]
    classes = np.unique(y)
    rows = sample_shots(y, classes, shots, seed, store.class_names, "train", option=option, error=error).reshape(-1)
    return valid[rows], y[rows], classes


def allway_shot_views(
    store: FeatureStore, shots: int, seed: int, error: type[FskdError] = EvaluationError
) -> tuple[np.ndarray | None, str]:
    """The store's augmented views of the all-way shots of ``seed`` (``fskd extract --augment-views``):
    ((C*K, V, D) in :func:`allway_shots`' order, their description), or (None, why there are none)."""
    if shots < 1 or not store.has_split("train"):
        return None, "no shots"
    rows, _, _ = allway_shot_rows(store, shots, seed, error)
    return store.take_views(rows)


#: stores (by fingerprint) whose val split was checked not to be their test split
_VAL_NOT_TEST: set[str] = set()


def _row_hashes(store: StoreLike, split: str) -> np.ndarray:
    """(n,) uint64: a hash of each feature row of ``split`` (its float32 bit patterns times fixed
    odd 64-bit weights, summed with wrap-around), streamed one store chunk at a time
    (:meth:`~fskd.store.FeatureStore.iter_chunks`). Equal rows hash equal; two different rows
    collide with a chance of about 2^-64."""
    weights = np.random.default_rng(0).integers(1, 2**63, size=store.dim, dtype=np.uint64) | np.uint64(1)
    out = [np.zeros(0, np.uint64)]
    with np.errstate(over="ignore"):
        for _, x, _ in store.iter_chunks(split):
            bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
            out.append((bits * weights).sum(1, dtype=np.uint64))
    return np.concatenate(out)


def check_val_is_not_test(store: StoreLike) -> None:
    """Refuse to choose hyper-parameters on a store whose val split is its test split: every val
    sample id is a test sample id, or every val feature row is also a test feature row, in any
    order (CoOp's ImageNet uses its val images as test images; code that validates there reports
    test-tuned numbers). A partial overlap (some val rows are test rows, by id or by identical
    features) is said in a warning with its count. Read once per store: the ids, then both
    splits' features one store chunk at a time."""
    fp = store.fingerprint
    if fp in _VAL_NOT_TEST or not (store.has_split("val") and store.has_split("test")):
        return
    nv = store.n_rows("val")
    why = None
    if nv:
        shared_ids = len(set(store.sample_ids("val")) & set(store.sample_ids("test")))
        shared_rows = (
            nv if shared_ids == nv else int(np.isin(_row_hashes(store, "val"), _row_hashes(store, "test")).sum())
        )
        if shared_ids == nv:
            why = f"each of its {nv} val sample ids is a test sample id"
        elif shared_rows == nv:
            why = f"each of its {nv} val feature rows is also a test feature row (the same features, in any order)"
        elif shared_ids or shared_rows:
            log.warning(
                "%s: %d of its %d val sample ids are test sample ids and %d of its val feature rows equal a "
                "test feature row: hyper-parameters chosen on val see those test images",
                store.path,
                shared_ids,
                nv,
                shared_rows,
            )
    if why:
        raise EvaluationError(
            f"{store.path}: its val split is its test split ({why}): choosing hyper-parameters on "
            f"it would choose them on the test rows. Fit a method that reads no val row (zs-lp, clap, "
            f"taskres on a joint store), or extract the dataset with a val split of its own"
        )
    _VAL_NOT_TEST.add(fp)


def allway_val(
    store: StoreLike, classes: Sequence[int] | np.ndarray, shots: int, seed: int, rule: str
) -> tuple[np.ndarray, np.ndarray]:
    """The val-split rows of ``classes`` that ``rule`` allows (:func:`validation_rows`), read by row:
    (features, labels). A val split that is the test split is refused (:func:`check_val_is_not_test`)."""
    check_val_is_not_test(store)
    vrows = store.valid_rows("val", classes)
    yv = store.labels("val")[vrows]
    keep = validation_rows(yv, classes, shots, seed, rule)
    return store.take("val", vrows[keep]), yv[keep]


def describe_validation(rule: str, shots: int, n_rows: int, n_classes: int, seed: int) -> str:
    if rule == "full-val":
        return f"the full val split ({n_rows} rows of {n_classes} classes)"
    short = " (all of a class's rows where it has fewer)" if n_rows < val_shots(shots) * n_classes else ""
    return (
        f"{n_rows} val-split rows: min(K, 4) = {val_shots(shots)} per class of {n_classes} classes{short} (CoOp's "
        f"few-shot validation, seed {seed})"
    )
