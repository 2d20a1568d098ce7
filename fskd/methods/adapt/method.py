"""The adapt methods' base class :class:`AdaptMethod` (it registers nothing): :meth:`AdaptMethod.fit`
is the prologue every adapt fit shares (options, device, threads, a new state, the class text and
its bridges), then hands a :class:`Fit` to the method's own :meth:`~AdaptMethod.fit_state`.

Threads
-------
Fits and head fits on small problems (below ``fskd.runtime.SMALL_PROBLEM`` feature values, e.g. cub35's
1,994 x 1280) run on one intra-op thread: their tensors are small, and on a busy 2-core machine
two threads fighting over the cores made them 2-5x slower (zero-shot fit 1.46 s -> 0.30 s,
residual-adapter 17-21 s -> 6 s, measured with benchmarks/adapt_speed.py's store).
The guard is ``fskd.runtime.compute_threads``, taken by :meth:`AdaptMethod.fit`; ``fskd.api.evaluate``
runs under it too.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fskd.classifiers.base import Head
from fskd.config import Config
from fskd.errors import ConfigError
from fskd.methods.adapt import validation  # the val tasks through the module: tests replace them there
from fskd.methods.adapt.regimes import (
    ALLWAY,
    EPISODIC,
    RegimeHead,
    Task,
    allway_rows,
    allway_views,
    record_views,
    sample_shots,
)
from fskd.methods.adapt.text_space import (
    TextSpace,
    choose_allway_ridge,
    class_text,
    episodic_text_space,
    fit_episodic_bridge,
    reject_descriptions,
    support_text_space,
)
from fskd.methods.adapt.validation import Choice, hp, no_validation, record
from fskd.methods.base import Method, MethodState, TrainProgress
from fskd.methods.bridge import Bridge
from fskd.runtime import compute_threads, resolve_device, store_numel

#: ``--set regime=``: which regimes an adapt fit learns (the validation it runs)
FIT_REGIMES = {
    "both": "both regimes (the default)",
    "allway": "the all-way regime only: no val-class episodes; the state refuses episodic calls",
    "episodic": "the episodic regime only: no all-way validation; the state refuses all-way calls",
}


@dataclass(frozen=True)
class AdaptOptions(Config):
    """The option every adapt method takes beside its own: ``regime`` (see :data:`FIT_REGIMES`)."""

    regime: str = "both"  # both | allway | episodic: fit one regime only (fskd bench: the one its cells score)


def parse_options(cls: type[Config], config) -> Config:
    """The method's options from ``config.options`` (unknown keys -> ConfigError listing valid ones)."""
    try:
        return cls.from_dict(dict(config.options))
    except TypeError as e:  # wrong value types reach the dataclass constructor
        raise ConfigError(f"--set options for {cls.__name__}: {e}") from None


def new_state(store, config, method: str) -> MethodState:
    """An empty adapt state for ``store``; first checks that ``--shots`` K shots exist for every
    class in the train split (the all-way shots), naming the first class that falls short."""
    if config.shots > 0 and store.has_split("train"):
        lab = store.labels("train")
        classes = np.unique(lab[lab >= 0])
        sample_shots(lab[lab >= 0], classes, config.shots, config.seed, store.class_names)
    state = MethodState.of(method, "adapt", store, config)
    state.hparams["hp_selection"] = config.hp_selection
    state.selected_on["hp_selection"] = "--hp-selection"
    return state


def text_fit(store, config, method: str, ridge: float | None, device: torch.device):
    """What every text-using adapt fit starts with: the class text, a new state with the episodic
    bridge and the all-way bridge ridge recorded (and where the text came from) that keeps the
    text and the bridge (read back by :func:`state_text`). Returns (state, text, bridge, all-way ridge)."""
    text, source = class_text(store, config, method)
    state = new_state(store, config, method)
    bridge, br_ep = fit_episodic_bridge(store, text, ridge, device, use_val=not no_validation(config))
    br_aw = choose_allway_ridge(store, text, config, ridge, device)
    record(state, EPISODIC, br_ep)
    record(state, ALLWAY, br_aw)
    state.metrics["text"] = source
    state.tensors = {"text": text.cpu(), **{k: v.cpu() for k, v in bridge.tensors().items()}}
    return state, text, bridge, br_aw.params["ridge"]


# -- the fit every adapt method shares ------------------------------------------------------------
@dataclass
class Validation:
    """A text method's validation: its text spaces per regime, the val-class episodes, the all-way
    task, and the store's augmented views of the all-way shots (``why``: which, or why none)."""

    spaces: dict[str, Callable[[torch.Tensor, torch.Tensor], TextSpace]]
    ep_task: Task | None
    aw_task: Task | None
    views: torch.Tensor | None
    why: str

    def view_space(self) -> TextSpace | None:
        """The all-way task's text space when the store has views of its shots (which it embeds), else None."""
        task = self.aw_task
        if task is None or task.shot == 0 or self.views is None:
            return None
        return self.spaces[ALLWAY](task.support, task.classes)


@dataclass
class Fit:
    """What :meth:`AdaptMethod.fit` hands a method's :meth:`~AdaptMethod.fit_state`. A text method
    also gets the L2-normalised class text and where it came from; unless it learns its own
    bridges, the episodic bridge and the all-way bridge ridge, both recorded in ``state``, which
    keeps the text and the bridge (:func:`text_fit`)."""

    store: object
    config: object
    opts: Config
    device: torch.device
    state: MethodState
    progress: TrainProgress | None = None
    text: torch.Tensor | None = None
    text_source: str | None = None
    bridge: Bridge | None = None
    aw_ridge: float | None = None
    regime: str = "both"  # --set regime: which regimes this fit learns (FIT_REGIMES)

    def spaces(self) -> dict[str, Callable[[torch.Tensor, torch.Tensor], TextSpace]]:
        """Per regime, a support's text space: the episodic bridge, or the support's own at the all-way ridge."""
        return {
            EPISODIC: lambda s, c: episodic_text_space(self.bridge, self.text, s, c),
            ALLWAY: lambda s, c: support_text_space(s, c, self.text, self.store.joint, self.aw_ridge),
        }

    def fixed_or_chosen(
        self,
        name: str,
        value: float | tuple[float, ...],
        default: float,
        fixed_note: str,
        search: Callable[..., Choice],
        train: Callable[[TextSpace, float, torch.Tensor | None], object],
    ) -> tuple[Task, object] | None:
        """The fit of a method with one hyper-parameter ``name`` (TaskRes's alpha, CLIP-Adapter's
        ratio): a number is the authors' fixed value (``fixed_note`` says whose; no validation data
        is read), a list is chosen on validation in each regime by ``search(task, space, candidates,
        default, views)`` (a :class:`Choice` whose ``fitted`` is the winner's head). Records the
        value per regime and the all-way views, and returns the all-way head to keep in the state
        (its task and what was trained): the search's, or ``train(space, value, views)`` on the
        state's own shots. None without shots or all-way regime."""
        state, config = self.state, self.config
        views, why = allway_views(self.store, config, self.device) if config.shots > 0 else (None, "no shots")
        spaces = self.spaces()
        kept = None
        if isinstance(value, tuple):  # candidates: chosen on validation
            cands = tuple(float(v) for v in value)
            first = {name: default if default in cands else cands[0]}
            ep = search(self.episodic_task(), spaces[EPISODIC], cands, first, None)
            aw_task = self.allway_task()
            aw = search(aw_task, spaces[ALLWAY], cands, first, views)
            record(state, EPISODIC, ep)
            record(state, ALLWAY, aw)
            if aw.fitted is not None:
                kept = (aw_task, aw.fitted)
        else:
            for regime in (EPISODIC, ALLWAY):
                state.hparams[f"{regime}.{name}"] = float(value)
                state.selected_on[f"{regime}.{name}"] = (
                    "fixed (--set option)" if name in config.options else f"fixed ({fixed_note}); no validation data"
                )
        if config.shots > 0:
            record_views(state, ALLWAY, views, why)
        if kept is None and config.shots > 0 and self.regime != EPISODIC:  # train on the state's own shots
            own = self.own_shots()
            kept = (own, train(spaces[ALLWAY](own.support, own.classes), float(hp(state, ALLWAY, name)), views))
        return kept

    def episodic_task(self) -> Task | None:
        """The val-class episodes (:func:`validation.episodic_val_task`); None under ``--hp-selection none``."""
        if no_validation(self.config) or self.regime == ALLWAY:
            return None
        return validation.episodic_val_task(self.store, self.config.shots, self.opts, self.config.seed, self.device)

    def allway_task(self) -> Task | None:
        """The all-way validation task (:func:`validation.allway_val_task`); None under ``regime=episodic``."""
        if self.regime == EPISODIC:
            return None
        return validation.allway_val_task(self.store, self.config, self.device)

    def own_shots(self) -> Task:
        """The all-way shots of the state's K and seed (support (1, C, K, D), classes (1, C)): what a
        kept all-way head is trained on (the task has no queries of its own)."""
        config = self.config
        x, _, classes = allway_rows(self.store, config.shots, config.seed)
        support = torch.from_numpy(x).to(self.device).reshape(len(classes), config.shots, -1)[None]
        cls = torch.from_numpy(classes).to(self.device)[None]
        return Task(support=support, classes=cls, query=support[:, 0], truth=cls, description="", on="")

    def validation(self) -> Validation:
        """Both regimes' validation tasks and the stored views of the all-way shots."""
        ep_task, aw_task = self.episodic_task(), self.allway_task()
        config = self.config
        views, why = allway_views(self.store, config, self.device) if config.shots > 0 else (None, "no shots")
        return Validation(self.spaces(), ep_task, aw_task, views, why)


class AdaptMethod(Method):
    """An adapt method: :meth:`fit` is the prologue every adapt fit shares, :meth:`fit_state` the
    method's own part."""

    kind = "adapt"
    #: a text method that learns its own bridges (syntrans: in its transformed space): the class
    #: text is read, no bridge is fitted
    own_bridges: bool = False
    #: False: the fit runs on the CPU whatever ``--device`` says (then not checked)
    uses_device: bool = True

    def fit(self, store, config, progress: TrainProgress | None = None) -> MethodState:
        """Under :func:`compute_threads` for the store's size: refuse ``--descriptions`` (methods
        without text), parse the options, resolve the device, make the new state (a text method:
        read the class text first, and fit the bridges), then :meth:`fit_state`."""
        with compute_threads(store_numel(store)):
            if not self.needs_text:
                reject_descriptions(config, self.name)
            opts = parse_options(self.options, config)
            regime = opts.regime  # checked here, before any work: most options classes' own
            if regime not in FIT_REGIMES:  # __post_init__ does not call Config's
                raise ConfigError(f"--set regime must be one of {', '.join(FIT_REGIMES)}, got {regime!r}")
            device = resolve_device(config.device) if self.uses_device else torch.device("cpu")
            text = source = bridge = aw_ridge = None
            if not self.needs_text:
                state = new_state(store, config, self.name)
            elif self.own_bridges:
                text, source = class_text(store, config, self.name)
                state = new_state(store, config, self.name)
            else:
                state, text, bridge, aw_ridge = text_fit(store, config, self.name, opts.ridge, device)
            f = Fit(store, config, opts, device, state, progress, text, source, bridge, aw_ridge, regime)
            self.fit_state(f)
            f.state.hparams["regime"] = regime
            if regime != "both":  # the other regime's entries are defaults the state refuses to use
                other = EPISODIC if regime == ALLWAY else ALLWAY
                for key in [k for k in f.state.selected_on if k.startswith(f"{other}.")]:
                    f.state.selected_on[key] = f"not fitted (--set regime={regime})"
            f.state.selected_on["regime"] = (
                f"user-set (--set regime={regime}: {FIT_REGIMES[regime]})"
                if "regime" in config.options
                else f"default ({FIT_REGIMES[regime]})"
            )
            return f.state

    def head(self, state: MethodState, store, device: torch.device) -> Head:
        """The method's :meth:`make_head`; a state fitted with ``--set regime=allway`` (or
        ``episodic``) refuses the regime it did not learn."""
        head = self.make_head(state, store, device)
        if isinstance(head, RegimeHead) and state.hparams.get("regime", "both") != "both":
            head.only = state.hparams["regime"]
        return head

    @abstractmethod
    def make_head(self, state: MethodState, store, device: torch.device) -> Head:
        """The head of a fitted state (a :class:`~fskd.methods.adapt.regimes.RegimeHead` of both regimes)."""

    @abstractmethod
    def fit_state(self, f: Fit) -> None:
        """Fit ``f.state`` (hyper-parameters, tensors, metrics) on the store."""
