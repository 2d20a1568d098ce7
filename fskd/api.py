"""One function per verb: a config in, a result dataclass out. Never prints, never exits.

The CLI, the examples, the benchmarks and the tests all call these functions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fskd.classifiers import CLASSIFIERS, ClassContext
from fskd.classifiers.base import Head
from fskd.classifiers.prototype import PrototypeHead
from fskd.config import (
    AdaptConfig,
    AlignConfig,
    DemoConfig,
    DistillConfig,
    EvalConfig,
    ExtractConfig,
)
from fskd.datasets import DATASETS
from fskd.encoders import ENCODERS
from fskd.errors import ConfigError, DatasetError, EvaluationError, OutputError, StateError
from fskd.evaluation.allway import run_allway
from fskd.evaluation.episodes import run_episodes, sample_episodes
from fskd.evaluation.metrics import mean_ci95, mean_std
from fskd.fsutil import check_writable, is_store_dir
from fskd.methods import METHODS, load_state
from fskd.methods.base import TrainProgress, guard_out, save_state
from fskd.reports import markdown_table, write_report
from fskd.runtime import dist_info, resolve_device
from fskd.store import FeatureStore
from fskd.store.extract import ExtractResult, Progress
from fskd.store.extract import extract as _extract

log = logging.getLogger(__name__)


def registries() -> dict[str, dict[str, str]]:
    """Every registry's names with one-line descriptions (``fskd datasets`` / ``encoders`` / ...)."""
    return {
        "datasets": {n: DATASETS.describe(n) for n in DATASETS.names()},
        "encoders": {n: ENCODERS.describe(n) for n in ENCODERS.names()},
        "classifiers": {n: CLASSIFIERS.describe(n) for n in CLASSIFIERS.names()},
        "methods": {n: f"[{METHODS.get(n).kind}] {METHODS.describe(n)}" for n in METHODS.names()},
    }


def extract(config: ExtractConfig, progress: Progress | None = None, source=None) -> ExtractResult:
    """Encode a dataset into a feature store (resumable; reused when already complete).
    ``source``: an ImageDataset object to use instead of the registered ``config.dataset``."""
    return _extract(config, progress, source)


def store_info(path: str, check: bool = False) -> dict:
    """Summary of a feature store: encoder, dataset, classes, splits, completeness, skipped and
    ignored files, missing chunks; ``check``: every chunk verified against its checksum."""
    store = FeatureStore.open(path)
    out = store.summary()
    if check:
        out["check"] = store.check_report()
    return out


@dataclass
class EvalResult:
    protocol: str
    accuracy: float  # percent
    ci95: float  # percent; 95% CI half-width (episodic) or std over seeds (all-way: see std)
    std: float | None
    episodes: int | None
    way: int | None
    shot: int
    query: int | None
    split: str
    classifier: str
    encoder: str
    web_scale: bool
    seed: int | None
    seeds: list[int] | None
    per_seed: list[float] | None
    classes: int
    center: str
    inductive: bool
    store: str
    state: str | None
    seconds: float
    eval_seconds: float
    selected_on: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what the protocol had to leave out, said aloud

    def to_dict(self) -> dict:
        return asdict(self)

    def protocol_text(self) -> str:
        enc = f"encoder {self.encoder} ({'saw' if self.web_scale else 'did not see'} web-scale image-text data)"
        chosen = "; ".join(f"{k} chosen on {v}" for k, v in self.selected_on.items()) or "no hyper-parameters"
        if self.protocol == "episodic":
            return (
                f"Episodic: {self.way}-way {self.shot}-shot, {self.query} queries per class, {self.episodes} episodes "
                f"over the {self.classes} {self.split} classes, seed {self.seed}; inductive; mean accuracy and 95% CI; "
                f"{enc}; classifier {self.classifier}; {chosen}."
            )
        return (
            f"All-way: {self.shot} shots per class from the train split, all {self.classes} classes, the full test "
            f"split, seeds {self.seeds}; inductive; mean and std over seeds; {enc}; classifier {self.classifier}; {chosen}."
        )


def _head(cfg: EvalConfig, store: FeatureStore, device: torch.device) -> tuple[Head, str, dict]:
    """The head to evaluate: the state's method, else a registered classifier."""
    if cfg.state:
        state = load_state(cfg.state)
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
    if isinstance(head, PrototypeHead) and cfg.protocol == "allway" and cfg.center == "base":
        head = PrototypeHead(ctx, center_support=True)  # no base classes in all-way: centre on the support mean
    return head, cfg.classifier, {}


def evaluate(config: EvalConfig) -> EvalResult:
    """Episodic (novel classes by default) or all-way evaluation; see DESIGN.md protocols."""
    t0 = time.perf_counter()
    cfg = config
    if cfg.report:
        check_writable(cfg.report, "--report")  # before the work, not after it
        if any(is_store_dir(p) for p in (Path(cfg.report).absolute(), *Path(cfg.report).absolute().parents)):
            raise OutputError(f"--report {cfg.report} is inside a feature store; write reports somewhere else")
    store = FeatureStore.open(cfg.store)
    store.check_complete()
    device = resolve_device(cfg.device)
    head, name, selected = _head(cfg, store, device)
    names = store.class_names
    warnings: list[str] = [f"{len(ids)} unreadable file(s) of the {s} split were skipped at extraction"
                           for s, ids in store.skipped().items()]
    if cfg.protocol == "episodic":
        classes = store.class_split(cfg.split)
        if not classes:
            raise EvaluationError(f"{store.path}: the {cfg.split!r} class split is empty")
        feats, labels = store.gather(classes)
        t1 = time.perf_counter()
        eps = sample_episodes(labels, classes, cfg.way, cfg.shot, cfg.query, cfg.episodes, cfg.seed, names)
        accs = run_episodes(torch.from_numpy(feats).to(device), eps, head, cfg.episode_batch)
        acc, ci = mean_ci95(accs)
        std, per_seed, n_classes = None, None, len(classes)
    else:
        for s in ("train", "test"):
            if not store.has_split(s):
                raise EvaluationError(f"the all-way protocol needs a {s!r} sample split; {store.path} has {store.splits}")
        train_x, train_y = store.gather(None, ["train"])
        test_x, test_y = store.gather(None, ["test"])
        classes = np.unique(test_y)
        absent = sorted(set(range(store.num_classes)) - set(classes.tolist()))
        if absent:
            warnings.append(f"{len(absent)} of {store.num_classes} classes have no readable test rows and are left out "
                            f"of the all-way evaluation: {', '.join(repr(names[c]) for c in absent[:10])}"
                            f"{' ...' if len(absent) > 10 else ''}")
        t1 = time.perf_counter()
        accs = run_allway(torch.from_numpy(train_x).to(device), train_y, torch.from_numpy(test_x).to(device), test_y,
                          classes, cfg.shot, tuple(cfg.seeds), head, class_names=names)
        acc, std = mean_std(accs)
        ci, per_seed, n_classes = std, [round(float(a) * 100, 3) for a in accs], len(classes)
    t2 = time.perf_counter()
    enc = store.attrs["encoder"]
    episodic = cfg.protocol == "episodic"
    result = EvalResult(
        protocol=cfg.protocol, accuracy=round(acc, 3), ci95=round(ci, 3), std=None if std is None else round(std, 3),
        episodes=cfg.episodes if episodic else None, way=cfg.way if episodic else None, shot=cfg.shot,
        query=cfg.query if episodic else None, split=cfg.split if episodic else "test", classifier=name,
        encoder=enc["spec"], web_scale=bool(enc["web_scale"]), seed=cfg.seed if episodic else None,
        seeds=None if episodic else list(cfg.seeds), per_seed=per_seed, classes=n_classes, center=cfg.center,
        inductive=True, store=str(store.path), state=cfg.state, seconds=round(t2 - t0, 4),
        eval_seconds=round(t2 - t1, 4), selected_on=selected, warnings=warnings,
    )
    for w in warnings:
        log.warning("%s: %s", store.path, w)
    if cfg.report:
        tag = f"{cfg.way}way{cfg.shot}shot" if episodic else f"{cfg.shot}shot"
        try:
            write_report(cfg.report, f"eval_{cfg.protocol}_{name}_{tag}", result.to_dict(), result.protocol_text(),
                         cfg.to_dict())
        except OSError as e:
            raise OutputError(f"--report {cfg.report}: cannot write the report ({e.strerror or e}"
                              f"{f': {e.filename}' if e.filename else ''})", result=result) from None
    return result


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


def _fit(kind: str, config: AdaptConfig | AlignConfig | DistillConfig, progress: TrainProgress | None) -> FitResult:
    t0 = time.perf_counter()
    method_cls = METHODS.get(config.method)
    if method_cls.kind != kind:
        raise ConfigError(f"method {config.method!r} is a {method_cls.kind} method, not a {kind} method; "
                          f"{kind} methods: {', '.join(n for n in METHODS.names() if METHODS.get(n).kind == kind)}")
    store = FeatureStore.open(config.store)
    store.check_complete()
    out = config.out or str(Path("runs") / kind / f"{config.method}-{config.shots}shot")
    # before any fitting: --out must be new, or an fskd state and --force; never the store or data
    roots = [store.attrs["dataset"].get("root") or None, getattr(config, "root", None)]
    guard_out(out, config.force, store=str(store.path), root=roots[0])
    if roots[1]:
        guard_out(out, config.force, root=roots[1])
    config = config.replace(out=out)
    state = method_cls().fit(store, config, progress)
    if dist_info().is_main:  # under torchrun every rank fits; one writes the state
        save_state(out, state)
    return FitResult(out=out, method=state.method, kind=kind, hparams=state.hparams, selected_on=state.selected_on,
                     metrics=state.metrics, seconds=round(time.perf_counter() - t0, 3))


def adapt(config: AdaptConfig, progress: TrainProgress | None = None) -> FitResult:
    """Fit a few-shot classifier (``fskd adapt --method``) on cached features; save its state."""
    return _fit("adapt", config, progress)


def align(config: AlignConfig, progress: TrainProgress | None = None) -> FitResult:
    """Fit a cross-modal alignment (``fskd align --method fma``) on cached features; save its state."""
    return _fit("align", config, progress)


def distill(config: DistillConfig, progress: TrainProgress | None = None) -> FitResult:
    """Distil the store's encoder (teacher) into a student encoder; save the student state."""
    return _fit("distill", config, progress)


@dataclass
class DemoResult:
    rows: list[dict]
    report: str
    seconds: float


def demo(config: DemoConfig, progress: Progress | None = None) -> DemoResult:
    """The main job on the embedded default: encode the offline datasets with the offline
    encoder once, then evaluate 5-way 1-shot and 5-shot prototypes on their novel classes and
    the all-way protocol on CUB. Writes ``<out>/demo.md`` and ``<out>/demo.json``."""
    t0 = time.perf_counter()
    root = Path(config.data_root)
    roots = {"cub": root / "cub35", "omniglot": root / "omniglot"}
    rows: list[dict] = []
    out = Path(config.out)
    for ds in config.datasets:
        if ds not in roots:
            raise DatasetError(f"demo datasets are {', '.join(roots)}; got {ds!r}")
        if not roots[ds].exists():
            raise DatasetError(f"demo data {roots[ds]} not found; pass --data-root to the folder holding cub35/ and omniglot/")
        store = out / f"{ds}-{config.encoder}.zarr"
        extract(ExtractConfig(dataset=ds, root=str(roots[ds]), encoder=config.encoder, store=str(store),
                              workers=config.workers), progress)
        for shot in (1, 5):
            r = evaluate(EvalConfig(store=str(store), way=5, shot=shot, query=15, episodes=config.episodes, report=str(out)))
            rows.append({"dataset": ds, "protocol": f"5-way {shot}-shot novel", "accuracy": f"{r.accuracy:.2f} ± {r.ci95:.2f}",
                         "classes": r.classes, "episodes": r.episodes, "eval s": r.eval_seconds})
        if ds == "cub":
            for shot in (1, 4, 16):
                r = evaluate(EvalConfig(store=str(store), protocol="allway", shot=shot, report=str(out)))
                rows.append({"dataset": ds, "protocol": f"all-way {shot}-shot", "accuracy": f"{r.accuracy:.2f} ± {r.std:.2f}",
                             "classes": r.classes, "episodes": "seeds 1-3", "eval s": r.eval_seconds})
    table = markdown_table(rows, ["dataset", "protocol", "accuracy", "classes", "episodes", "eval s"])
    out.mkdir(parents=True, exist_ok=True)
    report = out / "demo.md"
    report.write_text(
        f"# fskd demo\n\nEncoder `{config.encoder}`, prototype classifier (SimpleShot: base-mean centring, L2). "
        f"Episodic rows: mean accuracy and 95% CI over {config.episodes} episodes on novel classes. "
        f"All-way rows: mean and std over seeds 1-3.\n\n{table}"
    )
    import json

    (out / "demo.json").write_text(json.dumps(rows, indent=2))
    return DemoResult(rows=rows, report=str(report), seconds=round(time.perf_counter() - t0, 2))
