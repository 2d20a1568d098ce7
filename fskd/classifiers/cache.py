"""``tip``: the Tip-Adapter cache model (Zhang et al., ECCV 2022), batched over episodes.

    logits = text_scale * q T^T  +  alpha * exp(-beta * (1 - q K^T)) L

q: L2-normalised query features, T: class text weights in image space, K: the cache keys
(the normalised support features, or fine-tuned keys for Tip-Adapter-F), L: one-hot values
(the way of each key). ``alpha = 0`` is exactly the zero-shot classifier.

Large support banks (one episode with at least ``LARGE_BANK_KEYS`` keys, e.g. 1000 classes x
16 shots) are scored exactly, in blocks of queries whose (block x S) affinities stay under
``BLOCK_VALUES`` values, summed into classes with ``index_add_`` (no one-hot matmul). A FAISS
top-k lookup (``use_faiss=True``) is kept as an explicit approximation only: it drops every key
outside a query's ``topk``, and at a small beta those keys do not weigh ~0 (at beta = 1 a key
of similarity 0 still weighs exp(-1) = 0.37, and 16,000 of them outweigh the top 256), so
validation, which scores densely, and an evaluation through FAISS would disagree.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fskd.classifiers.base import CLASSIFIERS, ClassContext, FittedHead, Head
from fskd.errors import EvaluationError

LARGE_BANK_KEYS = 8192
BLOCK_VALUES = 2**25
TOPK = 256
#: CLIP's logit scale, used by Tip-Adapter for the zero-shot term
TEXT_SCALE = 100.0


def affinity(query: torch.Tensor, keys: torch.Tensor, beta: float) -> torch.Tensor:
    """exp(-beta (1 - q k^T)): (E, M, D), (E, S, D) -> (E, M, S)."""
    return torch.exp(-beta * (1.0 - torch.bmm(query, keys.transpose(1, 2))))


def cache_logits(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    n_ways: int,
    beta: float,
    topk: int | None = None,
    use_faiss: bool | None = None,
) -> torch.Tensor:
    """The cache term (without alpha): (E, M, D) queries, (E, S, D) keys, (E, S) way of each key -> (E, M, N)."""
    E, S = values.shape
    if use_faiss and E == 1 and S > 0:
        return _faiss_cache(query[0], keys[0], values[0], n_ways, beta, topk or TOPK)[None]
    if E == 1 and S >= LARGE_BANK_KEYS:
        return _blocked_cache(query[0], keys[0], values[0], n_ways, beta)[None]
    onehot = F.one_hot(values, n_ways).to(query.dtype)  # (E, S, N)
    return torch.bmm(affinity(query, keys, beta), onehot)


def _blocked_cache(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n_ways: int, beta: float
) -> torch.Tensor:
    """The exact cache term of one large bank: (M, D) queries, (S, D) keys, (S,) ways -> (M, N)."""
    out = torch.zeros(len(query), n_ways, device=query.device, dtype=query.dtype)
    rows = max(1, BLOCK_VALUES // max(1, len(keys)))
    for i in range(0, len(query), rows):
        a = torch.exp(-beta * (1.0 - query[i : i + rows] @ keys.T))
        out[i : i + rows].index_add_(1, values, a)
    return out


def _faiss_cache(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n_ways: int, beta: float, topk: int
) -> torch.Tensor:
    from fskd.classifiers.prototype import faiss_ip_index

    k = min(topk, len(keys))
    index = faiss_ip_index(keys.detach().cpu().numpy())
    sims, idx = index.search(np.ascontiguousarray(query.detach().cpu().numpy(), dtype=np.float32), k)
    sims_t = torch.from_numpy(sims).to(query.device)
    idx_t = torch.from_numpy(idx).to(query.device).long()
    w = torch.exp(-beta * (1.0 - sims_t))  # (M, k)
    out = torch.zeros(len(query), n_ways, device=query.device, dtype=query.dtype)
    return out.scatter_add_(1, values[idx_t], w.to(query.dtype))


class FittedTip(FittedHead):
    """Tip-Adapter scores; ``embed`` maps raw (E, M, D) queries to normalised features."""

    def __init__(
        self,
        text: torch.Tensor | None,
        keys: torch.Tensor,
        values: torch.Tensor,
        alpha: float,
        beta: float,
        embed,
        text_scale: float = TEXT_SCALE,
    ) -> None:
        self.text, self.keys, self.values = text, keys, values  # (E, N, D) | None, (E, S, D), (E, S)
        self.alpha, self.beta, self.embed, self.text_scale = alpha, beta, embed, text_scale
        self.n_ways = text.shape[1] if text is not None else int(values.max()) + 1

    def text_logits(self, q: torch.Tensor) -> torch.Tensor:
        return self.text_scale * torch.bmm(q, self.text.transpose(1, 2))

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        q = self.embed(query)
        out = self.text_logits(q) if self.text is not None else 0.0
        if self.alpha != 0 and self.keys.shape[1] > 0:
            out = out + self.alpha * cache_logits(q, self.keys, self.values, self.n_ways, self.beta)
        return out


def cache_from_support(embedded_support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, N, K, D) embedded support -> keys (E, N*K, D) and values (E, N*K)."""
    E, N, K, D = embedded_support.shape
    values = torch.arange(N, device=embedded_support.device).repeat_interleave(K)[None].expand(E, -1)
    return embedded_support.reshape(E, N * K, D), values


class TipHead(Head):
    """Training-free Tip-Adapter with the paper's ImageNet defaults (alpha 1, beta 5.5); needs
    class text features in image space (a joint encoder). The ``tip-adapter`` adapt method
    chooses alpha and beta on validation data and bridges non-joint spaces."""

    name = "tip"
    needs_text = True

    def __init__(self, context: ClassContext, alpha: float = 1.0, beta: float = 5.5) -> None:
        if context.text is None:
            raise EvaluationError(
                "classifier 'tip' needs class text features in image space: this store's encoder has no joint "
                "image-text space (or no text tower). Use `fskd adapt --method tip-adapter` (it learns a bridge) and "
                "evaluate with --state DIR"
            )
        self.text, self.alpha, self.beta = F.normalize(context.text, dim=-1), alpha, beta

    def fit(self, support: torch.Tensor, classes: torch.Tensor) -> FittedTip:
        embed = lambda x: F.normalize(x, dim=-1)  # noqa: E731 - a joint space: no centring
        keys, values = cache_from_support(embed(support))
        return FittedTip(self.text.to(support.device)[classes], keys, values, self.alpha, self.beta, embed)


CLASSIFIERS.register("tip", TipHead)
