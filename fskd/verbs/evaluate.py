"""``fskd eval``: the head to score (a fitted state's, else a registered classifier), the protocol
that scores it (:mod:`fskd.protocols`), the state-misfit guard, the warnings and the report."""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from fskd.classifiers import CLASSIFIERS, ClassContext
from fskd.classifiers.base import Head
from fskd.classifiers.prototype import PrototypeHead
from fskd.config import EvalConfig
from fskd.errors import FskdError, OutputError, StateError
from fskd.fsutil import check_writable, store_containing
from fskd.methods import METHODS, load_state
from fskd.protocols import PROTOCOLS
from fskd.protocols.base import EvalContext, EvalResult
from fskd.reports import report_name, write_report
from fskd.runtime import compute_threads, resolve_device, store_numel
from fskd.store import FeatureStore, StoreLike
from fskd.store.location import backend_errors

log = logging.getLogger(__name__)


def head_for(cfg: EvalConfig, store: StoreLike, device: torch.device, state=None) -> tuple[Head, str, dict]:
    """The head to evaluate: the state's method, else a registered classifier."""
    if state is not None:
        method = METHODS.get(state.method)()
        method.check_store(state, store, cfg.state)
        try:
            head = method.head(state, store, device)
        except KeyError as e:  # a tensor or hyper-parameter the method wrote is gone
            raise StateError(
                f"state {cfg.state} lacks {e} (damaged, edited, or written by another fskd version); fit it again"
            ) from None
        return head, state.method, dict(state.selected_on)
    text = store.text_embeddings() if store.joint else None
    center = None
    on_base = PROTOCOLS.get(cfg.protocol).center_on_base  # episodic: SimpleShot's base-class mean
    if cfg.center == "base" and on_base and store.class_split("base"):
        center = torch.from_numpy(store.mean(store.class_split("base"))).to(device)
    ctx = ClassContext(text=torch.from_numpy(text).to(device) if text is not None else None, center=center)
    head = CLASSIFIERS.get(cfg.classifier)(ctx)
    if isinstance(head, PrototypeHead) and not on_base and cfg.center == "base":
        head = PrototypeHead(
            ctx, center_support=True, rule=head.rule
        )  # no base classes in all-way: centre on the support mean
    return head, cfg.classifier, {}


def evaluate(config: EvalConfig) -> EvalResult:
    """Score a head (a state's, else a registered classifier) under ``config.protocol``; write the report."""
    t0 = time.perf_counter()
    cfg = config
    if cfg.report:
        check_writable(cfg.report, "--report")  # before the work, not after it
        if store_containing(cfg.report) is not None:
            raise OutputError(f"--report {cfg.report} is inside a feature store; write reports somewhere else")
    # a store on object storage that stops answering mid-way: one error naming the URL
    with backend_errors(cfg.store):
        store = FeatureStore.open(cfg.store)
        store.check_complete()
        # the same thread guard as the fits (AdaptMethod.fit)
        with compute_threads(store_numel(store)), state_fits(cfg):
            return evaluate_store(cfg, store, t0)


#: what a state's head raises when its tensors or hyper-parameters do not fit the store it scores
#: (a tensor of another shape, a hyper-parameter of another type): its arithmetic fails
_STATE_MISFIT = (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError)


@contextlib.contextmanager
def state_fits(cfg: EvalConfig):
    """The one check of a state's tensors and hyper-parameters against the store, for every method:
    each method's head reads its own (shapes tied to the store's dimensions, classes and the shots,
    numbers for its hyper-parameters), so a state that was forged or edited with a valid hash, or
    written by another fskd, fails in that arithmetic; that failure becomes a StateError naming the
    state and what did not fit, not a traceback. Without --state nothing is changed."""
    try:
        yield
    except FskdError:
        raise
    except _STATE_MISFIT as e:
        if not cfg.state or isinstance(e, getattr(torch, "OutOfMemoryError", MemoryError)):
            raise
        what = " ".join(str(e).split())[:200]
        raise StateError(
            f"state {cfg.state} does not fit the store {cfg.store} ({type(e).__name__}: {what}): its "
            f"tensors or hyper-parameters were edited or damaged, or another fskd wrote it; fit it again"
        ) from None


def evaluate_store(cfg: EvalConfig, store: FeatureStore, t0: float) -> EvalResult:
    """Score the head of ``cfg`` (the state's method, else a registered classifier) under its
    protocol (:mod:`fskd.protocols`), then say the warnings and write the report."""
    device = resolve_device(cfg.device)
    state = load_state(cfg.state) if cfg.state else None
    ctx = EvalContext(
        cfg=cfg,
        store=store,
        state=state,
        device=device,
        t0=t0,
        method=lambda: METHODS.get(state.method)(),
        head=lambda s: head_for(cfg, s, device, state),
        transferring_methods=lambda: [n for n in METHODS.names() if METHODS.get(n).transfers_to_new_classes],
    )
    return finish(cfg, state, PROTOCOLS.get(cfg.protocol)().run(ctx))


def finish(cfg: EvalConfig, state, result: EvalResult) -> EvalResult:
    """Say the warnings and write the report (when asked) of a finished evaluation."""
    for w in result.warnings:
        log.warning("%s: %s", result.store, w)
    if cfg.report:
        config_dict = {**cfg.to_dict(), "classifier": result.classifier}
        if cfg.state:
            config_dict["state_config"] = state.config
        try:
            paths = write_report(
                cfg.report, report_name(result), result.to_dict(full=True), result.protocol_text(), config_dict
            )
        except OSError as e:
            raise OutputError(
                f"--report {cfg.report}: cannot write the report ({e.strerror or e}"
                f"{f': {e.filename}' if e.filename else ''})",
                result=result,
            ) from None
        result.report = [str(p) for p in paths]
    return result
