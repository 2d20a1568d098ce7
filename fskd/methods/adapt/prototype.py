"""``prototype``: SimpleShot (Wang et al. 2019): centre on the base-class mean, L2-normalise,
nearest class mean by cosine. The baseline every table shows; nothing is trained or chosen.

In the all-way regime (the call includes base classes) the support mean replaces the base mean,
as ``fskd eval --classifier prototype --protocol allway`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fskd.classifiers.base import ClassContext
from fskd.classifiers.prototype import PrototypeHead
from fskd.config import Config
from fskd.methods.adapt import _common as C
from fskd.methods.base import METHODS, MethodState


@dataclass(frozen=True)
class _NoOptions(Config):
    """prototype takes no options."""


class Prototype(C.AdaptMethod):
    """SimpleShot nearest class mean (base-mean centring, L2)."""

    name = "prototype"
    options = _NoOptions
    uses_device = False  # nothing is computed: the base mean is read from the store

    def fit_state(self, f: C.Fit) -> None:
        store, state = f.store, f.state
        base = store.class_split("base")
        mean = torch.from_numpy(store.mean(base)) if base else torch.zeros(store.dim)
        state.tensors = {"center": mean}
        state.hparams = {"episodic.center": "base-class mean" if base else "none", "allway.center": "support mean"}
        state.selected_on = {"episodic.center": "fixed (SimpleShot)", "allway.center": "fixed (SimpleShot)"}

    def head(self, state: MethodState, store, device: torch.device):
        center = state.tensors["center"].to(device)
        ep = PrototypeHead(ClassContext(center=center if bool(center.abs().sum() > 0) else None))
        aw = PrototypeHead(None, center_support=True)
        return C.RegimeHead(self.name, C.learned_mask(store, device), ep.fit, aw.fit)


METHODS.register('prototype', Prototype)
