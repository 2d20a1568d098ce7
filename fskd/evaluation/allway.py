"""The all-way protocol of CLIP few-shot papers: K shots per class from the train split, every
class at once, the full test split as queries; repeated over seeds (mean and std)."""

from __future__ import annotations

import numpy as np
import torch

from fskd.classifiers.base import Head
from fskd.errors import EvaluationError
from fskd.store.sampling import sample_shots


def run_allway(
    train_x: torch.Tensor,
    train_y: np.ndarray,
    test_x: torch.Tensor,
    test_y: np.ndarray,
    classes: np.ndarray,
    shot: int,
    seeds: tuple[int, ...],
    head: Head,
    query_batch: int = 8192,
    class_names=None,
) -> np.ndarray:
    """Accuracy per seed (S,) over the full test split."""
    if len(test_y) == 0:
        raise EvaluationError("the all-way protocol needs a test split with samples of the evaluated classes")
    pos = {int(c): i for i, c in enumerate(classes)}
    truth = torch.tensor([pos[int(c)] for c in test_y], device=test_x.device)
    cls = torch.as_tensor(classes, device=test_x.device)[None]
    out = []
    train_x, test_x = head.prepare(train_x), head.prepare(test_x)
    for seed in seeds:
        rows = torch.from_numpy(sample_shots(train_y, classes, shot, seed, class_names)).to(train_x.device)
        fitted = head.fit(train_x[rows][None], cls)
        correct = 0
        for s in range(0, len(test_y), query_batch):
            pred = fitted.predict(test_x[s : s + query_batch][None])[0]
            correct += int((pred == truth[s : s + query_batch]).sum())
        out.append(correct / len(test_y))
    return np.asarray(out)
