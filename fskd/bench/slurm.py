"""``fskd bench --executor slurm``: the grid's cells as Slurm jobs, submitted through submitit.

Each job runs its cells with the code of a local run (:class:`fskd.bench.runner.CellRunner`) and
writes each cell's row, as it finishes, to a file of its own (atomically, on the shared folder
``--out`` points at). The driver, the one writer of ``results.jsonl``, appends those rows as they
appear, shows the jobs' states (queued / running / done / failed), and builds the tables when every
job has ended. A rerun submits only the cells without a result and waits for jobs of an earlier
run that are still queued or running instead of submitting their cells again.

```
OUT/
  cells/<id>.json        one finished cell's row (the job that ran it wrote it)
  slurm/jobs.json        the jobs this bench submitted: id, cells, log (the driver's record)
  slurm/logs/            submitit's files per job: %j_0_log.out / .err, the pickled call and result
  slurm/scratch/<job>/   a job's cell state and student store while it runs (removed after it)
```

Job states come from ``squeue`` (no accounting database needed); a job gone from the queue has
ended, and its outcome is its cells' files (and, when it raised, the error its log ends with).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from fskd.bench.runner import CellRunner, GridPlan
from fskd.errors import ConfigError, OutputError
from fskd.fsutil import atomic_write_text, fault_point, read_small_file
from fskd.reports.bench import Cell, Results, cell_row
from fskd.reports.summary import FAILED, NA, OK

log = logging.getLogger(__name__)
say = logging.getLogger("fskd.progress")

CELLS = "cells"
SLURM = "slurm"
JOBS = "jobs.json"
#: squeue states of a job that has not ended
QUEUED = {
    "PENDING",
    "CONFIGURING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESV_DEL_HOLD",
    "SUSPENDED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
}
RUNNING = {"RUNNING", "COMPLETING"}
#: minutes a job may run when ``--slurm time=`` is not given
DEFAULT_TIME = 60
#: the longest a cell file may be (a row is a few kB)
CELL_FILE_LIMIT = 8 << 20


def cell_path(out: Path, key: str) -> Path:
    return Path(out) / CELLS / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def read_cells(out: Path) -> list[dict]:
    """The rows in ``OUT/cells`` (a file that cannot be read is named and left for a rerun)."""
    rows = []
    folder = Path(out) / CELLS
    if not folder.is_dir():
        return rows
    for p in sorted(folder.glob("*.json")):
        try:
            row = json.loads(read_small_file(p, "cell file", CELL_FILE_LIMIT, what="cell row", error=OutputError))
        except (OutputError, ValueError) as e:
            log.warning("%s cannot be read (%s); its cell is run again", p, e)
            continue
        if isinstance(row, dict) and isinstance(row.get("key"), str) and row.get("status") in (OK, NA, FAILED):
            rows.append(row)
        else:
            log.warning("%s is not a cell row; its cell is run again", p)
    return rows


def _ident(row: dict) -> tuple:
    return row.get("key"), row.get("finished"), json.dumps(row.get("slurm"), sort_keys=True)


def unmerged_rows(out: Path, rows: list[dict]) -> list[dict]:
    """The rows of ``OUT/cells`` that ``rows`` (``results.jsonl``'s) do not hold yet."""
    have = {_ident(r) for r in rows}
    return [r for r in read_cells(out) if _ident(r) not in have]


def merge_cells(out: Path, results: Results) -> list[dict]:
    """Append to ``results.jsonl`` the rows of ``OUT/cells`` it does not hold yet; returns them."""
    new = unmerged_rows(out, results.rows)
    for row in new:
        results.append(row)
    return new


def job_tag() -> str:
    """This job's id as Slurm and submitit name it (``123_4`` in an array), else host-pid."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or f"{socket.gethostname()}-{os.getpid()}"


def run_job(config, keys: list[str], scratch: Path) -> dict:
    """A job's body: run the grid's cells ``keys`` in grid order, each row written to its cell file
    as it finishes. Cells with a file of an earlier attempt of this job are not run again."""
    import torch

    if not logging.getLogger("fskd").handlers:  # the job's log (submitit's .err file) says each cell
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logging.getLogger("fskd").addHandler(h)
        logging.getLogger("fskd").setLevel(logging.INFO)
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit():  # task/none binds nothing: use the CPUs the job asked for, not the node's
        torch.set_num_threads(int(cpus))
    tag = job_tag()
    plan = GridPlan(config, create_out=False)
    wanted = set(keys)
    cells = [c for c in plan.cells if c.key in wanted]
    missing = wanted - {c.key for c in cells}
    if missing:
        raise ConfigError(f"slurm job {tag}: {len(missing)} cell(s) are not cells of the grid in {plan.out}")
    own = Path(scratch) / tag
    runner = CellRunner(plan, own / "state", own / "student")
    counts = {OK: 0, NA: 0, FAILED: 0, "skipped": 0}
    try:
        for i, cell in enumerate(cells):
            path = cell_path(plan.out, cell.key)
            if path.exists():
                counts["skipped"] += 1
                continue
            t0 = time.perf_counter()
            row = cell_row(cell, runner.run(cell))
            row.setdefault("finished", datetime.now(timezone.utc).isoformat(timespec="seconds"))
            row["slurm"] = {"job": tag, "host": socket.gethostname()}
            path.parent.mkdir(exist_ok=True)
            atomic_write_text(path, json.dumps(row, sort_keys=True))
            counts[row["status"]] += 1
            say.info(
                "cell %d/%d %s: %s in %.1f s",
                i + 1,
                len(cells),
                cell.label(),
                f"{row['accuracy']:.2f}%" if row["status"] == OK else row["status"],
                time.perf_counter() - t0,
            )
            fault_point(f"bench-job:cell-{i + 1}")  # tests kill a job after its i-th cell
    finally:
        runner.clear_scratch()
        shutil.rmtree(own, ignore_errors=True)
    return counts


def queue_states() -> dict[str, str]:
    """State of every job of this user in Slurm's queue, by id (array tasks as ``123_4``)."""
    try:
        r = subprocess.run(["squeue", "--me", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ConfigError("--executor slurm needs Slurm's commands (squeue, sbatch) on this machine's PATH") from None
    except subprocess.TimeoutExpired:
        raise OSError("squeue did not answer in 60 s") from None
    if r.returncode:
        raise OSError(f"squeue failed: {r.stderr.strip() or r.returncode}")
    out = {}
    for line in r.stdout.splitlines():
        jid, _, state = line.strip().partition("|")
        if jid:
            out[jid] = state.split()[0] if state else ""
    return out


def _executor(plan: GridPlan, folder: Path):
    try:
        import submitit
    except ImportError:
        raise ConfigError("--executor slurm needs submitit: pip install 'fskd[slurm]'") from None
    s = dict(plan.config.slurm)
    ex = submitit.SlurmExecutor(folder=str(folder), python=s.pop("python", None))
    extra = {k: s.pop(k) for k in ("account", "qos", "constraint") if k in s}
    ex.update_parameters(
        job_name="fskd-bench",
        time=s.pop("time", DEFAULT_TIME),
        **{"partition": s.pop("partition")} if "partition" in s else {},
        **{"cpus_per_task": s.pop("cpus")} if "cpus" in s else {},
        **{"gpus_per_node": s.pop("gpus")} if "gpus" in s else {},
        **{"mem": s.pop("mem")} if "mem" in s else {},
        **extra,
    )
    return ex


def _jobs_of(cells: list[Cell], plan: GridPlan) -> list[list[Cell]]:
    """The cells to run, packed into jobs of ``--cells-per-job`` cells in grid order; a transfer
    grid's cells of one fit (every target of one state) stay in one job."""
    units: list[list[Cell]] = []
    for c in cells:
        if units and plan.transfer and plan.fit_group(units[-1][-1]) == plan.fit_group(c):
            units[-1].append(c)
        else:
            units.append([c])
    jobs: list[list[Cell]] = []
    for u in units:
        if jobs and len(jobs[-1]) < plan.config.cells_per_job:
            jobs[-1].extend(u)
        else:
            jobs.append(list(u))
    return jobs


class _Record:
    """``OUT/slurm/jobs.json``: every job this bench submitted, kept across runs."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / JOBS
        self.jobs: list[dict] = []
        if self.path.exists():
            try:
                data = json.loads(read_small_file(self.path, "slurm job record", 64 << 20, error=OutputError))
                self.jobs = [j for j in data.get("jobs", []) if isinstance(j, dict) and "id" in j]
            except (OutputError, ValueError, AttributeError) as e:
                log.warning("%s cannot be read (%s): jobs of an earlier run are not waited for", self.path, e)

    def add(self, jobs: list[dict]) -> None:
        self.jobs += jobs
        atomic_write_text(self.path, json.dumps({"jobs": self.jobs}, indent=1))


def run_slurm(plan: GridPlan, results: Results, job_fn: Callable, progress=None, poll: float | None = None) -> dict:
    """Run the grid's unfinished cells as Slurm jobs (the driver; see the module's docstring).
    ``job_fn(config_dict, keys, scratch, storage_options)`` is a job's body, pickled by reference. Returns the counts
    of a local run plus ``jobs`` (submitted now) and ``waited`` (jobs of an earlier run)."""
    out = plan.out
    folder = out / SLURM
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    (out / CELLS).mkdir(exist_ok=True)
    poll = float(os.environ.get("FSKD_SLURM_POLL", 5.0)) if poll is None else poll
    merge_cells(out, results)  # rows of jobs that ended after an earlier driver stopped (--detach, a kill)
    done = results.done()
    record = _Record(folder)
    states = queue_states()
    alive = [
        j for j in record.jobs if states.get(j["id"], "") in QUEUED | RUNNING and any(k not in done for k in j["cells"])
    ]
    in_flight = {k for j in alive for k in j["cells"]}
    todo = [c for c in plan.cells if c.key not in done and c.key not in in_flight]
    counts = {
        "skipped": sum(c.key in done for c in plan.cells),
        OK: 0,
        NA: 0,
        FAILED: 0,
        "jobs": 0,
        "waited": len(alive),
    }
    submitted: list = []
    if todo:
        ex = _executor(plan, folder / "logs")
        groups = _jobs_of(todo, plan)
        cfg = plan.config.to_dict()
        from fskd.store.location import configured

        storage = configured()  # --storage-options of this command: the jobs open the same stores with them
        with ex.batch():
            for g in groups:
                submitted.append(ex.submit(job_fn, cfg, [c.key for c in g], str(folder / "scratch"), storage))
        mine = [
            {
                "id": j.job_id,
                "cells": [c.key for c in g],
                "log": str(j.paths.stderr),
                "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            for j, g in zip(submitted, groups, strict=True)
        ]
        record.add(mine)
        counts["jobs"] = len(mine)
        say.info(
            "submitted %d Slurm job(s) for %d cell(s) (%d per job); logs in %s",
            len(mine),
            len(todo),
            plan.config.cells_per_job,
            folder / "logs",
        )
    else:
        mine = []
    watched = alive + mine
    if plan.config.detach or not watched:
        if watched:
            say.info(
                "detached: %d job(s) go on; run the same fskd bench again, or `fskd bench --report %s`, to "
                "collect their cells",
                len(watched),
                out,
            )
        return counts
    try:
        _wait(plan, results, watched, counts, progress, poll, len(todo) + len(in_flight))
    except KeyboardInterrupt:
        if submitted:
            say.warning("interrupted: cancelling the %d Slurm job(s) this run submitted", len(submitted))
            _cancel([j["id"] for j in mine])
        raise
    return counts


def _cancel(ids: list[str]) -> None:
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


def _error_line(log: Path, tail: int = 1 << 16) -> str | None:
    """The last line naming an error in the last ``tail`` bytes of a job's log (submitit writes the
    traceback of a job that raised there), else None."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    hits = [x.strip() for x in lines if "Error" in x or "Exception" in x]
    return hits[-1] if hits else None


def _ended_message(job: dict, cell: Cell) -> str:
    """Why a cell of an ended job has no row: the error its log ends with, or that it was killed,
    cancelled, timed out or preempted; with the log's path."""
    error = _error_line(Path(job["log"]))
    why = f"it raised {error}" if error else "it was killed, cancelled, timed out or preempted, or its node failed"
    return f"slurm job {job['id']} ended before cell {cell.label()} finished: {why}; its log: {job['log']}"


def _wait(
    plan: GridPlan, results: Results, watched: list[dict], counts: dict, progress, poll: float, total: int
) -> None:
    by_key = {c.key: c for c in plan.cells}
    pending = {j["id"]: j for j in watched}
    finished = 0
    said = ""
    failures = 0
    if progress:
        progress(0, total, "")
    while pending:
        for row in merge_cells(plan.out, results):
            if row["key"] in by_key:
                finished += 1
                counts[row["status"]] += 1
                if progress:
                    c = by_key[row["key"]]
                    result = f"{row['accuracy']:.2f}%" if row["status"] == OK else row["status"]
                    progress(finished, total, f"{c.label()}: {result} (job {row.get('slurm', {}).get('job')})")
        try:
            states = queue_states()
            failures = 0
        except OSError as e:  # a busy controller: try again, up to ~10 minutes
            failures += 1
            if failures * poll > 600:
                raise
            log.warning("%s; trying again", e)
            time.sleep(poll)
            continue
        ended = [jid for jid in pending if jid not in states or states[jid] not in QUEUED | RUNNING]
        if ended:
            for row in merge_cells(plan.out, results):  # the last rows an ended job wrote
                if row["key"] in by_key:
                    finished += 1
                    counts[row["status"]] += 1
            done = results.done()
            for jid in ended:
                job = pending.pop(jid)
                shutil.rmtree(plan.out / SLURM / "scratch" / jid, ignore_errors=True)
                lost = [by_key[k] for k in job["cells"] if k in by_key and k not in done]
                for c in lost:
                    row = cell_row(
                        c,
                        {
                            "status": FAILED,
                            "message": _ended_message(job, c),
                            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "slurm": {"job": jid},
                        },
                    )
                    results.append(row)
                    counts[FAILED] += 1
                    finished += 1
                    log.warning("bench cell %s failed: %s", c.label(), row["message"])
                if lost and progress:
                    progress(finished, total, f"job {jid} failed")
        queued = sum(states.get(j) in QUEUED for j in pending)
        running = sum(states.get(j) in RUNNING for j in pending)
        line = (
            f"slurm jobs: {queued} queued, {running} running, {len(watched) - len(pending)} ended; cells "
            f"{finished}/{total} ({counts[FAILED]} failed)"
        )
        if line != said:
            say.info("%s", line)
            said = line
        if pending:
            time.sleep(poll)
