"""``prototype``: SimpleShot-style nearest class mean (centre, L2-normalise, cosine).

Episodes are scored with one batched matmul; a single large episode (the all-way protocol)
predicts through a FAISS inner-product index over the normalised class means.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fskd.classifiers.base import CLASSIFIERS, ClassContext, FittedHead, Head

FAISS_MIN_QUERIES = 4096  # below this, a batched matmul beats building an index


def normalize(x: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    return F.normalize(x - center if center is not None else x, dim=-1)


def faiss_ip_index(vectors: np.ndarray):
    """An exact inner-product FAISS index holding ``vectors`` (n, D); on the GPUs when faiss-gpu
    (the ``gpu`` extra) sees one."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def faiss_nearest(prototypes: np.ndarray, queries: np.ndarray, k: int = 1) -> np.ndarray:
    """Indices of the ``k`` highest inner product prototypes for each query, best first:
    (C, D), (M, D) -> (M,) for k = 1, else (M, k)."""
    _, idx = faiss_ip_index(prototypes).search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return idx[:, 0] if k == 1 else idx


class FittedPrototypes(FittedHead):
    def __init__(self, protos: torch.Tensor, query_center: torch.Tensor | None, normalize_query: bool) -> None:
        self.protos = protos  # (E, N, D) normalised
        self.query_center, self.normalize_query = query_center, normalize_query

    def _queries(self, query: torch.Tensor) -> torch.Tensor:
        return normalize(query, self.query_center) if self.normalize_query else query

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        return torch.bmm(self._queries(query), self.protos.transpose(1, 2))

    def predict(self, query: torch.Tensor) -> torch.Tensor:
        if self.protos.shape[0] == 1 and query.shape[1] >= FAISS_MIN_QUERIES:
            q = self._queries(query)[0].cpu().numpy()
            return torch.from_numpy(faiss_nearest(self.protos[0].cpu().numpy(), q)).long()[None].to(query.device)
        return self.logits(query).argmax(-1)

    def topk(self, query: torch.Tensor, k: int) -> torch.Tensor:
        if self.protos.shape[0] == 1 and query.shape[1] >= FAISS_MIN_QUERIES:
            q = self._queries(query)[0].cpu().numpy()
            idx = faiss_nearest(self.protos[0].cpu().numpy(), q, k).reshape(len(q), k)
            return torch.from_numpy(idx).long()[None].to(query.device)
        return self.logits(query).topk(k, dim=-1).indices


class PrototypeHead(Head):
    """Nearest normalised class mean; ``center`` (base mean) subtracted first when given.

    ``prepare_rows=True`` (what ``fskd eval`` uses) centres and normalises the pooled rows once in
    ``prepare`` and then expects prepared rows in ``fit``/``logits``; the default takes raw rows,
    so a method can reuse this head inside its own. With ``center_support`` (all-way: no base
    classes) each support set's mean is the centre.
    """

    name = "prototype"

    def __init__(self, context: ClassContext | None = None, center_support: bool = False,
                 prepare_rows: bool = False) -> None:
        self.center = context.center if context is not None else None
        self.center_support = center_support
        self.prepare_rows = prepare_rows and not center_support

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        return normalize(features, self.center) if self.prepare_rows else features

    def fit(self, support: torch.Tensor, classes: torch.Tensor) -> FittedPrototypes:
        if self.prepare_rows:  # rows are already centred and normalised
            return FittedPrototypes(F.normalize(support.mean(2), dim=-1), None, False)
        if self.center_support:
            m = support.mean(dim=(1, 2))
            cs, cq = m[:, None, None], m[:, None]
        else:
            cs = cq = self.center
        protos = F.normalize(normalize(support, cs).mean(2), dim=-1)
        return FittedPrototypes(protos, cq, True)


CLASSIFIERS.register('prototype', lambda ctx: PrototypeHead(ctx, prepare_rows=True))
