"""Base-to-new generalisation (CoCoOp): the classes are split in half by label order; a method
is fitted on K shots (16 in the papers) of the base half only and scored on

- **base**: the test rows of the base classes, classifying among the base classes (the support
  is the same K shots per class of seed s the fit saw);
- **new**: the test rows of the new classes, classifying among the new classes only, with no
  shot of them: the method transfers what it learned on the base half through the new classes'
  text. Methods that cannot classify a class they have no shot of give no new number;
- **HM**: the harmonic mean of base and new (of the means over seeds, as CoCoOp's tables).

:func:`restrict_for_fit` is what a fit sees: an in-memory view of the store in which only the
K train shots and the min(K, 4) validation rows (CoOp's rule) of the base classes are visible,
the new classes and every test row hidden (``FeatureStore.restrict_rows``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fskd.classifiers.base import Head
from fskd.evaluation.allway import AllwayScores, run_allway
from fskd.store.sampling import sample_shots, validation_rows

SOURCE = "CoCoOp base-to-new halves (label order)"


def halves(n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Base = the first ceil(C/2) class indices, new = the rest (CoCoOp's subsample_classes)."""
    m = (n_classes + 1) // 2
    return np.arange(m), np.arange(m, n_classes)


def split_of(n_classes: int) -> dict:
    base, new = halves(n_classes)
    return {"base": base.tolist(), "val": [], "novel": new.tolist(), "source": SOURCE}


def restrict_for_fit(store, shots: int, seed: int, hp_selection: str) -> str:
    """Make ``store`` show a fit only the base half's K train shots of ``seed`` (the rows the
    all-way protocol draws for that seed) and its validation rows; returns a description."""
    base, _ = halves(store.num_classes)
    store.override_class_split(split=split_of(store.num_classes))
    keep = {}
    raw = store.labels("train")
    valid = np.flatnonzero(raw >= 0)  # the rows gather() returns, in its order
    rows = sample_shots(raw[valid], base, shots, seed, store.class_names, option="--shots")
    keep["train"] = np.zeros(len(raw), bool)
    keep["train"][valid[rows.reshape(-1)]] = True
    n_val = 0
    if store.has_split("val"):
        yv = store.labels("val")
        keep["val"] = np.zeros(len(yv), bool)
        if hp_selection != "none":
            v = validation_rows(yv, base, shots, seed, hp_selection)
            keep["val"][v] = True
            n_val = len(v)
    for s in store.splits:
        if s not in keep:
            keep[s] = np.zeros(store.n_rows(s), bool)
    desc = (f"base-to-new: the fit saw {shots} train shots (seed {seed}) of each of the {len(base)} base classes and "
            f"{n_val} val rows ({hp_selection} rule); the {store.num_classes - len(base)} new classes and every test row "
            f"were hidden")
    store.restrict_rows(keep, ["train"], desc)
    return desc


@dataclass
class BaseToNewScores:
    base: AllwayScores
    new: AllwayScores | None  # None: the head cannot classify classes it has no shot of
    base_classes: np.ndarray  # the class order of ``base.per_class``
    new_classes: np.ndarray  # the class order of ``new.per_class``


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def run_base_to_new(train_x: torch.Tensor | Callable[[np.ndarray], torch.Tensor], train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray,
                    n_classes: int, shot: int, seeds: tuple[int, ...], head: Head, transfers: bool,
                    class_names=None, transductive: bool = False, batch_setting=None) -> BaseToNewScores:
    """Base: all-way over the base half with K shots per class; new: over the new half with no
    shot (the head gets an empty support of the new classes), when ``transfers``. ``transductive``:
    each half's test rows are classified jointly by TransCLIP (zero-shot setting for the new half);
    ``batch_setting`` (a :class:`~fskd.evaluation.transductive.BatchSetting`): in realistic batches, per half."""
    base, new = halves(n_classes)
    in_base = np.isin(test_y, base)
    idx_b = torch.from_numpy(np.flatnonzero(in_base)).to(test_x.device)
    b = run_allway(train_x, train_y, test_x[idx_b], test_y[in_base], base, shot, seeds, head, class_names=class_names,
                   transductive=transductive, batch_setting=batch_setting)
    n = None
    if transfers:
        idx_n = torch.from_numpy(np.flatnonzero(~in_base)).to(test_x.device)
        n = run_allway(train_x, train_y, test_x[idx_n], test_y[~in_base], new, 0, seeds, head, class_names=class_names,
                       transductive=transductive, batch_setting=batch_setting)
    return BaseToNewScores(b, n, base, new)
