"""The library's API: one short function per verb, a config in, a result dataclass out. Never
prints, never exits. Each checks what it was given and resolves its progress reporting; the work is
in :mod:`fskd.verbs` (evaluate, fit), :mod:`fskd.store.extract`, :mod:`fskd.bench` and
:mod:`fskd.deploy`. The CLI, the examples, the benchmarks and the tests all call these functions.
"""

from __future__ import annotations

import os

from fskd.bench import grid as _grid
from fskd.bench.grid import BenchResult
from fskd.catalog import method_info, registries, store_info  # noqa: F401 - part of the api
from fskd.config import (
    AdaptConfig,
    AlignConfig,
    BenchConfig,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    ExtractConfig,
    PredictConfig,
)
from fskd.errors import ConfigError
from fskd.methods.base import TrainProgress
from fskd.progress import AUTO, bench_bar, bench_log, extract_bar, extract_log, predict_bar, predict_log, train_bar
from fskd.progress import resolve as resolve_progress
from fskd.protocols.base import EvalResult
from fskd.reports.compare import compare_reports
from fskd.store.extract import ExtractResult, Progress
from fskd.store.extract import extract as _extract
from fskd.store.location import backend_errors
from fskd.store.location import configure as configure_storage  # noqa: F401 - part of the api
from fskd.verbs import evaluate as _evaluate
from fskd.verbs import fit as _fit
from fskd.verbs.fit import FitResult

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
    "predict",
    "export",
    "load_classifier",
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
    "PredictConfig",
    "ExportConfig",
    "ExtractResult",
    "EvalResult",
    "FitResult",
    "BenchResult",
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


def evaluate(config: EvalConfig) -> EvalResult:
    """Episodic (novel classes by default), all-way, base-to-new or transfer evaluation of a fitted
    state or a registered classifier (``fskd eval``); see docs/concepts.md, Protocols."""
    _takes(config, EvalConfig, "evaluate")
    return _evaluate.evaluate(config)


def compare(a: str, b: str) -> dict:
    """Paired difference A - B of two evaluation reports of the same experiment, with its 95% CI
    (``fskd compare A.json B.json``); see :mod:`fskd.reports.compare`."""
    _path_arg(a, "a", "compare")
    _path_arg(b, "b", "compare")
    return compare_reports(a, b)


def adapt(config: AdaptConfig, progress: TrainProgress | str | None = AUTO) -> FitResult:
    """Fit a few-shot classifier (``fskd adapt --method``) on cached features; save its state."""
    _takes(config, AdaptConfig, "adapt")
    return _fit.fit("adapt", config, resolve_progress(progress, train_bar))


def align(config: AlignConfig, progress: TrainProgress | str | None = AUTO) -> FitResult:
    """Fit a cross-modal alignment (``fskd align --method fma``) on cached features; save its state."""
    _takes(config, AlignConfig, "align")
    return _fit.fit("align", config, resolve_progress(progress, train_bar))


def distill(config: DistillConfig, progress: TrainProgress | str | None = AUTO) -> FitResult:
    """Distil the store's encoder (teacher) into a student encoder; save the student state."""
    _takes(config, DistillConfig, "distill")
    return _fit.fit("distill", config, resolve_progress(progress, train_bar))


def load_grid(path: str) -> dict:
    """A grid file (TOML) as a dict of BenchConfig keys; unknown keys are refused, naming the file."""
    _path_arg(path, "path", "load_grid")
    return _grid.load_grid(path)


def bench(config: BenchConfig, progress=AUTO) -> BenchResult:
    """Run a benchmark grid (``fskd bench``): every (store, method, shots, seed) cell is fitted
    and evaluated once (all-way, base-to-new, transfer or episodic; a distill row's student is
    scored on the store's images encoded by it), its row appended to ``OUT/results.jsonl``; a rerun
    skips finished cells. Then the tables and plots are rebuilt (:mod:`fskd.reports.bench`).
    ``progress``: "auto" (a bar over cells with an ETA on a terminal), None, or
    ``callable(done, total, cell_label)``. The cells run here, or as Slurm jobs with
    ``config.executor == "slurm"`` (:mod:`fskd.bench.slurm`)."""
    _takes(config, BenchConfig, "bench")
    return _grid.run(config, resolve_progress(progress, bench_bar, bench_log))


def bench_report(out: str) -> list[str]:
    """Rebuild a bench's tables and plots from ``OUT/results.jsonl`` without refitting
    (``fskd bench --report OUT``)."""
    _path_arg(out, "out", "bench_report")
    return _grid.report(out)


def load_classifier(state_dir: str, store: str | None = None, device: str = "auto"):
    """The all-way head of a fitted state over its store's classes, ready for new images:
    ``clf.predict(paths | PIL images | features (n, D))`` returns one dict per input with the
    columns ``fskd predict`` writes. ``store``: the state's store when it moved (checked by
    fingerprint). See :class:`fskd.deploy.classifier.Classifier`."""
    from fskd.deploy.classifier import Classifier

    _path_arg(state_dir, "state_dir", "load_classifier")
    with backend_errors(store or ""):
        return Classifier(state_dir, store, device)


def predict(config: PredictConfig, progress: Progress | str | None = AUTO):
    """Predict with a fitted state's all-way head (``fskd predict``): new images (encoded with the
    store's encoder) or a store split's cached features; one row per image, written under a
    temporary name and renamed when complete. ``progress`` as :func:`extract`'s."""
    from fskd.deploy.predict import predict as _predict

    _takes(config, PredictConfig, "predict")
    with backend_errors(config.store or ""):
        return _predict(config, resolve_progress(progress, predict_bar, predict_log))


def export(config: ExportConfig):
    """Export a fitted state (``fskd export``): the image encoder, the all-way head and the class
    names in one ONNX or TorchScript file taking preprocessed images, returning probabilities."""
    from fskd.deploy.export import export as _export

    _takes(config, ExportConfig, "export")
    return _export(config)
