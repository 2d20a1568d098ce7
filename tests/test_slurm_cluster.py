"""submitit on a real one-node Slurm cluster (tests/slurm_cluster.py, started once for this module
on 127.0.0.1): batch jobs run, functions return their results, a job array runs its tasks at
once, and cancelled, killed and failing jobs are seen as finished with their real state.

Without Slurm (or not as root) these tests skip, with the reason; under CI=true they fail instead
(.ci/install-slurm installs Slurm)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import NODE, PARTITION, SlurmCluster, SlurmError, slurm_available

try:
    import submitit
    from submitit.core.utils import FailedJobError, UncompletedJobError
    from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob
except ImportError:  # the tests skip (fail under CI) with the reason
    submitit = None

ROOT = Path(__file__).resolve().parents[1]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}


def _require_slurm() -> None:
    """Skip with the reason when the cluster cannot run here; fail instead under CI=true."""
    reason = slurm_available()
    if reason is None and submitit is None:
        reason = "submitit is not installed (.ci/install-slurm installs it)"
    if reason:
        _unavailable(reason)


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"the Slurm test cluster is required under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster():
    """The cluster, with this process's environment pointing at it (submitit runs sbatch, sacct
    and scancel with it) and a fresh submitit state cache (job ids restart at 1 on every new
    cluster)."""
    _require_slurm()
    with contextlib.ExitStack() as stack:
        try:
            c = stack.enter_context(SlurmCluster())
        except SlurmError as e:
            _unavailable(f"the Slurm test cluster did not start: {e}")
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        for key in [k for k in os.environ if k not in c.env]:  # inherited SLURM_* variables
            mp.delenv(key)
        for key, value in c.env.items():
            mp.setenv(key, value)
        # jobs import this module (the functions below) with the submitting environment
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        mp.setattr(SlurmJob, "watcher", SlurmInfoWatcher(delay_s=600))
        yield c


@pytest.fixture
def executor(cluster, tmp_path):
    ex = submitit.AutoExecutor(folder=tmp_path)
    ex.update_parameters(slurm_partition=PARTITION, timeout_min=5, cpus_per_task=1)
    assert ex.cluster == "slurm"
    return ex


def where(x: int) -> tuple[int, str]:
    """Runs in the job: ``x * 2`` and the Slurm job id it ran under."""
    return x * 2, os.environ["SLURM_JOB_ID"]


def span(seconds: float) -> tuple[float, float]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def fail() -> None:
    raise ValueError("raised in the job")


def die() -> None:
    """A crash that leaves no result (a segfault, the OOM killer)."""
    os.kill(os.getpid(), signal.SIGKILL)


def wait_for(job, states: set[str], timeout: float = 30) -> str:
    """Poll the job's Slurm state (a forced update each time) until it is one of ``states``."""
    deadline = time.monotonic() + timeout
    while (state := job.watcher.get_state(job.job_id, mode="force")) not in states:
        assert time.monotonic() < deadline, f"job {job.job_id} is {state}, not {states} after {timeout} s"
        time.sleep(0.3)
    return state


def test_sbatch_wrap(cluster, tmp_path):
    out = tmp_path / "out.txt"
    job = cluster.run("sbatch", "--parsable", "--wait", f"--output={out}", "--wrap", "echo hi").stdout.strip()
    assert out.read_text() == "hi\n"
    assert cluster.run("sacct", "-j", job).stdout.splitlines()[1:] == [f"{job}|COMPLETED|{NODE}"]


def test_submitit_returns_result(executor):
    job = executor.submit(where, 21)
    assert job.result() == (42, job.job_id)
    assert job.done() and job.exception() is None


def test_array_runs_tasks_at_once(cluster, executor):
    with executor.batch():
        jobs = [executor.submit(span, 1.0) for _ in range(4)]
    assert len({j.job_id.split("_")[0] for j in jobs}) == 1  # one array job
    spans = [j.result() for j in jobs]
    assert {wait_for(j, ENDED) for j in jobs} == {"COMPLETED"}  # each task's own state
    at_once = max(sum(s <= start < e for s, e in spans) for start, _ in spans)
    assert at_once >= min(4, cluster.cores)


@pytest.mark.parametrize("how", ["job.cancel", "scancel --signal=KILL"])
def test_cancel(cluster, executor, how):
    job = executor.submit(time.sleep, 60)
    wait_for(job, {"RUNNING"})
    if how == "job.cancel":
        # SIGTERM, which submitit's job ignores: slurmd sends SIGKILL max(KillWait, 5 s) later
        job.cancel()
    else:
        cluster.run("scancel", "--signal=KILL", job.job_id)  # Slurm counts this as a cancel too
    assert wait_for(job, ENDED, timeout=15) == "CANCELLED"
    assert job.done()
    job._results_timeout_s = 0  # no result pickle will come: do not wait 15 s for one
    assert isinstance(job.exception(), UncompletedJobError)


def test_killed_job_fails(executor):
    job = executor.submit(die)
    assert wait_for(job, ENDED) == "FAILED"
    assert job.done()
    job._results_timeout_s = 0
    with pytest.raises(UncompletedJobError, match=r"has not produced any output \(state: FAILED\)"):
        job.result()


def test_raising_job_fails(executor):
    job = executor.submit(fail)
    with pytest.raises(FailedJobError, match="raised in the job"):
        job.result()
    assert wait_for(job, ENDED) == "FAILED"


def test_start_error_names_the_daemon(tmp_path):
    """A cluster that cannot start says which daemon failed, with its log."""
    _require_slurm()
    bad = SlurmCluster(tmp_path / "bad", extra_conf="NoSuchOption=1")
    with pytest.raises(SlurmError, match=r"slurmctld exited[\s\S]*NoSuchOption"):
        with bad:
            pass
    assert subprocess.run(["pgrep", "-f", str(tmp_path / "bad")], capture_output=True).returncode == 1
