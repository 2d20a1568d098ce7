"""``lp++``: LP++ (Huang et al., CVPR 2024), one method with two recipes (``--set recipe=NAME``):
``published`` (the default, :class:`LPPPublished` below) and ``tuned``, fskd's own variant
(:class:`~fskd.methods.adapt.lp_pp_tuned.LPPlusPlusTuned`: centred features, Adam, searched
alpha0 and decay).

The published recipe:

    logits = x W^T + b + alpha_c * x t_c^T

on L2-normalised features, W starting at the class sums of the shots, one alpha for every class
from the support's text affinities, full-batch SGD (momentum 0.9) at the Lipschitz step size,
alpha updated every 10th epoch, 300 epochs and the epoch chosen by accuracy on a few-shot val
set (early stopping). The arithmetic is :mod:`fskd.classifiers.lpp`, which states each rule
and where the authors' code does it.

What fskd adds around it: the text weights reach image space through the bridge when image and
text spaces differ (episodic: learned on the base classes; all-way: leave-one-class-out from
the shots, ridge chosen on validation); the all-way val set is the protocol's (CoOp: min(K, 4)
rows per class of the val split, where the LP++ code draws K); in the episodic regime the
novel classes have no labelled val rows, so the epoch count is the one with the best mean
accuracy over val-class episodes. With 0 shots the classifier is zero-shot (W = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fskd.classifiers.linear import FittedLinear, LinearParams
from fskd.classifiers.lpp import EPOCHS, train_lpp
from fskd.methods.adapt.linear_probe import kept_probe, probe_parts
from fskd.methods.adapt.lp_pp_tuned import LPPlusPlusTuned
from fskd.methods.adapt.method import AdaptMethod, AdaptOptions, Fit
from fskd.methods.adapt.regimes import ALLWAY, EPISODIC, RegimeHead, Task, keep_allway_head, learned_mask
from fskd.methods.adapt.text_space import TextSpace, regime_text_space, state_text
from fskd.methods.adapt.validation import Choice, check_val_options, hp, record
from fskd.methods.base import METHODS, MethodState, RecipeMethod

#: the order in which the rows are normalised (the state records it)
NORMALISATION = (
    "L2 per row of the stored feature of each shot (one row per shot; the stored views are not used); a "
    "non-joint store's rows are centred on the support mean first (fskd's bridge space)"
)


@dataclass(frozen=True)
class LPPOptions(AdaptOptions):
    """Epoch budget (early stopping picks within it), bridge ridge, validation episodes."""

    epochs: int = EPOCHS  # epochs trained; validation keeps the best one
    ridge: float | None = None  # bridge ridge (non-joint stores; None: chosen on validation)
    val_way: int = 5
    val_query: int = 15
    val_episodes: int = 300

    RANGES = {"epochs": (">=", 1), "val_way": (">=", 2), "val_query": (">=", 1), "val_episodes": (">=", 1)}

    def __post_init__(self) -> None:
        check_val_options(self)


def flat(ts: TextSpace) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedded support (E, N*K, D) and its way labels (class-major)."""
    from fskd.classifiers.linear import way_labels

    E, N, K, D = ts.support.shape
    return ts.support.reshape(E, N * K, D), way_labels(E, N, K, ts.support.device)


def zero_shot_params(ts: TextSpace) -> LinearParams:
    """W = 0, b = 0, alpha = 1: the text classifier alone (0 shots)."""
    E, N, _, D = ts.support.shape
    z = ts.support.new_zeros
    return LinearParams(z(E, N, D), None, None, z(E, N), ts.support.new_ones(E, N))


def early_stopped(task: Task | None, space, epochs: int) -> Choice:
    """Train on ``task``'s support for ``epochs`` epochs and pick the epoch count by val accuracy
    (mean over the task's episodes; ties: the later epoch, as the LP++ code's ``>=``)."""
    if task is None or task.shot == 0:
        return Choice({"epochs": epochs}, None, "default (no validation data)", "no validation data")
    ts = space(task.support, task.classes)
    x, y = flat(ts)
    r = train_lpp(x, y, ts.weights, epochs=epochs, val=(ts.embed(task.query), task.truth))
    mean = r.curve.mean(0)
    best = int(len(mean) - 1 - torch.argmax(mean.flip(0)))  # last maximum
    table = [
        {"epochs": e, "val_acc": round(100 * float(mean[e - 1]), 2)}
        for e in sorted({1, 10, 50, 100, 200, epochs, best + 1})
        if e <= epochs
    ]
    choice = Choice({"epochs": best + 1}, float(mean[best]), task.on, task.description, table)
    if x.shape[0] == 1:  # the all-way task: keep the early-stopped probe itself
        w, b, a = r.best
        choice.fitted = LinearParams(w, None, None, b, a)
    return choice


class LPPPublished(AdaptMethod):
    """LP++ as published: linear probe + class-wise text blend, SGD at Lipschitz step sizes,
    early stopping on val.

    ``lp++``'s published recipe (the default)."""

    needs_text = True
    transfers_to_new_classes = True  # an empty support of unlearned classes: their text alone

    name = "lp++"
    options = LPPOptions

    def fit_state(self, f: Fit) -> None:
        state, spaces, epochs = f.state, f.spaces(), f.opts.epochs
        ep = early_stopped(f.episodic_task(), spaces[EPISODIC], epochs)
        aw_task = f.allway_task()
        aw = early_stopped(aw_task, spaces[ALLWAY], epochs)
        record(state, EPISODIC, ep)
        record(state, ALLWAY, aw)
        state.hparams["normalisation"] = NORMALISATION
        state.selected_on["normalisation"] = (
            "fixed (the authors' L2 per row; they train on one random augmented crop per shot, fskd on the stored "
            "feature: its stored views are not used)"
        )
        keep_allway_head(state, aw_task, probe_parts(aw.fitted))

    def make_head(self, state: MethodState, store, device: torch.device):
        text, bridge = state_text(state, device)

        def make(regime: str):
            epochs = hp(state, regime, "epochs")

            def fit(support, classes):
                ts = regime_text_space(state, store, regime, support, classes, bridge, text)
                p = kept_probe(state, regime, support, classes)
                if p is None and ts.support.shape[2] == 0:
                    p = zero_shot_params(ts)
                elif p is None:
                    x, y = flat(ts)
                    w, b, a = train_lpp(x, y, ts.weights, epochs=epochs).last
                    p = LinearParams(w, None, None, b, a)
                return FittedLinear(p, ts.embed, ts.weights, scale=1.0)

            return fit

        return RegimeHead(self.name, learned_mask(store, device), make(EPISODIC), make(ALLWAY), needs_text=True)


class LPPlusPlus(RecipeMethod):
    """LP++: ``published`` (the authors' SGD at Lipschitz step sizes, early stopping) or ``tuned``
    (fskd's variant: centred features, Adam, alpha0 / decay / steps searched on validation)."""

    name = "lp++"
    recipes = {"published": LPPPublished, "tuned": LPPlusPlusTuned}


METHODS.register("lp++", LPPlusPlus)
