"""``zero-shot``: class text features as classifier weights (through the bridge when the store's
image and text spaces differ; the identity for a joint CLIP store). The support set is unused
except to learn the bridge in the all-way regime of a non-joint store (see regimes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fskd.methods.adapt.method import AdaptMethod, AdaptOptions, Fit
from fskd.methods.adapt.regimes import ALLWAY, FittedWeights, RegimeHead, learned_mask
from fskd.methods.adapt.text_space import episodic_text_space, state_text, support_text_space
from fskd.methods.adapt.validation import hp
from fskd.methods.base import METHODS, MethodState


@dataclass(frozen=True)
class ZeroShotOptions(AdaptOptions):
    ridge: float | None = None  # bridge ridge strength (None: chosen on validation data)

    RANGES = {"ridge": (">", 0)}


class ZeroShot(AdaptMethod):
    """Cosine similarity to the class text features in image space."""

    needs_text = True
    transfers_to_new_classes = True  # an empty support of unlearned classes: their text alone

    name = "zero-shot"
    options = ZeroShotOptions

    def fit_state(self, f: Fit) -> None:
        f.state.metrics["bridge"] = (
            "identity (joint space)"
            if f.bridge.is_identity
            else f"ridge maps on the base classes (ridge {f.bridge.ridge:g})"
        )

    def make_head(self, state: MethodState, store, device: torch.device):
        text, bridge = state_text(state, device)
        ridge = hp(state, ALLWAY, "ridge")

        def episodic(support, classes):
            ts = episodic_text_space(bridge, text, support, classes)
            return FittedWeights(ts.weights, ts.embed)

        def allway(support, classes):
            ts = support_text_space(support, classes, text, store.joint, ridge)
            return FittedWeights(ts.weights, ts.embed)

        return RegimeHead(self.name, learned_mask(store, device), episodic, allway, needs_text=True)


METHODS.register("zero-shot", ZeroShot)
