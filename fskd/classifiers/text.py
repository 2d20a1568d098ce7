"""``text``: zero-shot classification with class text features as weights (in image space)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fskd.classifiers.base import CLASSIFIERS, ClassContext, FittedHead, Head
from fskd.errors import EvaluationError


class FittedText(FittedHead):
    def __init__(self, weights: torch.Tensor) -> None:
        self.weights = weights  # (E, N, D) normalised

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        return torch.bmm(F.normalize(query, dim=-1), self.weights.transpose(1, 2))


class TextHead(Head):
    """Cosine similarity to the class text features; the support set is not used."""

    name = "text"
    needs_text = True

    def __init__(self, context: ClassContext) -> None:
        if context.text is None:
            raise EvaluationError(
                "classifier 'text' needs class text features in image space: this store's encoder has no "
                "joint image-text space (or no text tower). Learn a bridge with `fskd adapt --method zero-shot` "
                "and evaluate with --state DIR"
            )
        self.text = F.normalize(context.text, dim=-1)

    def fit(self, support: torch.Tensor, classes: torch.Tensor) -> FittedText:
        return FittedText(self.text.to(classes.device)[classes])


CLASSIFIERS.register("text", TextHead)
