"""``zero-shot``: class text features as classifier weights (through the bridge when the store's
image and text spaces differ; the identity for a joint CLIP store). The support set is unused
except to learn the bridge in the all-way regime of a non-joint store (see _common)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fskd.config import Config
from fskd.methods.adapt import _common as C
from fskd.methods.base import METHODS, Method, MethodState, TrainProgress
from fskd.methods.bridge import Bridge
from fskd.runtime import resolve_device


@dataclass(frozen=True)
class ZeroShotOptions(Config):
    ridge: float | None = None  # bridge ridge strength (None: chosen on validation data)

    RANGES = {"ridge": (">", 0)}


class ZeroShot(Method):
    """Cosine similarity to the class text features in image space."""

    needs_text = True
    transfers_to_new_classes = True  # an empty support of unlearned classes: their text alone

    name = "zero-shot"
    kind = "adapt"
    options = ZeroShotOptions

    @C.threads_by_store
    def fit(self, store, config, progress: TrainProgress | None = None) -> MethodState:
        opts = C.parse_options(ZeroShotOptions, config)
        device = resolve_device(config.device)
        text, source = C.class_text(store, config, self.name)
        state = C.new_state(store, config, self.name)
        bridge, ep = C.fit_episodic_bridge(store, text, opts.ridge, device)
        aw = C.choose_allway_ridge(store, text, config, opts.ridge, device)
        C.record(state, C.EPISODIC, ep)
        C.record(state, C.ALLWAY, aw)
        state.tensors = {"text": text.cpu(), **{k: v.cpu() for k, v in bridge.tensors().items()}}
        state.metrics["text"] = source
        state.metrics["bridge"] = "identity (joint space)" if bridge.is_identity else f"ridge maps on the base classes (ridge {bridge.ridge:g})"
        return state

    def head(self, state: MethodState, store, device: torch.device):
        text = state.tensors["text"].to(device)
        bridge = Bridge.from_tensors({k: v.to(device) for k, v in state.tensors.items()})
        ridge = C.hp(state, C.ALLWAY, "ridge")

        def episodic(support, classes):
            ts = C.episodic_text_space(bridge, text, support, classes)
            return C.FittedWeights(ts.weights, ts.embed)

        def allway(support, classes):
            ts = C.support_text_space(support, classes, text, store.joint, ridge)
            return C.FittedWeights(ts.weights, ts.embed)

        return C.RegimeHead(self.name, C.learned_mask(store, device), episodic, allway, needs_text=True)


METHODS.register('zero-shot', ZeroShot)
