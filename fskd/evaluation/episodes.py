"""Episodic N-way K-shot evaluation, batched over episodes.

All episodes are sampled at once with array operations (no Python loop per episode or per
class), gathered into (E, N, K, D) support and (E, N*Q, D) query tensors, and scored by the
head in batches of episodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fskd.classifiers.base import Head
from fskd.errors import EvaluationError


@dataclass
class Episodes:
    """Row indices into the pooled features: support (E, N, K), query (E, N, Q); classes (E, N)."""

    support: np.ndarray
    query: np.ndarray
    classes: np.ndarray


def sample_episodes(
    labels: np.ndarray,
    classes: list[int] | np.ndarray,
    way: int,
    shot: int,
    query: int,
    episodes: int,
    seed: int,
    class_names: list[str] | None = None,
) -> Episodes:
    """Sample ``episodes`` N-way K-shot Q-query episodes from rows with ``labels`` in ``classes``.

    Raises EvaluationError naming the class and the counts when a class has fewer than
    shot + query rows, or when fewer than ``way`` classes are available.
    """
    classes = np.asarray(sorted(set(int(c) for c in classes)))
    labels = np.asarray(labels)
    if len(classes) < way:
        raise EvaluationError(f"{way}-way episodes need at least {way} classes; the split has {len(classes)}")
    need = shot + query
    counts = np.array([(labels == c).sum() for c in classes])
    short = np.flatnonzero(counts < need)
    if len(short):
        c = classes[short[0]]
        name = class_names[c] if class_names else str(c)
        raise EvaluationError(
            f"class {name!r} has {counts[short[0]]} samples, fewer than shot + query = {shot} + {query} = {need}"
            + (f" ({len(short)} classes are short)" if len(short) > 1 else "")
        )
    rng = np.random.default_rng(seed)
    # members: (C, max_count) row indices per class, padded with -1
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, classes)
    width = counts.max()
    offs = np.arange(width)
    members = np.where(offs[None, :] < counts[:, None], order[np.minimum(starts[:, None] + offs[None, :], len(order) - 1)], -1)
    # classes per episode: the first `way` of a random permutation of the C classes
    ep_cls = np.argsort(rng.random((episodes, len(classes))), axis=1)[:, :way]  # (E, N) positions
    # samples per (episode, way): the `need` smallest random keys among the class's members
    keys = rng.random((episodes, way, width))
    keys[offs[None, None, :] >= counts[ep_cls][:, :, None]] = np.inf
    pick = np.argpartition(keys, need - 1, axis=2)[:, :, :need]
    rows = np.take_along_axis(members[ep_cls], pick, axis=2)  # (E, N, need)
    return Episodes(support=rows[:, :, :shot], query=rows[:, :, shot:], classes=classes[ep_cls])


def _rows(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """features[index] for an index tensor of any shape: (*index.shape, D)."""
    return features.index_select(0, index.reshape(-1)).view(*index.shape, features.shape[-1])


def run_episodes(
    features: torch.Tensor,
    episodes: Episodes,
    head: Head,
    batch: int = 50,
) -> np.ndarray:
    """Per-episode accuracy (E,) of ``head`` on pooled ``features`` (n, D)."""
    E, N, Q = episodes.query.shape
    accs = []
    features = head.prepare(features)
    truth = torch.arange(N, device=features.device).repeat_interleave(Q)  # queries are grouped by way
    support_rows = torch.from_numpy(episodes.support).to(features.device)
    query_rows = torch.from_numpy(episodes.query).to(features.device)
    classes = torch.from_numpy(episodes.classes).to(features.device)
    for s in range(0, E, batch):
        sup, qry = support_rows[s : s + batch], query_rows[s : s + batch]
        # index_select on flat row ids is several times faster than advanced indexing on CPU
        fitted = head.fit(_rows(features, sup), classes[s : s + batch])
        pred = fitted.predict(_rows(features, qry.reshape(len(qry), N * Q)))
        accs.append((pred == truth).float().mean(1).cpu())
    return torch.cat(accs).numpy()
