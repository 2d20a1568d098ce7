"""``prototype``: SimpleShot (Wang et al. 2019): centre on the base-class mean, L2-normalise,
nearest class mean. The baseline every table shows; nothing is trained or chosen.

Two rules (``--set rule=...``, :data:`fskd.classifiers.prototype.RULES`): ``cosine`` (the
default) is easyfsl's, cosine to the renormalised class mean (ProtoNet with cosine);
``simpleshot`` is the SimpleShot authors' code, Euclidean distance to the plain (not
renormalised) mean of the CL2N shots. They predict alike at 1 shot.

In the all-way regime (the call includes base classes) the support mean replaces the base mean,
as ``fskd eval --classifier prototype --protocol allway`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fskd.classifiers.base import ClassContext
from fskd.classifiers.prototype import RULES, PrototypeHead, check_rule
from fskd.errors import ConfigError
from fskd.methods.adapt.method import AdaptMethod, AdaptOptions, Fit
from fskd.methods.adapt.regimes import RegimeHead, learned_mask
from fskd.methods.base import METHODS, MethodState


@dataclass(frozen=True)
class PrototypeOptions(AdaptOptions):
    rule: str = "cosine"  # cosine: to the renormalised class mean (easyfsl); simpleshot: Euclidean to the plain mean of the CL2N shots (the authors' code)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"--set rule must be one of {', '.join(RULES)}, got {self.rule!r}")


class Prototype(AdaptMethod):
    """SimpleShot nearest class mean (base-mean centring, L2; cosine or the authors' Euclidean rule)."""

    name = "prototype"
    options = PrototypeOptions
    uses_device = False  # nothing is computed: the base mean is read from the store

    def fit_state(self, f: Fit) -> None:
        store, state = f.store, f.state
        base = store.class_split("base")
        mean = torch.from_numpy(store.mean(base)) if base else torch.zeros(store.dim)
        state.tensors = {"center": mean}
        state.hparams.update(
            {"episodic.center": "base-class mean" if base else "none", "allway.center": "support mean"}
        )
        state.selected_on.update({"episodic.center": "fixed (SimpleShot)", "allway.center": "fixed (SimpleShot)"})
        state.hparams["rule"] = f.opts.rule
        state.selected_on["rule"] = (
            f"user-set (rule={f.opts.rule}: {RULES[f.opts.rule]})"
            if "rule" in f.config.options
            else f"default ({RULES[f.opts.rule]})"
        )

    def make_head(self, state: MethodState, store, device: torch.device):
        center = state.tensors["center"].to(device)
        rule = check_rule(state.hparams["rule"])
        ep = PrototypeHead(ClassContext(center=center if bool(center.abs().sum() > 0) else None), rule=rule)
        aw = PrototypeHead(None, center_support=True, rule=rule)
        return RegimeHead(self.name, learned_mask(store, device), ep.fit, aw.fit)


METHODS.register("prototype", Prototype)
