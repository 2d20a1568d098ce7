"""One function per verb: a config in, a result dataclass out. Never prints, never exits.

The CLI, the examples, the benchmarks and the tests all call these functions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

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
    FskdError,
    OutputError,
    StateError,
)
from fskd.fsutil import check_writable, store_containing
from fskd.methods import METHODS, load_state
from fskd.methods.base import TrainProgress, guard_out, save_state
from fskd.progress import AUTO, extract_bar, extract_log, train_bar
from fskd.progress import resolve as resolve_progress
from fskd.protocols import PROTOCOLS
from fskd.protocols.base import EvalContext, EvalResult
from fskd.protocols.base_to_new import restrict_for_fit
from fskd.reports import markdown_table, report_name, write_report
from fskd.reports.compare import compare_reports
from fskd.runtime import compute_threads, dist_info, resolve_device, store_numel
from fskd.store import FeatureStore, StoreLike, class_split_override
from fskd.store.extract import ExtractResult, Progress
from fskd.store.extract import extract as _extract
from fskd.store.location import absolute_store, backend_errors
from fskd.store.location import configure as configure_storage  # noqa: F401 - part of the api

log = logging.getLogger(__name__)

#: the public API: one function per verb, the listings, and the configs and results they take and give
__all__ = [
    "extract",
    "evaluate",
    "adapt",
    "align",
    "distill",
    "bench",
    "bench_report",
    "load_grid",
    "compare",
    "demo",
    "method_info",
    "registries",
    "store_info",
    "configure_storage",
    "ExtractConfig",
    "EvalConfig",
    "AdaptConfig",
    "AlignConfig",
    "DistillConfig",
    "BenchConfig",
    "DemoConfig",
    "ExtractResult",
    "EvalResult",
    "FitResult",
    "BenchResult",
    "DemoResult",
]


def _takes(config, cls: type, verb: str) -> None:
    """Each verb takes its own config object; anything else is a ConfigError naming what it got
    (``api.evaluate(None)``), not an AttributeError deep inside."""
    if not isinstance(config, cls):
        a = "an" if cls.__name__[0] in "AEIOU" else "a"
        raise ConfigError(
            f"fskd.api.{verb} takes {a} {cls.__name__}, got {type(config).__name__} {config!r:.80} "
            f"(build one with {cls.__name__}(store=...))"
        )


def _path_arg(value, name: str, verb: str) -> None:
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(
            f"fskd.api.{verb}: {name} must be a path (a string), got {type(value).__name__} {value!r:.80}"
        )


def extract(config: ExtractConfig, progress: Progress | str | None = AUTO, source=None) -> ExtractResult:
    """Encode a dataset into a feature store (resumable; reused when already complete).
    ``progress``: "auto" (a bar when stderr is a terminal), None, or a callable.
    ``source``: an ImageDataset object to use instead of the registered ``config.dataset``."""
    _takes(config, ExtractConfig, "extract")
    return _extract(config, resolve_progress(progress, extract_bar, extract_log), source)


def _head(cfg: EvalConfig, store: StoreLike, device: torch.device, state=None) -> tuple[Head, str, dict]:
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
        raise StateError(
            f"state {cfg.state} does not fit the store {cfg.store} ({type(e).__name__}: {what}): its "
            f"tensors or hyper-parameters were edited or damaged, or another fskd wrote it; fit it again"
        ) from None


def _evaluate_store(cfg: EvalConfig, store: FeatureStore, t0: float) -> EvalResult:
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
        head=lambda s: _head(cfg, s, device, state),
        transferring_methods=lambda: [n for n in METHODS.names() if METHODS.get(n).transfers_to_new_classes],
    )
    return _finish(cfg, state, PROTOCOLS.get(cfg.protocol)().run(ctx))


def _finish(cfg: EvalConfig, state, result: EvalResult) -> EvalResult:
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


def _fit_store(
    kind: str, config: AdaptConfig | AlignConfig | DistillConfig, progress: TrainProgress | None
) -> FitResult:
    t0 = time.perf_counter()
    method_cls = METHODS.get(config.method)
    if method_cls.kind != kind:
        a = lambda w: f"an {w}" if w[0] in "aeiou" else f"a {w}"  # noqa: E731
        raise ConfigError(
            f"method {config.method!r} is {a(method_cls.kind)} method, not {a(kind)} method; "
            f"{kind} methods: {', '.join(n for n in METHODS.names() if METHODS.get(n).kind == kind)}"
        )
    opened = FeatureStore.open(config.store)
    opened.check_complete()
    # what the method sees: a read-only view (another class split, base-to-new's rows); the store is not changed
    override = class_split_override(opened, config.class_split, config.class_ratio, config.split_seed)
    store = opened.view(class_split=override)
    if config.base_to_new:
        if override:
            raise ConfigError(
                "--base-to-new splits the classes in half by label order (CoCoOp); drop --class-split / --class-ratio"
            )
        if config.shots < 1:
            raise ConfigError("--base-to-new fits on K shots of the base classes: --shots must be >= 1 (16 in CoCoOp)")
        store = restrict_for_fit(store, config.shots, config.seed, config.hp_selection)
        b2n_desc = store.description
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
    state.selected_on["class_split"] = (
        split.get("source") if override or config.base_to_new else f"the store's ({split.get('source')})"
    )
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
    return FitResult(
        out=out,
        method=state.method,
        kind=kind,
        hparams=state.hparams,
        selected_on=state.selected_on,
        metrics=state.metrics,
        seconds=seconds,
        warnings=warnings,
    )


#: below these, validation cannot tell hyper-parameters apart (said, not refused)
MIN_VAL_CLASSES = 5


def _validation_warnings(store: StoreLike, config) -> list[str]:
    out = []
    if getattr(config, "hp_selection", None) == "none":
        return out
    n_val = len(store.attrs["class_split"].get("val", []))
    if n_val < MIN_VAL_CLASSES:
        out.append(
            f"only {n_val} val classes (fewer than {MIN_VAL_CLASSES}): episodic hyper-parameters are chosen on "
            f"very few val-class episodes, or fixed; give a split with more val classes (--class-split FILE or "
            f"--class-ratio)"
        )
    if store.has_split("val"):
        rows = int((store.labels("val") >= 0).sum())
        if rows < store.num_classes:
            out.append(
                f"the val split has {rows} rows for {store.num_classes} classes (fewer rows than classes): "
                f"all-way hyper-parameters chosen on it are close to arbitrary"
            )
    return out


#: hyper-parameters that are inputs of the protocol rather than choices
_GIVEN = {
    "shots": "--shots",
    "regime": "--regime / --set regime",
    "student": "--student",
    "teacher": "the store",
    "losses": "--losses",
    "epochs": "--epochs",
    "base_method": "--base-state",
}


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
            raise DatasetError(
                f"demo data {roots[ds]} not found; pass --data-root to the folder holding cub35/ and omniglot/"
            )
        store = out / f"{ds}-{config.encoder}.zarr"
        extract(
            ExtractConfig(
                dataset=ds, root=str(roots[ds]), encoder=config.encoder, store=str(store), workers=config.workers
            ),
            progress,
        )
        for shot in (1, 5):
            r = evaluate(
                EvalConfig(store=str(store), way=5, shots=shot, query=15, episodes=config.episodes, report=str(out))
            )
            points.append((ds, "5-way novel", shot, r.accuracy, r.ci95))
            rows.append(
                {
                    "dataset": ds,
                    "protocol": f"5-way {shot}-shot novel",
                    "accuracy": f"{r.accuracy:.2f} ± {r.ci95:.2f}",
                    "classes": r.classes,
                    "episodes": r.episodes,
                    "eval s": r.eval_seconds,
                    "report": r.report,
                }
            )
        if ds == "cub":
            for shot in (1, 4, 16):
                r = evaluate(EvalConfig(store=str(store), protocol="allway", shots=shot, report=str(out)))
                points.append((ds, "all-way", shot, r.accuracy, r.ci95))
                rows.append(
                    {
                        "dataset": ds,
                        "protocol": f"all-way {shot}-shot",
                        "accuracy": f"{r.accuracy:.2f} ± {r.ci95:.2f}",
                        "classes": r.classes,
                        "episodes": "seeds 1-3",
                        "eval s": r.eval_seconds,
                        "report": r.report,
                    }
                )
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
            raise ConfigError(
                f'--grid {path}: executor is a table ([executor] kind = "slurm", cells_per_job = 4, '
                f'[executor.slurm] partition = "gpu"), got {table!r:.80}'
            )
        unknown = sorted(set(table) - set(executor))
        if unknown:
            raise ConfigError(
                f"--grid {path}: [executor] unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(executor)}"
            )
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
                runner = CellRunner(
                    plan, _verbs(), out / f".cell-state-{os.getpid()}", out / f".cell-student-{os.getpid()}"
                )  # a distill cell's student store
                runner.clear_scratch()
                try:
                    counts = run_grid(plan.cells, results, runner.run, resolve_progress(progress, bench_bar, bench_log))
                finally:
                    runner.clear_scratch()
            detached = config.executor == "slurm" and config.detach and not (results.done().keys() & plan.keys)
            outputs = (
                []
                if detached
                # submitted, nothing finished yet: no table to build
                else write_outputs(out, results.rows, config.to_dict(), [c.key for c in plan.cells])
            )
    finally:
        for h in logging.getLogger().handlers:
            h.removeFilter(once)
    failed = [
        f"{r['dataset']} {r['method']} {r['shots']}-shot seed {r['seed']}: {r.get('message')}"
        for r in results.rows
        if r["status"] == "failed" and r["key"] in plan.keys
    ]
    return BenchResult(
        out=str(out),
        cells=len(plan.cells),
        counts=counts,
        seconds=round(time.perf_counter() - t0, 2),
        outputs=[str(p) for p in outputs],
        failed=failed,
    )


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
        logging.getLogger("fskd.progress").info(
            "predict %s: %s/%s images (%d%%), %.1f img/s",
            stage,
            f"{done:,}",
            f"{total:,}",
            100 * done // max(total, 1),
            rate,
        )

    return update


def export(config):
    """Export a fitted state (``fskd export``): the image encoder, the all-way head and the class
    names in one ONNX or TorchScript file taking preprocessed images, returning probabilities."""
    from fskd.deploy.export import export as _export

    _takes(config, ExportConfig, "export")
    return _export(config)


from fskd.config import ExportConfig, PredictConfig  # noqa: E402 - the deploy verbs' configs, part of the api

__all__ += ["load_classifier", "predict", "export", "PredictConfig", "ExportConfig"]
