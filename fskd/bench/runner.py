"""A grid's plan (:class:`GridPlan`: its stores, cells and bench folder, checked before any cell
runs) and the code that runs one cell (:class:`CellRunner`: fit, evaluate, one result row). Both
executors run cells with this code: the local one in this process, the Slurm one in each job."""

from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fskd import __version__
from fskd.bench.chains import (
    STUDENT,
    Chain,
    chain_names,
    check_chain_names,
    is_chain,
    resolve_chain,
    run_chain,
    stage_options,
    teacher_metrics,
)
from fskd.config import AdaptConfig, AlignConfig, DistillConfig, EvalConfig, ExtractConfig, transductive_setting
from fskd.errors import (
    ConfigError,
    EvaluationError,
    FskdError,
    OutputError,
    RegistryError,
    StoreError,
)
from fskd.fsutil import check_writable, store_containing
from fskd.methods import METHODS
from fskd.methods.base import STATE_JSON, methods_of_kind
from fskd.reports.bench import (
    BENCH_FORMAT,
    BENCH_JSON,
    RESULTS,
    SOURCE_TAG,
    TRANSFER_PROTOCOLS,
    Cell,
    is_bench_dir,
)
from fskd.store import FeatureStore
from fskd.store.extract import extract
from fskd.store.location import absolute_store
from fskd.verbs.evaluate import evaluate
from fskd.verbs.fit import adapt, align, distill

log = logging.getLogger(__name__)

#: ``fskd distill``'s own settings a bench grid gives among a distill method's options
BENCH_DISTILL_FIELDS = ("student", "regime", "losses", "epochs", "root", "online_teacher", "teacher_state")


def distill_fields(label: str, options: dict, protocol: str) -> tuple[dict, dict]:
    """Split a distill row's grid options into DistillConfig settings and the method's own options.
    The regime follows the protocol: base-novel students for episodes of novel classes (they never
    saw a novel label), semi students (K labels of every class) for the all-way protocol."""
    options = dict(options)
    fields = {k: options.pop(k) for k in BENCH_DISTILL_FIELDS if k in options}
    if protocol not in ("episodic", "allway"):
        raise ConfigError(
            f"{label}: distill rows run the episodic protocol (base-novel students) and the allway "
            f"protocol (semi students); got --protocol {protocol}"
        )
    fields.setdefault("regime", "base-novel" if protocol == "episodic" else "semi")
    if protocol == "episodic" and fields["regime"] != "base-novel":
        raise ConfigError(
            f"{label}: regime {fields['regime']!r} in an episodic grid: a semi student learned labels of "
            f"the novel classes, so its novel-class episodes are not a few-shot result; use base-novel"
        )
    if fields.get("teacher_state"):  # a fixed fitted state as every cell's teacher: there now, absolute for every job
        path = Path(str(fields["teacher_state"])).expanduser().absolute()
        if not (path / STATE_JSON).is_file():
            raise ConfigError(
                f"{label}: teacher_state {fields['teacher_state']} is not a state fskd adapt or align "
                f"wrote (no {path / STATE_JSON})"
            )
        fields["teacher_state"] = str(path)
    return fields, options


def check_regime(label: str, method: str, fields: dict, protocol: str) -> None:
    """A distill row whose method has no student of the regime its protocol needs (dho has no
    base-novel form) is refused before any cell, not failed in every one."""
    regimes = getattr(METHODS.get(method), "regimes", None)
    if regimes is not None and fields.get("regime") not in regimes:
        raise ConfigError(
            f"{label}: {method} distils {' or '.join(regimes)} students only; the {protocol} protocol's cells "
            f"need a {fields.get('regime')} student"
            + (" (novel-class episodes: a student that never saw a novel label)" if protocol == "episodic" else "")
            + f". Drop {label} from this grid, or run it in an allway grid"
        )


def bench_out(config, stores: list[FeatureStore], create: bool = True) -> Path:
    """The bench folder, checked: never a store, a dataset root, or a folder fskd bench did not write."""
    out = Path(config.out).expanduser().absolute()
    o = out.resolve()
    for st in stores:
        # the store, and the images it was extracted from: a bench folder in either changes it
        places = [] if st.location.is_remote else [("the store", st.path)]
        root = st.attrs["dataset"].get("root")
        if root:
            places.append((f"the dataset root of {st.path}", root))
        for what, where in places:
            p = Path(where).expanduser().resolve()
            if o == p or o.is_relative_to(p) or p.is_relative_to(o):
                raise OutputError(
                    f"--out {config.out} overlaps {what} ({where}); write the bench somewhere else "
                    f"(nothing was changed)"
                )
    if store_containing(out) is not None:
        raise OutputError(f"--out {config.out} is inside a feature store; write the bench somewhere else")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"--out {config.out} exists and is not a directory")
        if not is_bench_dir(out) and any(out.iterdir()):
            raise OutputError(
                f"--out {config.out} is a folder fskd bench did not write (no {BENCH_JSON}); give a new "
                f"or empty folder (nothing was changed)"
            )
    elif create:
        check_writable(out, "--out")
        out.mkdir(parents=True)
    return out


def same_grid(out: Path, keys: set[str], extend: bool) -> None:
    """Refuse to run a different grid in a bench folder: its tables and plots would silently become
    the new grid's. A grid that contains the folder's own may grow it with ``--extend``."""
    if not is_bench_dir(out):
        return
    try:
        old = set(json.loads((out / BENCH_JSON).read_text(encoding="utf-8")).get("cells", []))
    except (OSError, ValueError, TypeError) as e:
        raise OutputError(f"--out {out}: {BENCH_JSON} cannot be read ({e}); give a new --out") from None
    if old == keys or (extend and old <= keys):
        return
    lost, new = len(old - keys), len(keys - old)
    hint = (
        "add --extend to grow it to this grid"
        if not lost
        else "this grid lacks some of its cells, so it cannot extend it"
    )
    raise OutputError(
        f"--out {out} holds another grid ({len(old)} cells: this grid has {new} cell(s) it lacks and lacks "
        f"{lost} of its cells); write this grid to a new --out, or {hint} (`fskd bench --report {out}` "
        f"rebuilds its own tables). Nothing was changed"
    )


class LogOnce(logging.Filter):
    """Say a warning once, not once per cell (every row records it)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING and msg in self.seen:
            return False
        self.seen.add(msg)
        return True


class GridPlan:
    """A grid checked and laid out: every method and option (now, not mid-grid), every store (its
    splits, classes, encoder), the bench folder, and the cells in run order. ``create_out=False``
    (a Slurm job) checks a folder the driver made and changes nothing."""

    def __init__(self, config, create_out: bool = True) -> None:
        self.config = config
        self.fit_method = dict(config.method_pairs())  # row label -> registered method
        self.distill_split: dict[str, tuple[dict, dict]] = {}  # distill label -> (DistillConfig settings, options)
        self.chains: dict[str, Chain] = {}  # chain row label -> its stages (fskd.bench.chains)
        check_chain_names(config)
        for label, m in self.fit_method.items():
            if is_chain(m, config):
                chain = self.chains[label] = resolve_chain(label, m, config, distill_fields)
                student = chain.stage(STUDENT)
                self.distill_split[label] = (student.fields, student.options)  # the student's images are checked
                DistillConfig.from_dict({"store": "-", "method": student.method, **student.fields})
                check_regime(label, student.method, student.fields, config.protocol)
                continue
            try:
                cls = METHODS.get(m)  # an unknown name lists the valid ones
            except RegistryError as e:
                if m in METHODS.names():  # a declared method that failed to load: its own error
                    raise
                raise RegistryError(f"{e}; or a chain: {', '.join(chain_names(config))}") from None
            if cls.kind not in ("adapt", "align", "distill"):
                kinds = methods_of_kind("adapt") + methods_of_kind("align") + methods_of_kind("distill")
                raise ConfigError(
                    f"fskd bench runs adapt, align and distill methods; {m!r} is a {cls.kind} method "
                    f"(methods: {', '.join(sorted(kinds))})"
                )
            options = dict(config.options.get(label, {}))
            if cls.kind == "distill":
                fields, options = self.distill_split[label] = distill_fields(label, options, config.protocol)
                DistillConfig.from_dict({"store": "-", "method": m, **fields})  # ill-typed settings: now
                check_regime(label, m, fields, config.protocol)
            if cls.options is not None:
                cls.options.from_dict(options)  # unknown or ill-typed options: now, not mid-grid
        self.transfer = config.protocol in TRANSFER_PROTOCOLS
        self.episodic = config.protocol == "episodic"
        if self.transfer and len(config.stores) < 2:
            raise ConfigError(
                f"--protocol {config.protocol} takes the source store first, then one or more target "
                f"stores (--stores source.zarr,target1.zarr,...); got {len(config.stores)} store"
            )
        self.stores: list[FeatureStore] = []
        for i, path in enumerate(config.stores):
            self.stores.append(self._open(i, path))
        names = [st.attrs["dataset"]["name"] for st in self.stores]
        labels = [
            n if names.count(n) == 1 else Path(st.path).name.removesuffix(".zarr")
            for n, st in zip(names, self.stores, strict=True)
        ]
        if self.transfer:
            labels[0] += SOURCE_TAG
        self.out = bench_out(config, self.stores, create=create_out)
        src_fp = self.stores[0].fingerprint if self.transfer else ""
        pairs = list(zip(self.stores, labels, strict=True))
        order = (
            [
                (st, label, m, h, k, s)
                for m in self.fit_method
                for h in config.hp_selection
                for k in config.shots
                for s in config.seeds
                for st, label in pairs
            ]
            if self.transfer
            # one fit, every target in a row
            else [
                (st, label, m, h, k, s)
                for st, label in pairs
                for m in self.fit_method
                for h in config.hp_selection
                for k in config.shots
                for s in config.seeds
            ]
        )
        setting = (
            json.dumps(
                {
                    "way": config.way,
                    "query": config.query,
                    "episodes": config.episodes,
                    "episode_seed": config.episode_seed,
                    "class_ratio": config.class_ratio,
                }
            )
            if self.episodic
            else ""
        )
        self.cells = [
            Cell(
                absolute_store(st.path),
                st.fingerprint,
                label,
                m,
                k,
                s,
                config.protocol,
                h,
                self._cell_options(m),
                src_fp,
                setting,
                self.fit_method[m] if self.fit_method[m] != m else "",
                self.chains[m].text() if m in self.chains else "",
                json.dumps(list(config.transductive)) if config.transductive else "",
            )
            for st, label, m, h, k, s in order
        ]
        self.keys = {c.key for c in self.cells}
        self.by_path = {absolute_store(st.path): st for st in self.stores}
        self.fit_store = {p: (absolute_store(self.stores[0].path) if self.transfer else p) for p in self.by_path}
        self.min_train = {
            p: int(np.bincount(st.labels("train")[st.labels("train") >= 0]).min())
            for p, st in self.by_path.items()
            if st.has_split("train")
        }

    def _cell_options(self, label: str) -> str:
        """A row's options as its cells record them (a chain's: per stage, ``STAGE.KEY`` keys nested)."""
        chain, options = self.chains.get(label), self.config.options.get(label, {})
        if chain is not None:
            options = stage_options(label, options, [s.label for s in chain.stages])
        return json.dumps(options, sort_keys=True)

    def _open(self, i: int, path: str) -> FeatureStore:
        config = self.config
        st = FeatureStore.open(path)
        st.check_complete()
        for s in ("train", "test") if not self.transfer or i == 0 else ("test",):
            if not st.has_split(s):
                raise EvaluationError(
                    f"fskd bench ({config.protocol}) needs a {s!r} sample split; {st.path} has {st.splits}"
                )
        if config.protocol == "domain-shift" and i:
            unknown = sorted(set(st.class_keys) - set(self.stores[0].class_keys))
            if unknown:
                raise ConfigError(
                    f"--protocol domain-shift maps classes by key: {len(unknown)} class(es) of {st.path} "
                    f"are not classes of the source {self.stores[0].path}: "
                    f"{', '.join(map(repr, unknown[:5]))}"
                )
        if self.distill_split:  # a student trains on the store's images and encodes them: they must be there
            from fskd.methods.distill.data import dataset_of

            dataset_of(st, next((f["root"] for f, _ in self.distill_split.values() if f.get("root")), None))
        if self.transfer and i and st.encoder_spec != self.stores[0].encoder_spec:
            raise ConfigError(
                f"--protocol {config.protocol}: target {st.path} holds {st.encoder_spec!r} features, "
                f"the source {self.stores[0].path} {self.stores[0].encoder_spec!r}; every store needs "
                f"the same encoder"
            )
        return st

    def meta(self, versions: dict) -> dict:
        """``bench.json``: the format marker, the grid, its cells, when it ran, the versions."""
        return {
            "format": BENCH_FORMAT,
            "config": self.config.to_dict(),
            "cells": [c.key for c in self.cells],
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions,
        }

    def fit_group(self, cell: Cell) -> tuple:
        """Cells sharing one fit (a transfer grid's targets of one state) run in one job, in order."""
        return (self.fit_store[cell.store], cell.method, cell.shots, cell.seed, cell.options)


class CellRunner:
    """Runs the plan's cells one at a time: fit the cell's method on its store, evaluate the
    cell's protocol, return its result row (a chain row: each stage in turn, :func:`run_chain`).
    ``tmp_state`` and ``tmp_student``: folders of this runner's own for the cell's state and a
    distilled student's store, with a chain's teacher and head states (removed after each cell
    unless --keep-states)."""

    def __init__(self, plan: GridPlan, tmp_state: Path, tmp_student: Path) -> None:
        self.plan = plan
        self.tmp_state, self.tmp_student = tmp_state, tmp_student
        self.fitted: dict = {}  # the last fit: (store, method, K, seed, options) -> FitResult, reused across targets

    def clear_scratch(self) -> None:
        """Remove this runner's scratch state and student store (written by it, nothing else)."""
        for p in (self.tmp_state, self.tmp_student):
            if p.exists():
                shutil.rmtree(p)

    def _fit(self, cell: Cell, store_path: str, state_dir: Path):
        plan = self.plan
        key = (store_path, cell.method, cell.hp_selection, cell.shots, cell.seed, cell.options)
        if self.fitted.get("key") == key and state_dir.exists():
            return self.fitted["fit"]
        self.fitted.clear()
        fields, options = plan.distill_split.get(cell.method, ({}, json.loads(cell.options)))
        fit = self.fit_stage(cell, cell.fit_method or cell.method, options, store_path, state_dir, fields)
        self.fitted.update(key=key, fit=fit)
        return fit

    def fit_stage(
        self, cell: Cell, name: str, options: dict, store_path: str, state_dir: Path, fields: dict | None = None
    ):
        """Fit the method ``name`` with ``options`` on ``store_path`` into ``state_dir`` for the cell's
        shots, seed, hyper-parameter selection and class split (a distill method: with the DistillConfig
        settings ``fields``). A row's fit, or one stage of a chain row's."""
        plan, config = self.plan, self.plan.config
        cls = METHODS.get(name)
        options = dict(options)
        if "regime" in getattr(cls.options, "__dataclass_fields__", {}) and "regime" not in options:
            # a method with regimes fits only the part the cell scores (fma fits all-way when given K
            # shots; coop fits both by default)
            if plan.episodic:
                options["regime"] = "episodic"
            elif config.protocol == "allway":
                options["regime"] = "allway"
        kw = dict(
            store=store_path,
            method=name,
            shots=cell.shots,
            seed=cell.seed,
            out=str(state_dir),
            device=config.device,
            options=options,
            force=True,
            hp_selection=cell.hp_selection,
            base_to_new=cell.protocol == "base-to-new",
        )
        if plan.episodic and config.class_ratio is not None:
            kw.update(class_ratio=config.class_ratio, split_seed=cell.seed)
        if cls.kind == "distill":
            return distill(DistillConfig(**kw, **(fields or {})))
        return adapt(AdaptConfig(**kw)) if cls.kind == "adapt" else align(AlignConfig(**kw))

    def _student_store(self, teacher: FeatureStore, state_dir: Path, path: Path, root: str | None) -> dict:
        """Extract the teacher store's dataset with the student of ``state_dir`` into ``path`` (the same
        images, sample split and class text as the teacher store); returns the row's extract fields."""
        from fskd.fsutil import is_store_dir

        if path.exists():  # a student store of an earlier run of this bench: extract would reuse its other weights
            if not is_store_dir(path):
                raise OutputError(
                    f"{path} exists and is not a feature store fskd wrote; the bench writes the student "
                    f"store there (nothing was changed)"
                )
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        src = {k: v for k, v in teacher.attrs.get("config", {}).items() if k in ExtractConfig.__dataclass_fields__}
        if not src.get("dataset") or src.get("dataset") == "arrays":
            raise StoreError(
                f"{teacher.path} was not extracted from an image dataset; a distilled student is scored "
                f"on the same images encoded by the student"
            )
        src.update(
            encoder=f"student:{state_dir}",
            store=str(path),
            device=self.plan.config.device,
            augment_views=0,
            augment_shots=0,
            download=False,
            **({"root": root} if root else {}),
        )  # root: the images moved
        t0 = time.perf_counter()
        r = extract(ExtractConfig.from_dict(src))
        return {"extract_seconds": round(time.perf_counter() - t0, 3), "student_images_per_s": r.images_per_s}

    def run(self, cell: Cell) -> dict:
        """The cell's status and results (ok, n/a with why, or failed with the error)."""
        import torch

        plan, config = self.plan, self.plan.config
        src_path = plan.fit_store[cell.store]
        src, st = plan.by_path[src_path], plan.by_path[cell.store]
        chain = plan.chains.get(cell.method)  # a chain row: its stages run in turn, the last one is scored
        cls = METHODS.get(chain.stages[-1].method if chain else cell.fit_method or cell.method)
        needs_text = any(METHODS.get(s.method).needs_text for s in chain.stages) if chain else cls.needs_text
        if needs_text and not src.attrs["text"].get("available"):
            return {
                "status": "n/a",
                "message": f"{cell.method} needs class text features; {src.path} has none "
                f"(encoder {src.encoder_spec} has no text tower)",
            }
        if cell.protocol == "base-to-new" and st.num_classes < 2:
            return {"status": "n/a", "message": f"base-to-new needs at least 2 classes; {st.path} has {st.num_classes}"}
        if cell.shots > plan.min_train[src_path]:
            return {
                "status": "n/a",
                "message": f"{cell.shots} shots: the smallest class of {Path(src_path).name} "
                f"has {plan.min_train[src_path]} train rows",
            }
        target = plan.transfer and cell.store != src_path
        if target and cell.protocol == "cross-dataset":
            if not cls.transfers_to_new_classes:
                return {"status": "n/a", "message": f"{cell.method} cannot classify classes it has no shot of"}
            if not st.attrs["text"].get("available"):
                return {"status": "n/a", "message": f"{st.path} has no class text features to transfer through"}
        state_dir = (
            plan.out
            / "states"
            / Path(src_path).name.removesuffix(".zarr")
            / cell.method
            / f"{cell.shots}shot-seed{cell.seed}"
            if config.keep_states
            else self.tmp_state
        )
        protocol = cell.protocol if target or not plan.transfer else "allway"
        eval_store, extra = cell.store, {}
        # distill: the student's features (not directly in OUT, which the driver holds locked: extract locks
        # the store's parent folder)
        student_store = (
            state_dir.with_name(state_dir.name + ".zarr") if config.keep_states else self.tmp_student / "student.zarr"
        )
        try:
            if chain is not None:  # the scored state: the head's, fitted on the student's store
                fit, eval_store, state_dir, extra = run_chain(self, cell, chain, src_path, state_dir, student_store)
            else:
                fit = self._fit(cell, src_path, state_dir)
            if chain is None and cls.kind == "distill":
                extra = self._student_store(
                    st, state_dir, student_store, plan.distill_split[cell.method][0].get("root")
                )
                eval_store = str(student_store)
            how = (
                dict(
                    protocol="episodic",
                    way=config.way,
                    query=config.query,
                    episodes=config.episodes,
                    seed=config.episode_seed,
                )  # the state's own class split (eval reads it from the state)
                if plan.episodic
                else dict(protocol=protocol, seeds=(cell.seed,))
            )
            ev = evaluate(
                EvalConfig(store=eval_store, state=str(state_dir), shots=cell.shots, device=config.device, **how)
            )
            transductive = {}
            for setting in json.loads(cell.transductive or "[]"):  # the same state, its test rows classified jointly
                batch, active = transductive_setting(setting)
                tr = evaluate(
                    EvalConfig(
                        store=eval_store,
                        state=str(state_dir),
                        shots=cell.shots,
                        device=config.device,
                        transductive=True,
                        batch=batch,
                        active_classes=active,
                        **how,
                    )
                )
                transductive[setting] = {
                    "accuracy": tr.accuracy,
                    "top5": tr.top5,
                    "mean_per_class": tr.mean_per_class,
                    **({"base": tr.base, "new": tr.new, "hm": tr.hm} if cell.protocol == "base-to-new" else {}),
                    "eval_seconds": tr.eval_seconds,
                    "setting": tr.transductive_setting,
                    "shot_weight": tr.shot_weight,
                }
        except FskdError as e:
            for p in dict.fromkeys((src_path, cell.store)):  # a store gone mid-grid fails every later cell: stop
                if not plan.by_path[p].location.exists():
                    raise StoreError(
                        f"feature store {p} was removed while fskd bench ran; the finished cells are "
                        f"kept in {plan.out / RESULTS}: put the store back and run the same fskd bench "
                        f"to go on"
                    ) from None
            return {"status": "failed", "message": f"{type(e).__name__}: {e}"}
        finally:
            if not plan.transfer and not config.keep_states:
                self.clear_scratch()
        b2n = cell.protocol == "base-to-new"
        return {
            "status": "ok",
            "accuracy": ev.accuracy,
            "top5": ev.top5,
            "mean_per_class": ev.mean_per_class,
            **({"ece": ev.ece, "nll": ev.nll} if ev.ece is not None else {}),
            **({"base": ev.base, "new": ev.new, "hm": ev.hm} if b2n else {}),
            **({"ci95_episodes": ev.ci95, "class_split": fit.hparams.get("class_split")} if plan.episodic else {}),
            "classes": ev.classes,
            "hparams": fit.hparams,
            "selected_on": fit.selected_on,
            "val_task": {k: v for k, v in fit.metrics.items() if k.endswith("val_task")},
            **({"teacher": teacher_metrics(fit.metrics)} if teacher_metrics(fit.metrics) else {}),
            "fit_seconds": fit.seconds,
            "eval_seconds": ev.eval_seconds,
            **({"transductive": transductive} if transductive else {}),
            **extra,
            "warnings": fit.warnings + ev.warnings,
            "encoder": ev.encoder,
            "state": str(state_dir) if config.keep_states else None,
            "versions": {"fskd": __version__, "torch": torch.__version__},
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
