"""What every protocol shares: the result of an evaluation (:class:`EvalResult`), what the api
hands a protocol (:class:`EvalContext`), the :class:`Protocol` interface, and the common frame of
the protocols that score a head on the store it was fitted on (:class:`StoreProtocol`)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fskd.errors import EvaluationError

if TYPE_CHECKING:
    import torch

    from fskd.classifiers.base import Head
    from fskd.config import EvalConfig
    from fskd.store import StoreLike, StoreView


@dataclass
class EvalResult:
    """One evaluation. Percentages throughout. ``ci95`` is a 95% CI half-width: over episodes
    (normal approximation) for the episodic protocol, over seeds (Student t) for the all-way one,
    None with one seed; ``std`` is the std over seeds (all-way, None with one seed); ``statistic``
    says which interval it is."""

    protocol: str
    accuracy: float  # percent: mean over episodes (episodic) or over seeds (all-way)
    ci95: float | None
    std: float | None
    statistic: str
    episodes: int | None
    way: int | None
    shots: int
    query: int | None
    split: str
    classifier: str
    encoder: str
    web_scale: bool
    seed: int | None
    seeds: list[int] | None
    n_seeds: int | None
    per_seed: list[float] | None
    classes: int
    center: str
    inductive: bool  # False: the test rows were classified jointly (``transductive`` says how)
    store: str
    store_fingerprint: str
    state: str | None
    seconds: float
    eval_seconds: float
    source_store: str | None = None  # cross-dataset / domain-shift: the store the state was fitted on
    base: float | None = None  # base-to-new: base-class accuracy (mean over seeds)
    new: float | None = None  # base-to-new: new-class accuracy, None when the method cannot transfer
    hm: float | None = None  # base-to-new: harmonic mean of base and new
    mean_per_class: float | None = None  # all-way: mean over classes of per-class accuracy (mean over seeds)
    top5: float | None = None  # all-way with more than 5 classes: mean over seeds
    ece: float | None = None  # all-way: expected calibration error (%, 15 bins) of the head's softmax, mean over seeds
    nll: float | None = None  # all-way: negative log-likelihood of the true class (nats), mean over seeds
    transductive: str | None = None  # "TransCLIP" when every test row was classified at once (--transductive)
    #: which transductive setting ran: "all" (every test row of a seed at once) or {"batch": B, "active_classes":
    #: C, "batches": n (over all seeds), "batches_per_seed": [...]} (--batch B --active-classes C); None: inductive
    transductive_setting: str | dict[str, Any] | None = None
    #: transductive: TransCLIP's shot-weight schedule, what chose its weight and the weight kept per
    #: seed ({"schedule", "chosen_by", "per_seed": [[γ, ...], ...]}, one γ per batch); None: inductive
    shot_weight: dict[str, Any] | None = None
    selected_on: dict[str, Any] = field(default_factory=dict)
    #: the state's --hp-selection policy (few-shot-val, full-val, none); None: no state (a registered classifier)
    hp_selection: str | None = None
    warnings: list[str] = field(default_factory=list)  # what the protocol had to leave out, said aloud
    report: list[str] = field(default_factory=list)  # the report files written
    per_episode: list[float] | None = field(default=None, repr=False)  # reports and `fskd compare` only
    per_class: list[dict[str, Any]] | None = field(default=None, repr=False)  # reports only

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not full:
            d.pop("per_episode")
            d.pop("per_class")
        return d

    def protocol_text(self) -> str:
        """The protocol as it ran, in one paragraph (its protocol's :meth:`Protocol.describe`)."""
        return _protocol(self.protocol).describe(self)

    def summary_line(self) -> str:
        """One line for people: the number, its interval and what the interval is."""
        return _protocol(self.protocol).summary_line(self)

    # -- the pieces the protocols' sentences share ---------------------------------------------------
    def encoder_text(self) -> str:
        return f"encoder {self.encoder} ({'saw' if self.web_scale else 'did not see'} web-scale image-text data)"

    def chosen_text(self) -> str:
        return "; ".join(f"{k}: {v}" for k, v in self.selected_on.items()) or "no hyper-parameters"

    def seed_stat_text(self) -> str:
        return self.statistic if self.n_seeds and self.n_seeds > 1 else "one seed, so no interval"

    def inference_text(self) -> str:
        if self.inductive:
            return "inductive"
        st = self.transductive_setting
        how = (
            "all test rows of each seed scored at once"
            if not isinstance(st, dict)
            else f"the test rows of each seed scored in batches of at most {st['batch']} rows drawn from "
            f"{st['active_classes']} random classes ({st['batches']} batches in all; the realistic setting of "
            f"Zanella et al. CVPR 2025), each batch alone"
        )
        sw = self.shot_weight or {}
        chosen = (
            f"; its shot weight from {tuple(sw['schedule'])} chosen by {sw['chosen_by']}" if sw.get("schedule") else ""
        )
        return (
            f"transductive ({self.transductive}, Zanella et al. NeurIPS 2024: {how}, a GMM with a k-NN Laplacian "
            f"and a KL term toward the head's softmax{chosen}; no ECE/NLL)"
        )

    def how_text(self) -> str:
        """`` + TransCLIP (transductive[, in batches ...])`` for the summary line; "" when inductive."""
        if self.inductive:
            return ""
        st = self.transductive_setting
        batches = (
            f", batches of {st['batch']} from {st['active_classes']} classes: {st['batches']}"
            if isinstance(st, dict)
            else ""
        )
        return f" + {self.transductive} (transductive{batches})"


def _protocol(name: str) -> Protocol:
    from fskd.protocols import PROTOCOLS

    return PROTOCOLS.get(name)()


def state_hp_selection(state: Any) -> str | None:
    """A fitted state's ``--hp-selection`` policy; None without a state."""
    value = (getattr(state, "config", None) or {}).get("hp_selection")
    return None if value is None else str(value)


@dataclass
class EvalContext:
    """What the api hands a protocol: the config, the opened store, the state (a
    ``fskd.methods.MethodState``, or None for a registered classifier) and how to reach the
    state's method and build the head (the methods sit to the right of the protocols)."""

    cfg: EvalConfig
    store: StoreLike
    state: Any
    device: torch.device
    t0: float
    #: the state's method, a new ``fskd.methods.Method`` instance per call
    method: Callable[[], Any]
    #: (head, its name, where its hyper-parameters were chosen) for a store: the state's method's
    #: head, else the registered classifier ``cfg.classifier``
    head: Callable[[StoreLike], tuple[Head, str, dict[str, Any]]]
    #: the registered methods whose head can classify classes it has no shot of
    transferring_methods: Callable[[], list[str]]
    #: the skipped-file warnings of the store
    warnings: list[str] = field(default_factory=list)


class Protocol(ABC):
    """An evaluation protocol: how it scores a head (:meth:`run`) and how it describes itself, in
    a result's summary line and report paragraph and in a bench table's sentence."""

    name: ClassVar[str]
    #: the SimpleShot prototype head centres on the base-class mean (else on the support mean)
    center_on_base: ClassVar[bool] = False

    @abstractmethod
    def run(self, ctx: EvalContext) -> EvalResult:
        """Score the head of ``ctx`` under this protocol."""

    @abstractmethod
    def summary_line(self, r: EvalResult) -> str:
        """One line for people: the number, its interval and what the interval is."""

    @abstractmethod
    def describe(self, r: EvalResult) -> str:
        """The protocol of ``r`` as it ran, in one paragraph (reports)."""

    @abstractmethod
    def bench_text(self, config: dict[str, Any], seeds: list[int], val: str) -> str:
        """The sentence under a bench table of this protocol; ``val``: how hyper-parameters were chosen."""


@dataclass
class Scored:
    """What a :class:`StoreProtocol` measured: the fields of its :class:`EvalResult` and when the
    scoring began (``t1``; the time before it is set-up)."""

    t1: float
    fields: dict[str, Any]


class StoreProtocol(Protocol):
    """A protocol that scores a head on the store it was fitted on (episodic, all-way,
    base-to-new): the class split, the head, the state checks, then :meth:`score`."""

    #: the state must have been fitted for base-to-new (True) or on every class (False)
    base_to_new_state: ClassVar[bool] = False
    #: a state is evaluated on seeds and K (``check_state_seeds``); episodes draw their own
    checks_state_seeds: ClassVar[bool] = True
    #: the result describes episodes (way, query, episodes, the episode seed and class split)
    episodic: ClassVar[bool] = False

    def run(self, ctx: EvalContext) -> EvalResult:
        cfg, state = ctx.cfg, ctx.state
        store = eval_class_split(cfg, ctx.store, state)
        ctx = replace(ctx, store=store)  # what the head and the scoring see: the view, not the store
        head, name, selected = ctx.head(store)
        warnings: list[str] = [
            f"{len(ids)} unreadable file(s) of the {s} split were skipped at extraction"
            for s, ids in store.skipped().items()
        ]
        b2n = self.base_to_new_state
        if state is not None and bool(state.config.get("base_to_new")) != b2n:
            if b2n:
                raise EvaluationError(
                    f"state {cfg.state} was fitted on every class, the new half included; "
                    f"base-to-new needs a state fitted with --base-to-new (fskd adapt/align "
                    f"--base-to-new --shots 16)"
                )
            raise EvaluationError(
                f"state {cfg.state} was fitted for base-to-new (on the base half only); evaluate it "
                f"with --protocol base-to-new"
            )
        if self.checks_state_seeds and state is not None:
            check_state_seeds(cfg, state, ctx.method(), warnings, strict=b2n)
        out = self.score(ctx, head, name, warnings)
        t2 = time.perf_counter()
        enc = store.attrs["encoder"]
        ep = self.episodic
        n_batches = out.fields.pop("n_batches", None)
        return EvalResult(
            protocol=cfg.protocol,
            shots=cfg.shots,
            classifier=name,
            encoder=enc["spec"],
            web_scale=bool(enc["web_scale"]),
            episodes=cfg.episodes if ep else None,
            way=cfg.way if ep else None,
            query=cfg.query if ep else None,
            split=cfg.split if ep else "test",
            seed=cfg.seed if ep else None,
            seeds=None if ep else list(cfg.seeds),
            center=center_text(cfg, ep),
            inductive=not cfg.transductive,
            store=str(store.path),
            store_fingerprint=store.fingerprint,
            state=cfg.state,
            transductive="TransCLIP" if cfg.transductive else None,
            transductive_setting=(
                None
                if not cfg.transductive
                else "all"
                if cfg.batch is None
                else {
                    "batch": cfg.batch,
                    "active_classes": cfg.active_classes,
                    "batches": sum(n_batches or []),
                    "batches_per_seed": n_batches,
                }
            ),
            seconds=round(t2 - ctx.t0, 4),
            eval_seconds=round(t2 - out.t1, 4),
            selected_on=selected,
            hp_selection=state_hp_selection(ctx.state),
            warnings=warnings,
            **out.fields,
        )

    @abstractmethod
    def score(self, ctx: EvalContext, head: Head, name: str, warnings: list[str]) -> Scored:
        """The measured fields of the result (accuracy, ci95, std, statistic, n_seeds, per_seed,
        classes, ...; ``n_batches``: transductive batches per seed), appending to ``warnings``."""


def per_class(
    names: list[str], classes: Any, accuracy: np.ndarray, rows: np.ndarray, **extra: Any
) -> list[dict[str, Any]]:
    """The per-class table of a report: name, accuracy (%), test rows, for ``classes`` in order."""
    return [
        {"class": names[int(c)], **extra, "accuracy": round(float(a) * 100, 3), "test_rows": int(rows[c])}
        for c, a in zip(classes, accuracy, strict=True)
    ]


def eval_class_split(cfg: EvalConfig, store: StoreLike, state: Any) -> StoreView:
    """The view of ``store`` an evaluation reads, with its class split: the user's override, else
    the state's own (the split it was fitted with), else the store's. An override that contradicts
    the state's is refused. ``store`` is not changed."""
    from fskd.store.view import class_split_override

    given = class_split_override(store, cfg.class_split, cfg.class_ratio, cfg.split_seed)
    view = store.view(class_split=given)
    fitted = (state.hparams.get("class_split") if state is not None else None) or None
    if fitted is None:
        return view

    def strip(d: dict[str, Any]) -> dict[str, Any]:
        return {k: sorted(v) for k, v in d.items() if k != "source"}

    if given is not None and strip(given) != strip(fitted):
        raise EvaluationError(
            f"state {cfg.state} was fitted with another class split than the one given here; its "
            f"novel classes must stay the ones it never learned from: drop --class-split/--class-ratio "
            f"(the state's split is used) or fit again with this split"
        )
    if given is None and strip(view.attrs["class_split"]) != strip(fitted):
        return view.view(class_split={**fitted, "source": f"the class split state {cfg.state} was fitted with"})
    return view


def center_text(cfg: EvalConfig, episodic: bool) -> str:
    """What the evaluated head subtracts before normalising, as it really is."""
    if cfg.state:
        return "the state's own (see its hyper-parameters)"
    if cfg.classifier not in ("prototype", "simpleshot") or cfg.center == "none":
        return "none"
    return "base-class mean (SimpleShot)" if episodic else "support mean (no base classes in the all-way protocol)"


def check_state_seeds(cfg: EvalConfig, state: Any, method: Any, warnings: list[str], strict: bool = False) -> None:
    """A state fitted on the K shots of one seed, evaluated all-way: a method whose state holds the
    fitted model (fma, a semi-supervised student) would score that one model under every seed, so
    other seeds or K are refused; for methods that refit on the shots they are given, a K or seed
    other than the state's (whose hyper-parameters were chosen for its own) is a warning.
    ``method``: the state's method (a ``fskd.methods.Method``)."""
    k, seed = state.config.get("shots"), state.config.get("seed")
    if k is None or seed is None:
        return
    if strict and (tuple(cfg.seeds) != (seed,) or cfg.shots != k):
        raise EvaluationError(
            f"state {cfg.state} was fitted for base-to-new on the {k} shots per base class of seed {seed} (all it "
            f"was shown); evaluate it with --shots {k} --seeds {seed}, and fit one state per seed for numbers over seeds"
        )
    if method.bound_to_shots(state):
        if tuple(cfg.seeds) != (seed,) or cfg.shots != k:
            raise EvaluationError(
                f"state {cfg.state} ({state.method}) holds a model fitted on the {k} shots per class of seed {seed}; "
                f"evaluating it with --shots {cfg.shots} --seeds {','.join(map(str, cfg.seeds))} would score that one "
                f"model again and again, not independent runs. Evaluate it with --shots {k} --seeds {seed}; for "
                f"numbers over seeds, fit one state per seed (--seed 1, 2, 3) and evaluate each with its own seed"
            )
    elif cfg.shots != k or tuple(cfg.seeds) != (seed,):
        warnings.append(
            f"the hyper-parameters of state {cfg.state} were chosen for {k} shots and seed {seed}; it is "
            f"evaluated here with {cfg.shots} shots and seeds {list(cfg.seeds)} (fit one state per K and seed "
            f"for the protocol's own numbers)"
        )
