"""Nearest class mean on centred, L2-normalised features, by one of two rules:

- ``cosine`` (the ``prototype`` head, the default): cosine to the *renormalised* mean of the
  normalised shots: easyfsl's SimpleShot rule, i.e. ProtoNet with cosine similarity.
- ``simpleshot`` (the ``simpleshot`` head): the SimpleShot authors' rule (Wang et al. 2019,
  github.com/mileyan/simple_shot, ``metric_class_type`` with ``CL2N``): Euclidean distance to the
  mean of the CL2N shots, *not* renormalised; logits are minus the squared distance.

The two predict alike at 1 shot (a single normalised shot has unit norm, and for unit vectors
the squared distance is 2 - 2 cos); from 2 shots the class means have norms below 1 that differ
between classes, and the rules can disagree.

Episodes are scored with one batched matmul; a single large episode (the all-way protocol)
predicts through a FAISS index over the class means (inner product for ``cosine``, L2 for
``simpleshot``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fskd.classifiers.base import CLASSIFIERS, ClassContext, FittedHead, Head
from fskd.errors import ConfigError

FAISS_MIN_QUERIES = 4096  # below this, a batched matmul beats building an index

#: rule -> what it is; ``cosine`` is the default
RULES = {
    "cosine": "cosine to the renormalised class mean (easyfsl's SimpleShot; ProtoNet with cosine)",
    "simpleshot": "Euclidean distance to the un-renormalised mean of the CL2N shots (the SimpleShot authors' code)",
}


def normalize(x: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    return F.normalize(x - center if center is not None else x, dim=-1)


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ConfigError(f"prototype rule must be one of {', '.join(RULES)}, got {rule!r}")
    return rule


def faiss_ip_index(vectors: np.ndarray, metric: str = "ip"):
    """An exact inner-product FAISS index holding ``vectors`` (n, D) (``metric="l2"``: squared
    Euclidean); on the GPUs when faiss-gpu (the ``gpu`` extra) sees one."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1]) if metric == "ip" else faiss.IndexFlatL2(vectors.shape[1])
    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def faiss_nearest(prototypes: np.ndarray, queries: np.ndarray, k: int = 1, metric: str = "ip") -> np.ndarray:
    """Indices of the ``k`` highest inner product prototypes for each query, best first (``metric="l2"``:
    the ``k`` nearest in Euclidean distance): (C, D), (M, D) -> (M,) for k = 1, else (M, k)."""
    _, idx = faiss_ip_index(prototypes, metric).search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return idx[:, 0] if k == 1 else idx


class FittedPrototypes(FittedHead):
    def __init__(
        self, protos: torch.Tensor, query_center: torch.Tensor | None, normalize_query: bool, rule: str = "cosine"
    ) -> None:
        self.protos = protos  # (E, N, D): normalised (cosine), the plain mean of normalised shots (simpleshot)
        self.query_center, self.normalize_query = query_center, normalize_query
        self.rule = rule
        self._metric = "ip" if rule == "cosine" else "l2"

    def _queries(self, query: torch.Tensor) -> torch.Tensor:
        return normalize(query, self.query_center) if self.normalize_query else query

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        q = self._queries(query)
        dots = torch.bmm(q, self.protos.transpose(1, 2))
        if self.rule == "cosine":
            return dots
        # simpleshot: -||q - c||^2 = 2 q.c - ||c||^2 - ||q||^2, clamped at 0 against rounding
        sq = q.pow(2).sum(-1, keepdim=True) + self.protos.pow(2).sum(-1)[:, None, :] - 2 * dots
        return -sq.clamp_min(0)

    def predict(self, query: torch.Tensor) -> torch.Tensor:
        if self.protos.shape[0] == 1 and query.shape[1] >= FAISS_MIN_QUERIES:
            q = self._queries(query)[0].cpu().numpy()
            idx = faiss_nearest(self.protos[0].cpu().numpy(), q, metric=self._metric)
            return torch.from_numpy(idx).long()[None].to(query.device)
        return self.logits(query).argmax(-1)

    def topk(self, query: torch.Tensor, k: int) -> torch.Tensor:
        if self.protos.shape[0] == 1 and query.shape[1] >= FAISS_MIN_QUERIES:
            q = self._queries(query)[0].cpu().numpy()
            idx = faiss_nearest(self.protos[0].cpu().numpy(), q, k, self._metric).reshape(len(q), k)
            return torch.from_numpy(idx).long()[None].to(query.device)
        return self.logits(query).topk(k, dim=-1).indices


class PrototypeHead(Head):
    """Nearest class mean of the normalised shots; ``center`` (base mean) subtracted first when
    given. ``rule`` (:data:`RULES`): ``cosine`` (cosine to the renormalised mean) or ``simpleshot``
    (Euclidean distance to the plain mean).

    ``prepare_rows=True`` (what ``fskd eval`` uses) centres and normalises the pooled rows once in
    ``prepare`` and then expects prepared rows in ``fit``/``logits``; the default takes raw rows,
    so a method can reuse this head inside its own. With ``center_support`` (all-way: no base
    classes) each support set's mean is the centre.
    """

    name = "prototype"

    def __init__(
        self,
        context: ClassContext | None = None,
        center_support: bool = False,
        prepare_rows: bool = False,
        rule: str = "cosine",
    ) -> None:
        self.center = context.center if context is not None else None
        self.center_support = center_support
        self.prepare_rows = prepare_rows and not center_support
        self.rule = check_rule(rule)
        if rule != "cosine":
            self.name = rule

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        return normalize(features, self.center) if self.prepare_rows else features

    def fit(self, support: torch.Tensor, classes: torch.Tensor) -> FittedPrototypes:
        if self.prepare_rows:  # rows are already centred and normalised
            return FittedPrototypes(self._means(support), None, False, self.rule)
        if self.center_support:
            m = support.mean(dim=(1, 2))
            cs, cq = m[:, None, None], m[:, None]
        else:
            cs = cq = self.center
        return FittedPrototypes(self._means(normalize(support, cs)), cq, True, self.rule)

    def _means(self, normalized: torch.Tensor) -> torch.Tensor:
        """(E, N, K, D) normalised shots -> (E, N, D) class means, renormalised for ``cosine``."""
        mean = normalized.mean(2)
        return F.normalize(mean, dim=-1) if self.rule == "cosine" else mean


CLASSIFIERS.register("prototype", lambda ctx: PrototypeHead(ctx, prepare_rows=True))
CLASSIFIERS.register("simpleshot", lambda ctx: PrototypeHead(ctx, prepare_rows=True, rule="simpleshot"))
