"""``lp++ --set recipe=tuned``: fskd's variant of LP++ (Huang et al., CVPR 2024; the default
recipe of ``lp++``, in ``lp_pp.py``, is the published algorithm), a linear probe blended with
the text classifier:

    logits = s * (x W^T + alpha_c * x t_c^T) + b

W starts at the class prototypes, alpha (class-wise, learnable) at a blend alpha0; both train
with full-batch Adam. t are the class text weights in image space (through the bridge when the
spaces differ). With 0 shots W = 0 and the classifier is exactly zero-shot. alpha0, the weight
decay and the number of steps are chosen on validation data (val-class episodes for the
episodic regime, the val split for the all-way regime). Where it departs from the published
recipe: features centred (on the base or support mean), a logit scale, prototype
(mean) init, Adam instead of SGD at Lipschitz step sizes, an L2 pull to the init, and alpha0,
the decay and the step count searched on validation instead of alpha from text affinities and
early stopping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fskd.classifiers.linear import FittedLinear
from fskd.methods.adapt.linear_probe import (
    LinearProbeOptions,
    kept_probe,
    probe_params,
    probe_parts,
    search_probe,
)
from fskd.methods.adapt.method import AdaptMethod, Fit
from fskd.methods.adapt.regimes import ALLWAY, EPISODIC, RegimeHead, keep_allway_head, learned_mask
from fskd.methods.adapt.text_space import regime_text_space, state_text
from fskd.methods.adapt.validation import fixed_or, hp, record
from fskd.methods.base import MethodState

ALPHA0 = (0.25, 0.5, 1.0, 2.0, 4.0)
WEIGHT_DECAY = (1e-2, 1e-1)
STEPS = (0, 10, 25, 50, 100)


@dataclass(frozen=True)
class LPPPOptions(LinearProbeOptions):
    """The linear probe's options plus the text blend and the bridge."""

    alpha0: float | tuple[float, ...] | None = None  # initial text blend (default: a grid chosen on validation)
    ridge: float | None = None  # bridge ridge (non-joint stores; None: chosen on validation)


class LPPlusPlusTuned(AdaptMethod):
    """fskd's LP++ variant: linear probe + class-wise blend with the text weights on centred
    features, prototype init, Adam; alpha0, weight decay and steps searched on validation;
    zero-shot at 0 shots.

    ``lp++``'s tuned recipe (``--set recipe=tuned``)."""

    needs_text = True
    transfers_to_new_classes = True  # an empty support of unlearned classes: their text alone

    name = "lp++"
    options = LPPPOptions

    def fit_state(self, f: Fit) -> None:
        store, opts, state, spaces = f.store, f.opts, f.state, f.spaces()
        alphas = fixed_or(opts.alpha0, ALPHA0)
        wds = fixed_or(opts.weight_decay, WEIGHT_DECAY)
        steps = fixed_or(opts.steps, STEPS)
        fixed = {
            k
            for k, v in (("alpha0", opts.alpha0), ("weight_decay", opts.weight_decay), ("steps", opts.steps))
            if v is not None
        }
        default = {"alpha0": alphas[len(alphas) // 2], "weight_decay": wds[0], "steps": steps[len(steps) // 2]}
        ep = search_probe(
            f.episodic_task(),
            spaces[EPISODIC],
            alphas=alphas,
            weight_decays=wds,
            steps=steps,
            lr=opts.lr,
            default=default,
        )
        aw_task = f.allway_task()
        if aw_task is not None and aw_task.shot == 0 and not store.joint:
            aw_task = None  # no shots to learn a bridge from
        aw = search_probe(
            aw_task, spaces[ALLWAY], alphas=alphas, weight_decays=wds, steps=steps, lr=opts.lr, default=default
        )
        record(state, EPISODIC, ep, fixed)
        record(state, ALLWAY, aw, fixed)
        state.hparams["lr"] = opts.lr
        state.selected_on["lr"] = "fixed"
        keep_allway_head(state, aw_task, probe_parts(aw.fitted))

    def make_head(self, state: MethodState, store, device: torch.device):
        text, bridge = state_text(state, device)
        lr = state.hparams["lr"]

        def make(regime: str):
            a0, wd, steps = (hp(state, regime, k) for k in ("alpha0", "weight_decay", "steps"))

            def fit(support, classes):
                ts = regime_text_space(state, store, regime, support, classes, bridge, text)
                p = (
                    kept_probe(state, regime, support, classes)
                    or probe_params(ts.support, steps=[steps], lr=lr, weight_decay=wd, text=ts.weights, alpha0=a0)[
                        steps
                    ]
                )
                return FittedLinear(p, ts.embed, ts.weights)

            return fit

        return RegimeHead(self.name, learned_mask(store, device), make(EPISODIC), make(ALLWAY), needs_text=True)
