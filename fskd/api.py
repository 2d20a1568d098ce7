"""One function per verb: a config in, a result dataclass out. Never prints, never exits.

The CLI, the examples, the benchmarks and the tests all call these functions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fskd.catalog import method_info, registries, store_info  # noqa: F401 - part of the api
from fskd.classifiers import CLASSIFIERS, ClassContext
from fskd.classifiers.base import Head
from fskd.classifiers.prototype import PrototypeHead
from fskd.config import (
    AdaptConfig,
    AlignConfig,
    BenchConfig,
    DemoConfig,
    DistillConfig,
    EvalConfig,
    ExtractConfig,
)
from fskd.errors import (
    ConfigError,
    DatasetError,
    EvaluationError,
    FskdError,
    OutputError,
    StateError,
)
from fskd.evaluation.allway import run_allway, store_rows
from fskd.evaluation.base_to_new import harmonic_mean, restrict_for_fit, run_base_to_new
from fskd.evaluation.base_to_new import split_of as b2n_split
from fskd.evaluation.episodes import iter_episodes, run_episodes
from fskd.evaluation.metrics import EPISODE_CI, SEED_CI, mean_ci95, seed_summary
from fskd.evaluation.transductive import BatchSetting
from fskd.fsutil import check_writable, store_containing
from fskd.methods import METHODS, load_state
from fskd.methods.base import TrainProgress, guard_out, save_state
from fskd.progress import AUTO, extract_bar, extract_log, train_bar
from fskd.progress import resolve as resolve_progress
from fskd.reports import markdown_table, report_name, write_report
from fskd.reports.compare import compare_reports
from fskd.runtime import compute_threads, dist_info, resolve_device, store_numel
from fskd.store import FeatureStore
from fskd.store.extract import ExtractResult, Progress
from fskd.store.extract import extract as _extract
from fskd.store.location import absolute_store, backend_errors
from fskd.store.location import configure as configure_storage  # noqa: F401 - part of the api

log = logging.getLogger(__name__)

#: the public API: one function per verb, the listings, and the configs and results they take and give
__all__ = [
    "extract", "evaluate", "adapt", "align", "distill", "bench", "bench_report", "load_grid", "compare", "demo",
    "method_info", "registries", "store_info", "configure_storage",
    "ExtractConfig", "EvalConfig", "AdaptConfig", "AlignConfig", "DistillConfig", "BenchConfig", "DemoConfig",
    "ExtractResult", "EvalResult", "FitResult", "BenchResult", "DemoResult",
]


def _takes(config, cls: type, verb: str) -> None:
    """Each verb takes its own config object; anything else is a ConfigError naming what it got
    (``api.evaluate(None)``), not an AttributeError deep inside."""
    if not isinstance(config, cls):
        a = "an" if cls.__name__[0] in "AEIOU" else "a"
        raise ConfigError(f"fskd.api.{verb} takes {a} {cls.__name__}, got {type(config).__name__} {config!r:.80} "
                          f"(build one with {cls.__name__}(store=...))")


def _path_arg(value, name: str, verb: str) -> None:
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"fskd.api.{verb}: {name} must be a path (a string), got {type(value).__name__} {value!r:.80}")


def extract(config: ExtractConfig, progress: Progress | str | None = AUTO, source=None) -> ExtractResult:
    """Encode a dataset into a feature store (resumable; reused when already complete).
    ``progress``: "auto" (a bar when stderr is a terminal), None, or a callable.
    ``source``: an ImageDataset object to use instead of the registered ``config.dataset``."""
    _takes(config, ExtractConfig, "extract")
    return _extract(config, resolve_progress(progress, extract_bar, extract_log), source)


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
    transductive_setting: str | dict | None = None
    selected_on: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what the protocol had to leave out, said aloud
    report: list[str] = field(default_factory=list)  # the report files written
    per_episode: list[float] | None = field(default=None, repr=False)  # reports and `fskd compare` only
    per_class: list[dict] | None = field(default=None, repr=False)  # reports only

    def to_dict(self, full: bool = False) -> dict:
        d = asdict(self)
        if not full:
            d.pop("per_episode")
            d.pop("per_class")
        return d

    def protocol_text(self) -> str:
        enc = f"encoder {self.encoder} ({'saw' if self.web_scale else 'did not see'} web-scale image-text data)"
        chosen = "; ".join(f"{k}: {v}" for k, v in self.selected_on.items()) or "no hyper-parameters"
        if self.protocol == "episodic":
            return (
                f"Episodic: {self.way}-way {self.shots}-shot, {self.query} queries per class, {self.episodes} episodes "
                f"over the {self.classes} {self.split} classes, seed {self.seed}; inductive; mean accuracy and "
                f"{self.statistic}; {enc}; classifier {self.classifier}; centring {self.center}; "
                f"hyper-parameters: {chosen}."
            )
        stat = self.statistic if self.n_seeds and self.n_seeds > 1 else "one seed, so no interval"
        if self.protocol == "cross-dataset":
            return (f"Cross-dataset: the state fitted on {self.source_store} ({self.shots} shots per class, seed "
                    f"{self.seeds[0]}) scores every test row of this store among its {self.classes} classes, none of "
                    f"which it learned: its head transfers through their class text, with no shot of them; one fitted "
                    f"state, so no interval; {enc}; method {self.classifier}.")
        if self.protocol == "domain-shift":
            return (f"Domain shift: the state fitted on {self.source_store} ({self.shots} shots per class, seed "
                    f"{self.seeds[0]}) is fitted on those shots and scores this store's test rows, classes mapped by "
                    f"key, among the {self.classes} classes present here; one fitted state, so no interval; {enc}; "
                    f"method {self.classifier}.")
        if self.protocol == "base-to-new":
            return (
                f"Base-to-new (CoCoOp): classes split in half by label order; fitted on {self.shots} shots per base class "
                f"(seeds {self.seeds}); base = test rows of the base classes among the base classes, new = test rows of "
                f"the new classes among the new classes with no shot of them, HM = harmonic mean of the mean base and "
                f"new accuracy; {'' if self.inductive else self._inference_text() + '; '}{stat}; {enc}; "
                f"classifier {self.classifier}; hyper-parameters: {chosen}."
            )
        return (
            f"All-way: {self.shots} shots per class from the train split (seed s), all {self.classes} classes, the full "
            f"test split, seeds {self.seeds}; {self._inference_text()}; mean top-1 over seeds with {stat}; {enc}; "
            f"classifier {self.classifier}; centring {self.center}; hyper-parameters: {chosen}."
        )

    def _inference_text(self) -> str:
        if self.inductive:
            return "inductive"
        st = self.transductive_setting
        how = ("all test rows of each seed scored at once" if not isinstance(st, dict) else
               f"the test rows of each seed scored in batches of at most {st['batch']} rows drawn from "
               f"{st['active_classes']} random classes ({st['batches']} batches in all; the realistic setting of "
               f"Zanella et al. CVPR 2025), each batch alone")
        return (f"transductive ({self.transductive}, Zanella et al. NeurIPS 2024: {how}, a GMM with a k-NN Laplacian "
                f"and a KL term toward the head's softmax; no ECE/NLL)")

    def _how(self) -> str:
        """`` + TransCLIP (transductive[, in batches ...])`` for the summary line; "" when inductive."""
        if self.inductive:
            return ""
        st = self.transductive_setting
        batches = (f", batches of {st['batch']} from {st['active_classes']} classes: {st['batches']}"
                   if isinstance(st, dict) else "")
        return f" + {self.transductive} (transductive{batches})"

    def summary_line(self) -> str:
        """One line for people: the number, its interval and what the interval is."""
        if self.protocol == "episodic":
            return (f"{self.way}-way {self.shots}-shot on {self.classes} {self.split} classes, {self.episodes} episodes, "
                    f"{self.classifier}: {self.accuracy:.2f}% ± {self.ci95:.2f} (95% CI over episodes)")
        if self.protocol in ("cross-dataset", "domain-shift"):
            return (f"{self.protocol} from {Path(self.source_store).name} to {Path(self.store).name}, {self.classes} "
                    f"classes, {self.classifier} ({self.shots} shots, seed {self.seeds[0]}): {self.accuracy:.2f}% (one "
                    f"fitted state: no interval)")
        if self.protocol == "base-to-new":
            new = "n/a (cannot transfer)" if self.new is None else f"{self.new:.2f}%"
            hm = "n/a" if self.hm is None else f"{self.hm:.2f}%"
            how = self._how()
            return (f"base-to-new {self.shots}-shot, {self.classes} classes, seeds {self.seeds}, {self.classifier}{how}: "
                    f"base {self.base:.2f}%, new {new}, HM {hm}")
        how = self._how()
        head = (f"all-way {self.shots}-shot, {self.classes} classes, seeds {self.seeds}, {self.classifier}{how}: "
                f"{self.accuracy:.2f}%")
        if self.ci95 is not None:
            head += f" ± {self.ci95:.2f} (95% CI, Student t over {self.n_seeds} seeds; std {self.std:.2f})"
        else:
            head += " (one seed: no interval)"
        extra = [f"mean per-class {self.mean_per_class:.2f}%"] if self.mean_per_class is not None else []
        extra += [f"top-5 {self.top5:.2f}%"] if self.top5 is not None else []
        extra += [f"ECE {self.ece:.2f}%, NLL {self.nll:.3f}"] if self.ece is not None else []
        return head + (f"; {', '.join(extra)}" if extra else "")


def _head(cfg: EvalConfig, store: FeatureStore, device: torch.device, state=None) -> tuple[Head, str, dict]:
    """The head to evaluate: the state's method, else a registered classifier."""
    if state is not None:
        method = METHODS.get(state.method)()
        method.check_store(state, store, cfg.state)
        try:
            head = method.head(state, store, device)
        except KeyError as e:  # a tensor or hyper-parameter the method wrote is gone
            raise StateError(f"state {cfg.state} lacks {e} (damaged, edited, or written by another fskd version); "
                             f"fit it again") from None
        return head, state.method, dict(state.selected_on)
    text = store.text_embeddings() if store.joint else None
    center = None
    if cfg.center == "base" and cfg.protocol == "episodic" and store.class_split("base"):
        center = torch.from_numpy(store.mean(store.class_split("base"))).to(device)
    ctx = ClassContext(text=torch.from_numpy(text).to(device) if text is not None else None, center=center)
    head = CLASSIFIERS.get(cfg.classifier)(ctx)
    if isinstance(head, PrototypeHead) and cfg.protocol != "episodic" and cfg.center == "base":
        head = PrototypeHead(ctx, center_support=True, rule=head.rule)  # no base classes in all-way: centre on the support mean
    return head, cfg.classifier, {}


def evaluate(config: EvalConfig) -> EvalResult:
    """Episodic (novel classes by default) or all-way evaluation; see docs/concepts.md, Protocols."""
    _takes(config, EvalConfig, "evaluate")
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
        with compute_threads(store_numel(store)), _state_fits(cfg):
            return _evaluate_store(cfg, store, t0)


#: what a state's head raises when its tensors or hyper-parameters do not fit the store it scores
#: (a tensor of another shape, a hyper-parameter of another type): its arithmetic fails
_STATE_MISFIT = (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError)


@contextlib.contextmanager
def _state_fits(cfg: EvalConfig):
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
        raise StateError(f"state {cfg.state} does not fit the store {cfg.store} ({type(e).__name__}: {what}): its "
                         f"tensors or hyper-parameters were edited or damaged, or another fskd wrote it; fit it again"
                         ) from None


def _evaluate_store(cfg: EvalConfig, store: FeatureStore, t0: float) -> EvalResult:
    device = resolve_device(cfg.device)
    state = load_state(cfg.state) if cfg.state else None
    if cfg.protocol in OTHER_STORE_PROTOCOLS:
        return _finish(cfg, state, _evaluate_other_store(cfg, store, state, device, t0))
    _eval_class_split(cfg, store, state)
    head, name, selected = _head(cfg, store, device, state)
    names = store.class_names
    warnings: list[str] = [f"{len(ids)} unreadable file(s) of the {s} split were skipped at extraction"
                           for s, ids in store.skipped().items()]
    episodic, b2n = cfg.protocol == "episodic", cfg.protocol == "base-to-new"
    if state is not None and bool(state.config.get("base_to_new")) != b2n:
        if b2n:
            raise EvaluationError(f"state {cfg.state} was fitted on every class, the new half included; base-to-new "
                                  f"needs a state fitted with --base-to-new (fskd adapt/align --base-to-new --shots 16)")
        raise EvaluationError(f"state {cfg.state} was fitted for base-to-new (on the base half only); evaluate it with "
                              f"--protocol base-to-new")
    if not episodic and state is not None:
        _check_state_seeds(cfg, state, warnings, strict=b2n)
    mean_pc = top5 = per_episode = per_class = n_seeds = None
    batching = BatchSetting(cfg.batch, cfg.active_classes) if cfg.batch is not None else None
    n_batches: list[int] | None = None  # transductive in batches: how many per seed
    b2n_fields: dict = {}
    calibration: dict = {}  # all-way only
    if b2n:
        for s in ("train", "test"):
            if not store.has_split(s):
                raise EvaluationError(f"base-to-new needs a {s!r} sample split; {store.path} has {store.splits}")
        if state is None:
            store.override_class_split(split=b2n_split(store.num_classes))
        take, train_y = store_rows(store, "train", device)
        test_x, test_y = store.gather(None, ["test"])
        transfers = METHODS.get(state.method).transfers_to_new_classes if state is not None else head.needs_text
        if not transfers:
            warnings.append(f"{name} cannot classify classes it has no shot of: no new-class accuracy (base only)")
        t1 = time.perf_counter()
        sc = run_base_to_new(take, train_y, torch.from_numpy(test_x).to(device), test_y,
                             store.num_classes, cfg.shots, tuple(cfg.seeds), head, transfers, names,
                             transductive=cfg.transductive, batch_setting=batching)
        b = seed_summary(sc.base.top1)
        nw = seed_summary(sc.new.top1) if sc.new is not None else None
        hm = harmonic_mean(b.mean, nw.mean) if nw is not None else None
        per_seed_v = ([harmonic_mean(x, y) for x, y in zip(sc.base.top1, sc.new.top1, strict=True)]
                      if sc.new is not None else list(sc.base.top1))
        summ = seed_summary(per_seed_v)
        acc = hm if hm is not None else b.mean
        ci, std, n_seeds = summ.ci95, summ.std, summ.n
        statistic = f"{SEED_CI} of the per-seed {'harmonic mean' if hm is not None else 'base accuracy'}"
        per_seed = [round(float(a) * 100, 3) for a in per_seed_v]
        classes = np.arange(store.num_classes)
        n_classes = store.num_classes
        if batching is not None:
            n_batches = [x + y for x, y in zip(sc.base.batches, sc.new.batches if sc.new is not None else
                                               [0] * len(sc.base.batches), strict=True)]
        b2n_fields = {"base": round(b.mean, 3), "new": None if nw is None else round(nw.mean, 3),
                      "hm": None if hm is None else round(hm, 3)}
        top5 = None if sc.base.top5 is None else round(float(sc.base.top5.mean()) * 100, 3)
        rows = np.bincount(test_y, minlength=store.num_classes)
        per_class = []
        for part, scores_, cls in (("base", sc.base, sc.base_classes), ("new", sc.new, sc.new_classes)):
            if scores_ is not None:
                per_class += _per_class(names, cls, np.nanmean(scores_.per_class, axis=0), rows, half=part)
        mean_pc = round(float(np.nanmean([r["accuracy"] for r in per_class])), 3)
    elif episodic:
        classes = store.class_split(cfg.split)
        if not classes:
            raise EvaluationError(f"{store.path}: the {cfg.split!r} class split is empty")
        feats, labels = store.gather(classes)
        t1 = time.perf_counter()
        # sampled batch by batch (memory bounded whatever --episodes), the episodes of one draw
        eps = iter_episodes(labels, classes, cfg.way, cfg.shots, cfg.query, cfg.episodes, cfg.seed, names,
                            multiple=cfg.episode_batch)
        accs = run_episodes(torch.from_numpy(feats).to(device), eps, head, cfg.episode_batch)
        acc, ci = mean_ci95(accs)
        std, per_seed, n_classes, statistic = None, None, len(classes), EPISODE_CI
        per_episode = [round(float(a), 6) for a in accs]
    else:
        for s in ("train", "test"):
            if not store.has_split(s):
                raise EvaluationError(f"the all-way protocol needs a {s!r} sample split; {store.path} has {store.splits}")
        take, train_y = store_rows(store, "train", device)  # each seed reads its shots alone
        test_x, test_y = store.gather(None, ["test"])
        classes = np.unique(test_y)
        absent = sorted(set(range(store.num_classes)) - set(classes.tolist()))
        if absent:
            warnings.append(f"{len(absent)} of {store.num_classes} classes have no readable test rows and are left out "
                            f"of the all-way evaluation: {', '.join(repr(names[c]) for c in absent[:10])}"
                            f"{' ...' if len(absent) > 10 else ''}")
        t1 = time.perf_counter()
        scores = run_allway(take, train_y, torch.from_numpy(test_x).to(device), test_y,
                            classes, cfg.shots, tuple(cfg.seeds), head, class_names=names,
                            transductive=cfg.transductive, batch_setting=batching)
        summ = seed_summary(scores.top1)
        acc, ci, std, n_seeds, statistic = summ.mean, summ.ci95, summ.std, summ.n, SEED_CI
        per_seed, n_classes = [round(float(a) * 100, 3) for a in scores.top1], len(classes)
        n_batches = scores.batches
        pc = np.nanmean(scores.per_class, axis=0)  # (C,) over seeds
        mean_pc = round(float(np.nanmean(pc)) * 100, 3)
        top5 = None if scores.top5 is None else round(float(scores.top5.mean()) * 100, 3)
        if scores.ece is not None:  # none when transductive: the assignments are not the head's softmax
            calibration = dict(ece=round(float(scores.ece.mean()) * 100, 3), nll=round(float(scores.nll.mean()), 4))
        per_class = _per_class(names, classes, pc, np.bincount(test_y, minlength=store.num_classes))
    t2 = time.perf_counter()
    enc = store.attrs["encoder"]
    result = EvalResult(
        protocol=cfg.protocol, accuracy=round(acc, 3), ci95=None if ci is None else round(ci, 3),
        std=None if std is None else round(std, 3), statistic=statistic,
        episodes=cfg.episodes if episodic else None, way=cfg.way if episodic else None, shots=cfg.shots,
        query=cfg.query if episodic else None, split=cfg.split if episodic else "test", classifier=name,
        encoder=enc["spec"], web_scale=bool(enc["web_scale"]), seed=cfg.seed if episodic else None,
        seeds=None if episodic else list(cfg.seeds), n_seeds=n_seeds, per_seed=per_seed, classes=n_classes,
        center=_center_text(cfg, episodic), inductive=not cfg.transductive, store=str(store.path),
        store_fingerprint=store.fingerprint, state=cfg.state, transductive="TransCLIP" if cfg.transductive else None,
        transductive_setting=(None if not cfg.transductive else "all" if batching is None else
                              {"batch": cfg.batch, "active_classes": cfg.active_classes, "batches": sum(n_batches),
                               "batches_per_seed": n_batches}),
        seconds=round(t2 - t0, 4), eval_seconds=round(t2 - t1, 4), mean_per_class=mean_pc, top5=top5,
        selected_on=selected, warnings=warnings, per_episode=per_episode, per_class=per_class, **b2n_fields,
        **calibration,
    )
    return _finish(cfg, state, result)


def _finish(cfg: EvalConfig, state, result: EvalResult) -> EvalResult:
    """Say the warnings and write the report (when asked) of a finished evaluation."""
    for w in result.warnings:
        log.warning("%s: %s", result.store, w)
    if cfg.report:
        config_dict = {**cfg.to_dict(), "classifier": result.classifier}
        if cfg.state:
            config_dict["state_config"] = state.config
        try:
            paths = write_report(cfg.report, report_name(result), result.to_dict(full=True), result.protocol_text(),
                                 config_dict)
        except OSError as e:
            raise OutputError(f"--report {cfg.report}: cannot write the report ({e.strerror or e}"
                              f"{f': {e.filename}' if e.filename else ''})", result=result) from None
        result.report = [str(p) for p in paths]
    return result


#: protocols that score a state on another store than the one it was fitted on
OTHER_STORE_PROTOCOLS = ("cross-dataset", "domain-shift")


def _evaluate_other_store(cfg: EvalConfig, store: FeatureStore, state, device: torch.device, t0: float) -> EvalResult:
    """Cross-dataset (other classes: the state's head transfers through the target's class text,
    no shot of them) and domain shift (the same classes by key, e.g. ImageNet's wnids: the head
    is fitted on the source store's K shots of the state's seed and scores the target's test rows,
    among the target's classes only, as CoOp does for ImageNet-A/R)."""
    if state is None:
        raise EvaluationError(f"--protocol {cfg.protocol} evaluates a fitted state on another store: pass --state DIR")
    method = METHODS.get(state.method)()
    if state.encoder != store.encoder_spec:
        raise EvaluationError(f"state {cfg.state} was fitted on features of encoder {state.encoder!r}; {store.path} holds "
                              f"{store.encoder_spec!r}: {cfg.protocol} needs the same encoder (extract the target with it)")
    if state.config.get("base_to_new"):
        raise EvaluationError(f"state {cfg.state} was fitted for base-to-new; fit one on every class for {cfg.protocol}")
    if not store.has_split("test"):
        raise EvaluationError(f"{store.path} has no 'test' sample split (it has {store.splits})")
    k, seed = int(state.config.get("shots", 0)), int(state.config.get("seed", 1))
    names = store.class_names
    test_x, test_y = store.gather(None, ["test"])
    if cfg.protocol == "cross-dataset":
        if not method.transfers_to_new_classes:
            able = [n for n in METHODS.names() if METHODS.get(n).transfers_to_new_classes]
            raise EvaluationError(f"{state.method} cannot classify classes it has no shot of, so it cannot be evaluated on "
                                  f"another dataset's classes; methods that can: {', '.join(able)}")
        if store.text_embeddings() is None:
            raise EvaluationError(f"{store.path} has no class text features; cross-dataset transfer goes through them")
        store.override_class_split(split={"base": [], "val": [], "novel": list(range(store.num_classes)),
                                          "source": "cross-dataset target: no class of this store was learned"})
        head = method.head(method.transfer_state(state, store), store, device)
        classes = np.unique(test_y)
        take, train_y, shot = (lambda r: torch.zeros(len(r), store.dim, device=device)), np.zeros(0, np.int64), 0
        source = state.store_path
    else:
        src = FeatureStore.open(state.store_path)
        method.check_store(state, src, cfg.state)
        if src.encoder_spec != store.encoder_spec or src.dim != store.dim:
            raise EvaluationError(f"{store.path} ({store.encoder_spec}, {store.dim}-d) and the state's store {src.path} "
                                  f"({src.encoder_spec}, {src.dim}-d) hold different features")
        index = {key: i for i, key in enumerate(src.class_keys)}
        unknown = [key for key in store.class_keys if key not in index]
        if unknown:
            raise EvaluationError(f"domain shift maps classes by key; {len(unknown)} class(es) of {store.path} are not "
                                  f"classes of {src.path}: {', '.join(map(repr, unknown[:5]))}")
        _eval_class_split(cfg.replace(class_split=None, class_ratio=None), src, state)
        head = method.head(state, src, device)
        mapping = np.asarray([index[key] for key in store.class_keys])
        test_y = mapping[test_y]
        classes = np.unique(test_y)
        take, train_y = store_rows(src, "train", device)
        shot, source, names = k, str(src.path), src.class_names
    t1 = time.perf_counter()
    scores = run_allway(take, train_y, torch.from_numpy(test_x).to(device), test_y,
                        classes, shot, (seed,), head, class_names=names)
    acc = float(scores.top1[0]) * 100
    t2 = time.perf_counter()
    enc = store.attrs["encoder"]
    pc = scores.per_class[0]
    return EvalResult(
        protocol=cfg.protocol, accuracy=round(acc, 3), ci95=None, std=None, statistic="one fitted state: no interval",
        episodes=None, way=None, shots=k, query=None, split="test", classifier=state.method, encoder=enc["spec"],
        web_scale=bool(enc["web_scale"]), seed=None, seeds=[seed], n_seeds=1, per_seed=[round(acc, 3)],
        classes=len(classes), center="the state's own (see its hyper-parameters)", inductive=True, store=str(store.path),
        store_fingerprint=store.fingerprint, state=cfg.state, seconds=round(t2 - t0, 4), eval_seconds=round(t2 - t1, 4),
        mean_per_class=round(float(np.nanmean(pc)) * 100, 3),
        top5=None if scores.top5 is None else round(float(scores.top5[0]) * 100, 3), selected_on=dict(state.selected_on),
        ece=round(float(scores.ece[0]) * 100, 3), nll=round(float(scores.nll[0]), 4),
        warnings=[], source_store=source,
        per_class=_per_class(names, classes, pc, np.bincount(test_y, minlength=int(classes.max()) + 1)))


def _per_class(names: list[str], classes, accuracy: np.ndarray, rows: np.ndarray, **extra) -> list[dict]:
    """The per-class table of a report: name, accuracy (%), test rows, for ``classes`` in order."""
    return [{"class": names[int(c)], **extra, "accuracy": round(float(a) * 100, 3), "test_rows": int(rows[c])}
            for c, a in zip(classes, accuracy, strict=True)]


def _eval_class_split(cfg: EvalConfig, store: FeatureStore, state) -> None:
    """The class split of an evaluation: the user's override, else the state's own (the split it
    was fitted with), else the store's. An override that contradicts the state's is refused."""
    given = store.override_class_split(cfg.class_split, cfg.class_ratio, cfg.split_seed)
    fitted = (state.hparams.get("class_split") if state is not None else None) or None
    if fitted is None:
        return
    strip = lambda d: {k: sorted(v) for k, v in d.items() if k != "source"}  # noqa: E731
    if given is not None and strip(given) != strip(fitted):
        raise EvaluationError(f"state {cfg.state} was fitted with another class split than the one given here; its "
                              f"novel classes must stay the ones it never learned from: drop --class-split/--class-ratio "
                              f"(the state's split is used) or fit again with this split")
    if given is None and strip(store.attrs["class_split"]) != strip(fitted):
        store.override_class_split(split={**fitted, "source": f"the class split state {cfg.state} was fitted with"})


def _center_text(cfg: EvalConfig, episodic: bool) -> str:
    """What the evaluated head subtracts before normalising, as it really is."""
    if cfg.state:
        return "the state's own (see its hyper-parameters)"
    if cfg.classifier not in ("prototype", "simpleshot") or cfg.center == "none":
        return "none"
    return "base-class mean (SimpleShot)" if episodic else "support mean (no base classes in the all-way protocol)"


def _check_state_seeds(cfg: EvalConfig, state, warnings: list[str], strict: bool = False) -> None:
    """A state fitted on the K shots of one seed, evaluated all-way: a method whose state holds the
    fitted model (fma, a semi-supervised student) would score that one model under every seed, so
    other seeds or K are refused; for methods that refit on the shots they are given, a K or seed
    other than the state's (whose hyper-parameters were chosen for its own) is a warning."""
    k, seed = state.config.get("shots"), state.config.get("seed")
    if k is None or seed is None:
        return
    method = METHODS.get(state.method)()
    if strict and (tuple(cfg.seeds) != (seed,) or cfg.shots != k):
        raise EvaluationError(
            f"state {cfg.state} was fitted for base-to-new on the {k} shots per base class of seed {seed} (all it "
            f"was shown); evaluate it with --shots {k} --seeds {seed}, and fit one state per seed for numbers over seeds")
    if method.bound_to_shots(state):
        if tuple(cfg.seeds) != (seed,) or cfg.shots != k:
            raise EvaluationError(
                f"state {cfg.state} ({state.method}) holds a model fitted on the {k} shots per class of seed {seed}; "
                f"evaluating it with --shots {cfg.shots} --seeds {','.join(map(str, cfg.seeds))} would score that one "
                f"model again and again, not independent runs. Evaluate it with --shots {k} --seeds {seed}; for "
                f"numbers over seeds, fit one state per seed (--seed 1, 2, 3) and evaluate each with its own seed")
    elif cfg.shots != k or tuple(cfg.seeds) != (seed,):
        warnings.append(f"the hyper-parameters of state {cfg.state} were chosen for {k} shots and seed {seed}; it is "
                        f"evaluated here with {cfg.shots} shots and seeds {list(cfg.seeds)} (fit one state per K and seed "
                        f"for the protocol's own numbers)")


def compare(a: str, b: str) -> dict:
    """Paired difference A - B of two evaluation reports of the same experiment, with its 95% CI
    (``fskd compare A.json B.json``); see :mod:`fskd.reports.compare`."""
    _path_arg(a, "a", "compare")
    _path_arg(b, "b", "compare")
    return compare_reports(a, b)


@dataclass
class FitResult:
    """What adapt/align/distill wrote: the state directory and its metadata."""

    out: str
    method: str
    kind: str
    hparams: dict
    selected_on: dict
    metrics: dict
    seconds: float
    warnings: list[str] = field(default_factory=list)


def _fit(kind: str, config: AdaptConfig | AlignConfig | DistillConfig, progress: TrainProgress | None) -> FitResult:
    with backend_errors(config.store):  # a store on object storage that stops answering: one error naming it
        return _fit_store(kind, config, progress)


def _fit_store(kind: str, config: AdaptConfig | AlignConfig | DistillConfig, progress: TrainProgress | None) -> FitResult:
    t0 = time.perf_counter()
    method_cls = METHODS.get(config.method)
    if method_cls.kind != kind:
        a = lambda w: f"an {w}" if w[0] in "aeiou" else f"a {w}"  # noqa: E731
        raise ConfigError(f"method {config.method!r} is {a(method_cls.kind)} method, not {a(kind)} method; "
                          f"{kind} methods: {', '.join(n for n in METHODS.names() if METHODS.get(n).kind == kind)}")
    store = FeatureStore.open(config.store)
    store.check_complete()
    override = store.override_class_split(config.class_split, config.class_ratio, config.split_seed)
    if config.base_to_new:
        if override:
            raise ConfigError("--base-to-new splits the classes in half by label order (CoCoOp); drop --class-split / "
                              "--class-ratio")
        if config.shots < 1:
            raise ConfigError("--base-to-new fits on K shots of the base classes: --shots must be >= 1 (16 in CoCoOp)")
        b2n_desc = restrict_for_fit(store, config.shots, config.seed, config.hp_selection)
    warnings = [] if config.base_to_new else _validation_warnings(store, config)
    out = config.out or str(Path("runs") / kind / f"{config.method}-{config.shots}shot")
    # before any fitting: --out must be new, or an fskd state and --force; never the store or data
    roots = [store.attrs["dataset"].get("root") or None, getattr(config, "root", None)]
    guard_out(out, config.force, store=str(store.path), root=roots[0])
    if roots[1]:
        guard_out(out, config.force, root=roots[1])
    config = config.replace(out=out)
    state = method_cls().fit(store, config, progress)
    state.store_path = absolute_store(state.store_path)  # found again from any working directory
    split = store.attrs["class_split"]
    state.hparams["class_split"] = {k: v for k, v in split.items() if k != "source"}
    state.selected_on["class_split"] = (split.get("source") if override or config.base_to_new
                                        else f"the store's ({split.get('source')})")
    if config.base_to_new:
        state.metrics["base_to_new"] = b2n_desc
    state.selected_on = provenance(state.hparams, state.selected_on, config)
    state.metrics["warnings"] = warnings
    seconds = round(time.perf_counter() - t0, 3)
    state.metrics["fit_seconds"] = seconds
    if dist_info().is_main:  # under torchrun every rank fits; one writes the state
        save_state(out, state)
    for w in warnings:
        log.warning("%s", w)
    return FitResult(out=out, method=state.method, kind=kind, hparams=state.hparams, selected_on=state.selected_on,
                     metrics=state.metrics, seconds=seconds, warnings=warnings)


#: below these, validation cannot tell hyper-parameters apart (said, not refused)
MIN_VAL_CLASSES = 5


def _validation_warnings(store: FeatureStore, config) -> list[str]:
    out = []
    if getattr(config, "hp_selection", None) == "none":
        return out
    n_val = len(store.attrs["class_split"].get("val", []))
    if n_val < MIN_VAL_CLASSES:
        out.append(f"only {n_val} val classes (fewer than {MIN_VAL_CLASSES}): episodic hyper-parameters are chosen on "
                   f"very few val-class episodes, or fixed; give a split with more val classes (--class-split FILE or "
                   f"--class-ratio)")
    if store.has_split("val"):
        rows = int((store.labels("val") >= 0).sum())
        if rows < store.num_classes:
            out.append(f"the val split has {rows} rows for {store.num_classes} classes (fewer rows than classes): "
                       f"all-way hyper-parameters chosen on it are close to arbitrary")
    return out


#: hyper-parameters that are inputs of the protocol rather than choices
_GIVEN = {"shots": "--shots", "regime": "--regime / --set regime", "student": "--student", "teacher": "the store",
          "losses": "--losses", "epochs": "--epochs", "base_method": "--base-state"}


def provenance(hparams: dict, selected_on: dict, config) -> dict:
    """Where each hyper-parameter came from, in one vocabulary: ``default``, ``user-set (...)``,
    ``chosen on <validation data>``, or the method's own words (meta-trained, fixed, ...)."""
    user = dict(config.options)
    if getattr(config, "steps", None):
        user["steps"] = list(config.steps)
    if getattr(config, "gamma", None) is not None:
        user["gamma"] = config.gamma
    out = {}
    for k in list(dict.fromkeys([*hparams, *selected_on])):
        on = selected_on.get(k)
        base = k.split(".")[-1]
        if base in user and (on is None or str(on).startswith(("fixed", "given", "default"))):
            out[k] = f"user-set ({base}={json.dumps(user[base])})"
        elif on is None or on in ("fixed", "fixed (default)", "default"):
            out[k] = f"given ({_GIVEN[base]})" if base in _GIVEN else "default"
        elif isinstance(on, str) and on.startswith("val"):
            out[k] = f"chosen on {on}"
        else:
            out[k] = on
    return out


def adapt(config: AdaptConfig, progress: TrainProgress | str | None = AUTO) -> FitResult:
    """Fit a few-shot classifier (``fskd adapt --method``) on cached features; save its state."""
    _takes(config, AdaptConfig, "adapt")
    return _fit("adapt", config, resolve_progress(progress, train_bar))


def align(config: AlignConfig, progress: TrainProgress | str | None = AUTO) -> FitResult:
    """Fit a cross-modal alignment (``fskd align --method fma``) on cached features; save its state."""
    _takes(config, AlignConfig, "align")
    return _fit("align", config, resolve_progress(progress, train_bar))


def distill(config: DistillConfig, progress: TrainProgress | str | None = AUTO) -> FitResult:
    """Distil the store's encoder (teacher) into a student encoder; save the student state."""
    _takes(config, DistillConfig, "distill")
    return _fit("distill", config, resolve_progress(progress, train_bar))


@dataclass
class DemoResult:
    rows: list[dict]
    report: str
    seconds: float
    plot: str = ""  # demo.png: accuracy vs shots with 95% CIs


def _forget_demo_reports(out: Path) -> None:
    """A rerun of the demo replaces its evaluation reports (not ``-2`` copies beside them): delete
    the ones the previous run's ``demo.json`` names, and only those, inside ``out``."""
    try:
        rows = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    base = out.resolve()
    for row in rows if isinstance(rows, list) else []:
        for p in (row.get("report") or []) if isinstance(row, dict) else []:
            path = Path(str(p)).resolve()
            if path.parent == base and path.suffix in (".json", ".md") and path.name != "demo.json":
                path.unlink(missing_ok=True)


def demo(config: DemoConfig, progress: Progress | str | None = AUTO) -> DemoResult:
    """The main job on the embedded default: encode the offline datasets with the offline
    encoder once, then evaluate 5-way 1-shot and 5-shot prototypes on their novel classes and
    the all-way protocol on CUB. Writes ``<out>/demo.md`` and ``<out>/demo.json``."""
    _takes(config, DemoConfig, "demo")
    t0 = time.perf_counter()
    root = Path(config.data_root)
    roots = {"cub": root / "cub35", "omniglot": root / "omniglot"}
    rows: list[dict] = []
    points: list[tuple] = []  # (dataset, protocol, K, accuracy, 95% CI) for the plot
    out = Path(config.out)
    _forget_demo_reports(out)
    for ds in config.datasets:
        if ds not in roots:
            raise DatasetError(f"demo datasets are {', '.join(roots)}; got {ds!r}")
        if not roots[ds].exists():
            raise DatasetError(f"demo data {roots[ds]} not found; pass --data-root to the folder holding cub35/ and omniglot/")
        store = out / f"{ds}-{config.encoder}.zarr"
        extract(ExtractConfig(dataset=ds, root=str(roots[ds]), encoder=config.encoder, store=str(store),
                              workers=config.workers), progress)
        for shot in (1, 5):
            r = evaluate(EvalConfig(store=str(store), way=5, shots=shot, query=15, episodes=config.episodes, report=str(out)))
            points.append((ds, "5-way novel", shot, r.accuracy, r.ci95))
            rows.append({"dataset": ds, "protocol": f"5-way {shot}-shot novel", "accuracy": f"{r.accuracy:.2f} ± {r.ci95:.2f}",
                         "classes": r.classes, "episodes": r.episodes, "eval s": r.eval_seconds, "report": r.report})
        if ds == "cub":
            for shot in (1, 4, 16):
                r = evaluate(EvalConfig(store=str(store), protocol="allway", shots=shot, report=str(out)))
                points.append((ds, "all-way", shot, r.accuracy, r.ci95))
                rows.append({"dataset": ds, "protocol": f"all-way {shot}-shot", "accuracy": f"{r.accuracy:.2f} ± {r.ci95:.2f}",
                             "classes": r.classes, "episodes": "seeds 1-3", "eval s": r.eval_seconds, "report": r.report})
    table = markdown_table(rows, ["dataset", "protocol", "accuracy", "classes", "episodes", "eval s"])
    out.mkdir(parents=True, exist_ok=True)
    report = out / "demo.md"
    report.write_text(
        f"# fskd demo\n\nEncoder `{config.encoder}`, prototype classifier (SimpleShot: base-mean centring, L2). "
        f"Episodic rows: mean accuracy and 95% CI over {config.episodes} episodes on novel classes. "
        f"All-way rows: mean over seeds 1-3 and 95% CI (Student t over the 3 seeds).\n\n{table}",
        encoding="utf-8",
    )

    (out / "demo.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    from fskd.reports.plots import demo_plot

    plot = demo_plot(out / "demo.png", points, config.encoder, config.episodes)
    return DemoResult(rows=rows, report=str(report), seconds=round(time.perf_counter() - t0, 2), plot=str(plot))


# -- fskd bench: the grid runner ------------------------------------------------------------------
@dataclass
class BenchResult:
    """What ``fskd bench`` did: cells in the grid, how many were already done, ok, n/a, failed."""

    out: str
    cells: int
    counts: dict
    seconds: float
    outputs: list[str]
    failed: list[str] = field(default_factory=list)


def load_grid(path: str) -> dict:
    """A grid file (TOML) as a dict of BenchConfig keys; unknown keys are refused, naming the file."""
    import sys

    _path_arg(path, "path", "load_grid")

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    from fskd.fsutil import read_small_file

    text = read_small_file(path, "--grid", what="TOML grid file")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--grid {path}: not valid TOML ({e})") from None
    except RecursionError:  # a = [[[[... nested deeper than the parser's stack
        raise ConfigError(f"--grid {path}: nested too deeply to be a TOML grid file") from None
    from fskd.config import BenchConfig

    executor = {"kind": "executor", "cells_per_job": "cells_per_job", "detach": "detach", "slurm": "slurm"}
    valid = {f for f in BenchConfig.__dataclass_fields__} - (set(executor.values()) - {"executor"})
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ConfigError(f"--grid {path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}")
    table = data.pop("executor", None)
    if table is not None:  # [executor] kind = "slurm", cells_per_job = N, [executor.slurm] partition = ...
        if not isinstance(table, dict):
            raise ConfigError(f"--grid {path}: executor is a table ([executor] kind = \"slurm\", cells_per_job = 4, "
                              f"[executor.slurm] partition = \"gpu\"), got {table!r:.80}")
        unknown = sorted(set(table) - set(executor))
        if unknown:
            raise ConfigError(f"--grid {path}: [executor] unknown key(s) {', '.join(unknown)}; valid keys: "
                              f"{', '.join(executor)}")
        data.update({executor[k]: v for k, v in table.items()})
    return data


def bench(config, progress=AUTO) -> BenchResult:
    """Run a benchmark grid (``fskd bench``): every (store, method, shots, seed) cell is fitted
    and evaluated once (all-way, base-to-new, transfer or episodic; a distill row's student is
    scored on the store's images encoded by it), its row appended to ``OUT/results.jsonl``; a rerun
    skips finished cells. Then the tables and plots are rebuilt (:mod:`fskd.reports.bench`).
    ``progress``: "auto" (a bar over cells with an ETA on a terminal), None, or
    ``callable(done, total, cell_label)``. The cells run here, or as Slurm jobs with
    ``config.executor == "slurm"`` (:mod:`fskd.bench.slurm`)."""
    _takes(config, BenchConfig, "bench")

    from fskd.bench.runner import CellRunner, GridPlan, LogOnce, same_grid
    from fskd.fsutil import atomic_write_text, dir_lock
    from fskd.progress import bench_bar, bench_log
    from fskd.reports import versions
    from fskd.reports.bench import BENCH_JSON, RESULTS, Results, check_rows, run_grid, write_outputs

    t0 = time.perf_counter()
    plan = GridPlan(config)
    same_grid(plan.out, plan.keys, config.extend)
    out = plan.out
    once = LogOnce()  # a store's warning is said once, not once per cell (every row records it)
    for h in logging.getLogger().handlers:
        h.addFilter(once)
    try:
        with dir_lock(out, f"another fskd bench is writing {out}; waiting for it", log):
            atomic_write_text(out / BENCH_JSON, json.dumps(plan.meta(versions()), indent=2))
            results = Results(out)
            check_rows(results.rows, out / RESULTS)
            if config.executor == "slurm":
                from fskd.bench.slurm import run_slurm

                counts = run_slurm(plan, results, _bench_job, resolve_progress(progress, bench_bar, bench_log))
            else:
                runner = CellRunner(plan, _verbs(), out / f".cell-state-{os.getpid()}",
                                    out / f".cell-student-{os.getpid()}")  # a distill cell's student store
                runner.clear_scratch()
                try:
                    counts = run_grid(plan.cells, results, runner.run, resolve_progress(progress, bench_bar, bench_log))
                finally:
                    runner.clear_scratch()
            detached = config.executor == "slurm" and config.detach and not (results.done().keys() & plan.keys)
            outputs = ([] if detached else  # submitted, nothing finished yet: no table to build
                       write_outputs(out, results.rows, config.to_dict(), [c.key for c in plan.cells]))
    finally:
        for h in logging.getLogger().handlers:
            h.removeFilter(once)
    failed = [f"{r['dataset']} {r['method']} {r['shots']}-shot seed {r['seed']}: {r.get('message')}"
              for r in results.rows if r["status"] == "failed" and r["key"] in plan.keys]
    return BenchResult(out=str(out), cells=len(plan.cells), counts=counts, seconds=round(time.perf_counter() - t0, 2),
                       outputs=[str(p) for p in outputs], failed=failed)


def _verbs():
    from fskd.bench.runner import Verbs

    return Verbs(adapt=adapt, align=align, distill=distill, evaluate=evaluate, extract=extract)


def _bench_job(config: dict, keys: list[str], scratch: str, storage: dict | None = None) -> dict:
    """A Slurm job of ``fskd bench --executor slurm``: run the grid's cells ``keys`` with the same
    code as a local run, each row written to ``OUT/cells/`` as it finishes (see :mod:`fskd.bench.slurm`).
    ``storage``: the driver's ``--storage-options``."""
    from fskd.bench.slurm import run_job

    if storage is not None:
        configure_storage(storage)
    return run_job(BenchConfig.from_dict(config), keys, Path(scratch), _verbs())


def bench_report(out: str) -> list[str]:
    """Rebuild a bench's tables and plots from ``OUT/results.jsonl`` without refitting
    (``fskd bench --report OUT``)."""
    from fskd.reports.bench import (
        BENCH_JSON,
        RESULTS,
        Results,
        check_meta,
        check_rows,
        is_bench_dir,
        write_outputs,
    )

    _path_arg(out, "out", "bench_report")
    d = Path(out)
    if not is_bench_dir(d):
        raise OutputError(f"--report {out} is not a folder written by fskd bench (no {BENCH_JSON})")
    config, cells = check_meta(json.loads((d / BENCH_JSON).read_text(encoding="utf-8")), d / BENCH_JSON)
    rows = Results(d).rows
    check_rows(rows, d / RESULTS)
    from fskd.bench.slurm import unmerged_rows

    rows = rows + unmerged_rows(d, rows)  # cells Slurm jobs finished since the driver last merged (read only)
    return [str(p) for p in write_outputs(d, rows, config, cells)]


# -- deploy: predict on new images, export a model file (fskd.deploy; loaded on first use) -----------
def load_classifier(state_dir: str, store: str | None = None, device: str = "auto"):
    """The all-way head of a fitted state over its store's classes, ready for new images:
    ``clf.predict(paths | PIL images | features (n, D))`` returns one dict per input with the
    columns ``fskd predict`` writes. ``store``: the state's store when it moved (checked by
    fingerprint). See :class:`fskd.deploy.classifier.Classifier`."""
    from fskd.deploy.classifier import Classifier

    _path_arg(state_dir, "state_dir", "load_classifier")
    with backend_errors(store or ""):
        return Classifier(state_dir, store, device)


def predict(config, progress: Progress | str | None = AUTO):
    """Predict with a fitted state's all-way head (``fskd predict``): new images (encoded with the
    store's encoder) or a store split's cached features; one row per image, written under a
    temporary name and renamed when complete. ``progress`` as :func:`extract`'s."""
    from fskd.deploy.predict import predict as _predict

    _takes(config, PredictConfig, "predict")
    with backend_errors(config.store or ""):
        return _predict(config, resolve_progress(progress, _predict_bar, _predict_log))


def _predict_bar():
    """progress(stage, done, total, rate) of fskd predict as a tqdm bar (images/s)."""
    import sys

    from tqdm import tqdm

    bars: dict = {}

    def update(stage: str, done: int, total: int, rate: float) -> None:
        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=f"predict {stage}", unit="img", file=sys.stderr)
        bars[stage].update(done - bars[stage].n)  # tqdm shows the images/s rate
        if done >= total:
            bars[stage].close()

    return update


def _predict_log():
    """progress(stage, done, total, rate) of fskd predict as log lines on ``fskd.progress``."""
    import time as _time

    last = [0.0]

    def update(stage: str, done: int, total: int, rate: float) -> None:
        now = _time.monotonic()
        if done < total and now - last[0] < 10.0:
            return
        last[0] = now
        logging.getLogger("fskd.progress").info("predict %s: %s/%s images (%d%%), %.1f img/s", stage, f"{done:,}",
                                                f"{total:,}", 100 * done // max(total, 1), rate)

    return update


def export(config):
    """Export a fitted state (``fskd export``): the image encoder, the all-way head and the class
    names in one ONNX or TorchScript file taking preprocessed images, returning probabilities."""
    from fskd.deploy.export import export as _export

    _takes(config, ExportConfig, "export")
    return _export(config)


from fskd.config import ExportConfig, PredictConfig  # noqa: E402 - the deploy verbs' configs, part of the api

__all__ += ["load_classifier", "predict", "export", "PredictConfig", "ExportConfig"]
