"""``fskd bench``: read a grid file, run its cells (here or as Slurm jobs) into ``OUT/results.jsonl``,
then rebuild the tables and plots; ``fskd bench --report OUT`` rebuilds them alone."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from fskd.config import BenchConfig
from fskd.errors import ConfigError, OutputError
from fskd.store.location import configure as configure_storage

log = logging.getLogger(__name__)


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


def run(config: BenchConfig, progress=None) -> BenchResult:
    """Run a benchmark grid (``fskd bench``): every (store, method, shots, seed) cell is fitted
    and evaluated once (all-way, base-to-new, transfer or episodic; a distill row's student is
    scored on the store's images encoded by it), its row appended to ``OUT/results.jsonl``; a rerun
    skips finished cells. Then the tables and plots are rebuilt (:mod:`fskd.reports.bench`).
    ``progress``: "auto" (a bar over cells with an ETA on a terminal), None, or
    ``callable(done, total, cell_label)``. The cells run here, or as Slurm jobs with
    ``config.executor == "slurm"`` (:mod:`fskd.bench.slurm`)."""
    from fskd.bench.runner import CellRunner, GridPlan, LogOnce, same_grid
    from fskd.fsutil import atomic_write_text, dir_lock
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

                counts = run_slurm(plan, results, job, progress)
            else:
                # a fit's scratch state, a distill cell's student store
                runner = CellRunner(plan, out / f".cell-state-{os.getpid()}", out / f".cell-student-{os.getpid()}")
                runner.clear_scratch()
                try:
                    counts = run_grid(plan.cells, results, runner.run, progress)
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


def job(config: dict, keys: list[str], scratch: str, storage: dict | None = None) -> dict:
    """A Slurm job of ``fskd bench --executor slurm``: run the grid's cells ``keys`` with the same
    code as a local run, each row written to ``OUT/cells/`` as it finishes (see :mod:`fskd.bench.slurm`).
    ``storage``: the driver's ``--storage-options``."""
    from fskd.bench.slurm import run_job

    if storage is not None:
        configure_storage(storage)
    return run_job(BenchConfig.from_dict(config), keys, Path(scratch))


def report(out: str) -> list[str]:
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

    d = Path(out)
    if not is_bench_dir(d):
        raise OutputError(f"--report {out} is not a folder written by fskd bench (no {BENCH_JSON})")
    config, cells = check_meta(json.loads((d / BENCH_JSON).read_text(encoding="utf-8")), d / BENCH_JSON)
    rows = Results(d).rows
    check_rows(rows, d / RESULTS)
    from fskd.bench.slurm import unmerged_rows

    rows = rows + unmerged_rows(d, rows)  # cells Slurm jobs finished since the driver last merged (read only)
    return [str(p) for p in write_outputs(d, rows, config, cells)]
