"""``fskd bench --executor slurm`` on a real one-node Slurm cluster (slurmctld + slurmd + munge on
127.0.0.1, started in a temporary folder by :mod:`tests.slurm_cluster`): the table equals a local
run's byte for byte; a killed job names its cells and a rerun submits only those; Ctrl-C in the
driver cancels its own jobs and nothing else; --detach and a rerun that waits for the jobs of the
earlier run. Without Slurm the cluster tests skip with the reason, except under CI=true."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fskd import api
from fskd.cli import app
from fskd.config import BenchConfig
from fskd.errors import ConfigError
from fskd.store.synthetic import make_synthetic_store

from .slurm_cluster import SlurmCluster, slurm_available

runner = CliRunner()
TABLES = ("table.md", "table.csv", "table.tex")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = slurm_available()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Slurm cannot start here ({why}); CI must run the Slurm tests (.ci/install-slurm)")
        pytest.skip(f"Slurm cannot start here: {why}")
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture()
def slurm_env(cluster, monkeypatch):
    """The driver (this process) and its jobs (which inherit its environment) talk to the cluster."""
    for k, v in cluster.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FSKD_SLURM_POLL", "0.5")
    return cluster


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm-stores")
    a = make_synthetic_store(d / "a.zarr", n_classes=8, joint=True, seed=0)
    b = make_synthetic_store(d / "b.zarr", n_classes=6, joint=True, seed=4)
    return str(a.path), str(b.path)


@pytest.fixture(scope="module")
def local(stores, tmp_path_factory) -> Path:
    """The grid run locally: the tables every Slurm run must equal."""
    out = tmp_path_factory.mktemp("local") / "b"
    api.bench(grid(stores, out), progress=None)
    return out


def grid(stores, out: Path, **kw) -> BenchConfig:
    return BenchConfig(
        stores=stores,
        methods=("prototype", "linear-probe", "zero-shot"),
        shots=(1, 2),
        seeds=(1, 2),
        out=str(out),
        baseline="prototype",
        device="cpu",
        **kw,
    )


def queue() -> dict[str, str]:
    r = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, check=True)
    return dict(line.split("|") for line in r.stdout.split())


def wait_for(cond, timeout: float = 60.0, what: str = "") -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def test_slurm_grid_equals_a_local_run(slurm_env, stores, local, tmp_path):
    r = api.bench(grid(stores, tmp_path / "slurm", executor="slurm", cells_per_job=5), progress=None)
    assert r.cells == 24 and r.counts["jobs"] == 5 and r.counts["failed"] == 0
    assert r.counts["ok"] == sum(json.loads(x)["status"] == "ok" for x in (local / "results.jsonl").open())
    for name in TABLES:
        assert (tmp_path / "slurm" / name).read_bytes() == (local / name).read_bytes(), name
    rows = [json.loads(x) for x in (tmp_path / "slurm" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and len({r["key"] for r in rows}) == 24
    jobs = json.loads((tmp_path / "slurm" / "slurm" / "jobs.json").read_text())["jobs"]
    assert sorted(r["slurm"]["job"] for r in rows) == sorted(j["id"] for j in jobs for _ in j["cells"])
    assert len(list((tmp_path / "slurm" / "cells").glob("*.json"))) == 24
    assert not list((tmp_path / "slurm" / "slurm" / "scratch").glob("*"))  # every job's scratch removed
    # a rerun has nothing to submit
    again = api.bench(grid(stores, tmp_path / "slurm", executor="slurm", cells_per_job=5), progress=None)
    assert again.counts["skipped"] == 24 and again.counts["jobs"] == 0


def test_a_killed_job_names_its_cells_and_a_rerun_submits_only_those(slurm_env, stores, local, tmp_path, monkeypatch):
    out = tmp_path / "k"
    monkeypatch.setenv("FSKD_FAULT", "bench-job:cell-2")  # every job is SIGKILLed after its second cell
    r = api.bench(grid(stores, out, executor="slurm", cells_per_job=4), progress=None)
    assert r.counts["jobs"] == 6 and r.counts["ok"] + r.counts["n/a"] == 12 and r.counts["failed"] == 12
    assert len(r.failed) == 12
    log = r.failed[0].split("its log: ")[1]
    assert "before cell" in r.failed[0] and log.endswith("_log.err") and Path(log).exists()
    monkeypatch.delenv("FSKD_FAULT")
    again = api.bench(grid(stores, out, executor="slurm", cells_per_job=4), progress=None)
    assert again.counts["skipped"] == 12 and again.counts["jobs"] == 3 and again.counts["failed"] == 0
    for name in TABLES:
        assert (out / name).read_bytes() == (local / name).read_bytes(), name


def _occupy_node(cluster) -> str:
    """A job of someone else holding every CPU of the node, so the bench's jobs stay queued."""
    cpus = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, check=True).stdout.split()[0]
    r = subprocess.run(
        ["sbatch", "--parsable", "-c", cpus, "-J", "someone-else", "-o", "/dev/null", "--wrap", "sleep 300"],
        capture_output=True,
        text=True,
        check=True,
    )
    jid = r.stdout.strip().split(";")[0]
    wait_for(lambda: queue().get(jid) == "RUNNING", what="the other job to run")
    return jid


def test_ctrl_c_cancels_the_jobs_it_submitted_and_only_those(slurm_env, stores, tmp_path):
    other = _occupy_node(slurm_env)
    try:
        out = tmp_path / "c"
        cmd = [
            sys.executable,
            "-m",
            "fskd",
            "bench",
            "--stores",
            ",".join(stores),
            "--methods",
            "prototype",
            "--shots",
            "1",
            "--seeds",
            "1,2",
            "--out",
            str(out),
            "--executor",
            "slurm",
            "--device",
            "cpu",
        ]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)
        record = out / "slurm" / "jobs.json"
        wait_for(record.exists, what="the driver to submit")
        ids = [j["id"] for j in json.loads(record.read_text())["jobs"]]
        assert len(ids) == 4 and all(queue().get(i) == "PENDING" for i in ids)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130, err
        assert "cancelling the 4 Slurm job(s) this run submitted" in err
        wait_for(lambda: not set(ids) & set(queue()), what="the bench's jobs to leave the queue")
        assert queue().get(other) == "RUNNING"  # someone else's job is untouched
    finally:
        subprocess.run(["scancel", other], check=False)


def test_detach_then_a_rerun_waits_for_the_earlier_jobs(slurm_env, stores, tmp_path):
    other = _occupy_node(slurm_env)
    out = tmp_path / "d"
    try:
        r = api.bench(grid(stores, out, executor="slurm", cells_per_job=12, detach=True), progress=None)
        assert r.counts["jobs"] == 2 and r.counts["ok"] == 0  # submitted, not run
        ids = [j["id"] for j in json.loads((out / "slurm" / "jobs.json").read_text())["jobs"]]
        assert all(queue().get(i) == "PENDING" for i in ids)
    finally:
        subprocess.run(["scancel", other], check=False)
    again = api.bench(grid(stores, out, executor="slurm", cells_per_job=12), progress=None)
    assert again.counts["jobs"] == 0 and again.counts["waited"] == 2 and again.counts["failed"] == 0
    assert again.counts["ok"] + again.counts["n/a"] == 24
    rebuilt = runner.invoke(app, ["bench", "--report", str(out)])
    assert rebuilt.exit_code == 0, rebuilt.output


def test_report_reads_cells_a_detached_run_has_not_merged(slurm_env, stores, tmp_path):
    out = tmp_path / "r"
    api.bench(grid(stores, out, executor="slurm", cells_per_job=24, detach=True), progress=None)
    job = json.loads((out / "slurm" / "jobs.json").read_text())["jobs"][0]["id"]
    wait_for(lambda: job not in queue(), timeout=120, what="the job to end")
    assert not (out / "results.jsonl").exists()  # nothing merged: the driver returned at once
    api.bench_report(str(out))
    assert "| linear-probe |" in (out / "table.md").read_text()


def test_executor_settings_are_checked_before_anything_runs(stores, tmp_path):
    with pytest.raises(ConfigError, match="--slurm gpu: unknown key; valid keys: partition, time"):
        grid(stores, tmp_path, executor="slurm", slurm={"gpu": 1})
    with pytest.raises(ConfigError, match=r"--slurm time \(the job's time limit in minutes\) must be an integer"):
        grid(stores, tmp_path, executor="slurm", slurm={"time": "1h"})
    with pytest.raises(ConfigError, match="--cells-per-job must be an integer >= 1"):
        grid(stores, tmp_path, executor="slurm", cells_per_job=0)
    with pytest.raises(ConfigError, match="--slurm, --detach are for --executor slurm"):
        grid(stores, tmp_path, slurm={"partition": "gpu"}, detach=True)
    bad = runner.invoke(app, ["bench", "--stores", stores[0], "--methods", "prototype", "--executor", "pbs"])
    assert bad.exit_code == 2 and "pbs" in bad.output
    f = tmp_path / "grid.toml"
    f.write_text(
        f'stores = ["{stores[0]}"]\nmethods = ["prototype"]\n[executor]\nkind = "slurm"\ncells_per_job = 3\n'
        f'[executor.slurm]\npartition = "debug"\ntime = 20\n'
    )
    data = api.load_grid(str(f))
    cfg = BenchConfig.from_dict(data)
    assert (cfg.executor, cfg.cells_per_job, cfg.slurm) == ("slurm", 3, {"partition": "debug", "time": 20})
    f.write_text(f'stores = ["{stores[0]}"]\nmethods = ["prototype"]\n[executor]\nkind = "slurm"\nnodes = 2\n')
    with pytest.raises(ConfigError, match=r"\[executor\] unknown key\(s\) nodes; valid keys: kind, cells_per_job"):
        api.load_grid(str(f))
    f.write_text(f'stores = ["{stores[0]}"]\nmethods = ["prototype"]\ncells_per_job = 3\n')
    with pytest.raises(ConfigError, match="unknown key"):  # executor settings live in [executor]
        api.load_grid(str(f))


def test_a_jobs_body_runs_its_cells_with_the_drivers_storage_options(stores, tmp_path):
    """What a job runs, here in-process: only its cells, each row in its own file, with the storage
    options the driver was given (a job is a fresh process: they travel in its call)."""
    from fskd.bench import grid as bench_grid
    from fskd.bench.runner import GridPlan
    from fskd.bench.slurm import cell_path, read_cells
    from fskd.store import location

    cfg = grid(stores, tmp_path / "j", executor="slurm")
    plan = GridPlan(cfg)  # the driver makes the folder and its bench.json
    (plan.out / "bench.json").write_text(json.dumps(plan.meta({})))
    keys = [c.key for c in plan.cells[:2]]
    try:
        counts = bench_grid.job(cfg.to_dict(), keys, str(tmp_path / "scratch"), {"anon": True})
        assert location.configured() == {"anon": True}
    finally:
        location.configure(None)
    assert counts["ok"] + counts["n/a"] == 2 and all(cell_path(plan.out, k).exists() for k in keys)
    assert {r["key"] for r in read_cells(plan.out)} == set(keys)
    assert not list((tmp_path / "scratch").glob("*/*"))  # its scratch removed
