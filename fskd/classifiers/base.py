"""The head interface: fit on a batch of episodes' support sets, score their queries.

Everything is batched over episodes: ``support`` is (E, N, K, D) (E episodes, N classes, K
shots), ``query`` is (E, M, D) and ``classes`` (E, N) holds the store's class index of each
way (heads that use text look their weights up with it). The all-way protocol is one episode
with every class (E = 1). Heads are stateless building blocks; methods (adapt, align) fit their
own parameters on base classes and return heads built from these.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from fskd.classifiers import CLASSIFIERS  # noqa: F401 - re-exported for the head modules


@dataclass
class ClassContext:
    """What a head may use beyond the support set.

    text:   (C, D) L2-normalised class text features in *image* space (identity for a joint
            encoder, through the bridge otherwise), or None when unavailable.
    center: (D,) a mean feature to subtract before normalising (SimpleShot's base mean), or None.
    """

    text: torch.Tensor | None = None
    center: torch.Tensor | None = None


class FittedHead(ABC):
    @abstractmethod
    def logits(self, query: torch.Tensor) -> torch.Tensor:
        """(E, M, D) -> (E, M, N) class scores."""

    def predict(self, query: torch.Tensor) -> torch.Tensor:
        """(E, M, D) -> (E, M) predicted way index."""
        return self.logits(query).argmax(-1)

    def topk(self, query: torch.Tensor, k: int) -> torch.Tensor:
        """(E, M, D) -> (E, M, k) way indices of the k highest scores, best first."""
        return self.logits(query).topk(k, dim=-1).indices


class Head(ABC):
    name: str = ""
    #: whether the head looks at text features (needs ClassContext.text)
    needs_text: bool = False

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        """A row-wise transform applied once to the pooled features before episodes are gathered
        (centring, normalising, a fixed feature map): cheaper than repeating it on every gathered
        copy. ``fit`` and ``logits`` receive prepared rows. Identity by default."""
        return features

    @abstractmethod
    def fit(self, support: torch.Tensor, classes: torch.Tensor) -> FittedHead:
        """support (E, N, K, D), classes (E, N) -> a head that scores (E, M, D) queries."""
