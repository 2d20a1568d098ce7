"""Episodic N-way K-shot evaluation, batched over episodes (sampling: fskd.store.sampling).

Episodes are sampled with array operations (no Python loop per episode or per class), in
batches whose memory does not grow with the episode count (``iter_episodes``), gathered into
(E, N, K, D) support and (E, N*Q, D) query tensors, and scored by the head in batches of episodes.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from fskd.classifiers.base import Head
from fskd.store.sampling import Episodes, iter_episodes, sample_episodes


def _rows(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """features[index] for an index tensor of any shape: (*index.shape, D)."""
    return features.index_select(0, index.reshape(-1)).view(*index.shape, features.shape[-1])


def run_episodes(
    features: torch.Tensor,
    episodes: Episodes | Iterable[Episodes],
    head: Head,
    batch: int = 50,
) -> np.ndarray:
    """Per-episode accuracy (E,) of ``head`` on pooled ``features`` (n, D). ``episodes``: one
    :class:`Episodes`, or batches of them (:func:`iter_episodes`, sized in multiples of ``batch``
    so that the scored batches are those of one draw)."""
    accs = []
    features = head.prepare(features)
    for part in [episodes] if isinstance(episodes, Episodes) else episodes:
        E, N, Q = part.query.shape
        truth = torch.arange(N, device=features.device).repeat_interleave(Q)  # queries are grouped by way
        support_rows = torch.from_numpy(part.support).to(features.device)
        query_rows = torch.from_numpy(part.query).to(features.device)
        classes = torch.from_numpy(part.classes).to(features.device)
        for s in range(0, E, batch):
            sup, qry = support_rows[s : s + batch], query_rows[s : s + batch]
            # index_select on flat row ids is several times faster than advanced indexing on CPU
            fitted = head.fit(_rows(features, sup), classes[s : s + batch])
            pred = fitted.predict(_rows(features, qry.reshape(len(qry), N * Q)))
            accs.append((pred == truth).float().mean(1).cpu())
    return torch.cat(accs).numpy()


__all__ = ["Episodes", "iter_episodes", "run_episodes", "sample_episodes"]
