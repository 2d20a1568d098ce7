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


def faiss_nearest(prototypes: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Index of the highest inner product prototype for each query: (C, D), (M, D) -> (M,)."""
    import faiss

    index = faiss.IndexFlatIP(prototypes.shape[1])
    index.add(np.ascontiguousarray(prototypes, dtype=np.float32))
    _, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), 1)
    return idx[:, 0]


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


class PrototypeHead(Head):
    """Nearest normalised class mean; ``center`` (base mean) subtracted first when given.

    With a fixed centre, rows are centred and normalised once in ``prepare``; with
    ``center_support`` (all-way: no base classes) each support set's mean is the centre.
    """

    name = "prototype"

    def __init__(self, context: ClassContext | None = None, center_support: bool = False) -> None:
        self.center = context.center if context is not None else None
        self.center_support = center_support

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.center_support else normalize(features, self.center)

    def fit(self, support: torch.Tensor, classes: torch.Tensor) -> FittedPrototypes:
        if not self.center_support:  # rows were prepared: centred and normalised
            return FittedPrototypes(F.normalize(support.mean(2), dim=-1), None, False)
        m = support.mean(dim=(1, 2))
        protos = F.normalize(normalize(support, m[:, None, None]).mean(2), dim=-1)
        return FittedPrototypes(protos, m[:, None], True)


CLASSIFIERS.register("prototype", lambda ctx: PrototypeHead(ctx), help="SimpleShot nearest class mean (base-mean centring, L2), FAISS for large banks")
