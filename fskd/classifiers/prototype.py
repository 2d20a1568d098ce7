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
    def __init__(self, protos: torch.Tensor, center: torch.Tensor | None) -> None:
        self.protos, self.center = protos, center  # (E, N, D) normalised

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        return torch.bmm(normalize(query, self.center), self.protos.transpose(1, 2))

    def predict(self, query: torch.Tensor) -> torch.Tensor:
        if self.protos.shape[0] == 1 and query.shape[1] >= FAISS_MIN_QUERIES:
            q = normalize(query, self.center)[0].cpu().numpy()
            return torch.from_numpy(faiss_nearest(self.protos[0].cpu().numpy(), q)).long()[None].to(query.device)
        return self.logits(query).argmax(-1)


class PrototypeHead(Head):
    """Nearest normalised class mean; ``center`` (base mean) subtracted first when given."""

    name = "prototype"

    def __init__(self, context: ClassContext | None = None, center_support: bool = False) -> None:
        self.center = context.center if context is not None else None
        self.center_support = center_support

    def fit(self, support: torch.Tensor, classes: torch.Tensor) -> FittedPrototypes:
        if self.center is not None:
            cs = cq = self.center  # (D,)
        elif self.center_support:  # per-episode support mean (all-way has no base classes)
            m = support.mean(dim=(1, 2))
            cs, cq = m[:, None, None], m[:, None]
        else:
            cs = cq = None
        return FittedPrototypes(F.normalize(normalize(support, cs).mean(2), dim=-1), cq)


CLASSIFIERS.register("prototype", lambda ctx: PrototypeHead(ctx), help="SimpleShot nearest class mean (base-mean centring, L2), FAISS for large banks")
