"""The all-way protocol of CLIP few-shot papers: K shots per class from the train split, every
class at once, the full test split as queries; repeated over seeds (mean and std)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fskd.classifiers.base import Head
from fskd.errors import ConfigError, EvaluationError
from fskd.evaluation.metrics import Calibration, class_accuracies
from fskd.evaluation.transductive import BatchSetting, realistic_batches, transclip, transclip_batches
from fskd.store.sampling import sample_shots

TOPK = 5


@dataclass
class AllwayScores:
    """Per seed: top-1 accuracy (S,), top-5 accuracy (S,) when there are more than 5 classes,
    per-class accuracy (S, C) in the order of ``classes`` (fractions); the expected calibration
    error (S,) (fraction, 15 bins) and the negative log-likelihood (S,) of the softmax of the
    head's logits as they are (a cosine head's unscaled scores give near-uniform probabilities)."""

    top1: np.ndarray
    top5: np.ndarray | None
    per_class: np.ndarray
    ece: np.ndarray | None = None
    nll: np.ndarray | None = None
    batches: list[int] | None = None  # transductive in batches (``batch_setting``): how many, per seed


def store_rows(store, split: str, device) -> tuple[Callable[[np.ndarray], torch.Tensor], np.ndarray]:
    """``(take, labels)`` for :func:`run_allway`: the labels of ``split``'s valid rows, and a function
    reading the features of some of them (indices into those labels) from the store, by row."""
    valid = store.valid_rows(split)
    return (lambda r: torch.from_numpy(store.take(split, valid[r])).to(device)), store.labels(split)[valid]


def run_allway(
    train_x: torch.Tensor | Callable[[np.ndarray], torch.Tensor],
    train_y: np.ndarray,
    test_x: torch.Tensor,
    test_y: np.ndarray,
    classes: np.ndarray,
    shot: int,
    seeds: tuple[int, ...],
    head: Head,
    query_batch: int = 8192,
    class_names=None,
    transductive: bool = False,
    batch_setting: BatchSetting | None = None,
) -> AllwayScores:
    """Scores per seed over the full test split (see :class:`AllwayScores`). ``train_x``: the train
    rows' features (n, D), or a function giving the features of some rows (:func:`store_rows`), so
    only each seed's C*K shots are read. ``transductive``: classify every test row at once with
    TransCLIP (:mod:`fskd.evaluation.transductive`) on top of the head's logits (the shots' and
    test rows' features as stored, the softmax of the head's logits as the inductive
    predictions); top-1/top-5 are then of the transductive assignments, and there is no ECE/NLL
    (the assignments are not the head's probabilities). ``batch_setting``: TransCLIP on the
    realistic batches of each seed instead (:func:`~fskd.evaluation.transductive.realistic_batches`),
    their count per seed in ``batches``."""
    if len(test_y) == 0:
        raise EvaluationError("the all-way protocol needs a test split with samples of the evaluated classes")
    if batch_setting is not None and batch_setting.active_classes > len(classes):
        raise ConfigError(f"--active-classes {batch_setting.active_classes} is more than the {len(classes)} classes "
                          f"evaluated here: give 1 ... {len(classes)}")
    pos = {int(c): i for i, c in enumerate(classes)}
    truth = torch.tensor([pos[int(c)] for c in test_y], device=test_x.device)
    cls = torch.as_tensor(classes, device=test_x.device)[None]
    top1, top5, per_class, ece, nll, n_batches = [], [], [], [], [], []
    k = TOPK if len(classes) > TOPK else 0
    take = train_x if callable(train_x) else (lambda r: train_x[torch.from_numpy(r).to(train_x.device)])
    raw_test, test_x = test_x, head.prepare(test_x)
    truth_np = truth.cpu().numpy()
    for seed in seeds:
        rows = sample_shots(train_y, classes, shot, seed, class_names)  # (C, K)
        raw_support = take(rows.reshape(-1))
        support = head.prepare(raw_support)  # row-wise, so preparing the shots alone is the same
        fitted = head.fit(support.reshape(len(classes), shot, support.shape[-1])[None], cls)
        if transductive:
            logits = torch.cat([fitted.logits(test_x[s : s + query_batch][None])[0]
                                for s in range(0, len(test_y), query_batch)])  # (M, C): every test row
            way = torch.arange(len(classes), device=raw_support.device).repeat_interleave(shot)
            if batch_setting is None:
                out = transclip(raw_test, logits.softmax(-1), raw_support, way)
                pred_t, scores_t = out.pred, out.scores
            else:
                batches = realistic_batches(truth_np, batch_setting, seed)
                pred_t, scores_t = transclip_batches(raw_test, logits.softmax(-1), raw_support, way, batches)
                n_batches.append(len(batches))
            pred = pred_t.cpu().numpy()
            top1.append(float((pred == truth_np).mean()))
            if k:
                top5.append(int((scores_t.topk(k, dim=-1).indices == truth[:, None]).any(-1).sum()) / len(test_y))
            per_class.append(class_accuracies(pred, truth_np, len(classes)))
            continue
        preds, in5, cal = [], 0, Calibration()
        for s in range(0, len(test_y), query_batch):
            q = test_x[s : s + query_batch][None]
            preds.append(fitted.predict(q)[0].cpu())
            cal.add(fitted.logits(q)[0], truth[s : s + query_batch])
            if k:
                in5 += int((fitted.topk(q, k)[0] == truth[s : s + query_batch, None]).any(-1).sum())
        pred = torch.cat(preds).numpy()
        top1.append(float((pred == truth_np).mean()))
        top5.append(in5 / len(test_y))
        per_class.append(class_accuracies(pred, truth_np, len(classes)))
        ece.append(cal.ece())
        nll.append(cal.mean_nll())
    if transductive:
        return AllwayScores(np.asarray(top1), np.asarray(top5) if k else None, np.stack(per_class),
                            batches=n_batches if batch_setting is not None else None)
    return AllwayScores(np.asarray(top1), np.asarray(top5) if k else None, np.stack(per_class), np.asarray(ece),
                        np.asarray(nll))
