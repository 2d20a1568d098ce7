"""A real one-node Slurm cluster for tests: Debian's Slurm (22.05) and munge, run as root on
127.0.0.1 inside a temporary folder, with no cgroups and no accounting database.

Every file (munge key and socket, slurm.conf, state, spool, logs, pid files) lives in the folder
and the ports are free ones picked at start, so the cluster cannot clash with a system Slurm or
munge. Clients reach it through ``cluster.env`` (``SLURM_CONF`` and ``PATH``)::

    with SlurmCluster() as cluster:
        cluster.run("sbatch", "--wrap", "true")  # or subprocess.run(..., env=cluster.env)

Job states without slurmdbd: ``sacct`` reads the accounting database (slurmdbd) and fails
without one ("Slurm accounting storage is disabled"), so submitit, which polls
``sacct -o JobID,State,NodeList --parsable2 -j ID...``, would see every job as UNKNOWN, i.e.
never finished. ``env``'s PATH puts a stand-in ``sacct`` first (:data:`SACCT`) that answers that
query from ``squeue --states=all``: slurmctld's own view, which keeps finished jobs for
``MinJobAge`` seconds, array tasks included (``sacct --completion`` reads the job completion log
instead, but loses the array task ids).

slurmd runs under a small reaper (this file run as a script): the job steps (slurmstepd)
daemonise, so they become the reaper's children, are reaped when they end (a PID 1 that does not
reap, as in some containers, would keep them as zombies) and are killed if any is left when
slurmd stops.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: the binaries the cluster runs (daemons from /usr/sbin) and the clients that tests and submitit call
BINARIES = (
    "munged",
    "slurmctld",
    "slurmd",
    "slurmstepd",
    "sbatch",
    "srun",
    "squeue",
    "sinfo",
    "scancel",
    "sacct",
    "scontrol",
)
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])
NODE = "node0"
PARTITION = "debug"
MIN_JOB_AGE_S = 3600  # how long slurmctld (hence squeue and the stand-in sacct) keeps finished jobs
PR_SET_CHILD_SUBREAPER = 36  # prctl(2)

#: the stand-in sacct (see the module's docstring): only its ``-j``/``--jobs`` options matter
SACCT = """#!/bin/sh
# sacct without slurmdbd (written by tests/slurm_cluster.py): submitit's
# `sacct -o JobID,State,NodeList --parsable2 -j ID...` answered from slurmctld's job list
jobs=
while [ $# -gt 0 ]; do
    case $1 in
        -j | --jobs) jobs=$jobs,$2; shift ;;
        --jobs=*) jobs=$jobs,${1#--jobs=} ;;
        -j*) jobs=$jobs,${1#-j} ;;
    esac
    shift
done
echo 'JobID|State|NodeList'
exec squeue --states=all --noheader --format='%i|%T|%N' ${jobs:+--jobs=${jobs#,}}
"""


class SlurmError(RuntimeError):
    """The cluster could not start; the message has the tail of the daemon's log."""


def slurm_available() -> str | None:
    """None when the cluster can start here, else why not."""
    missing = [b for b in BINARIES if shutil.which(b, path=SBIN_PATH) is None]
    if missing:
        return f"Slurm binaries not found: {', '.join(missing)} (install them with .ci/install-slurm)"
    if os.geteuid() != 0:
        return "the test Slurm cluster runs its daemons as root (SlurmUser=root), and this is not root"
    return None


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports below the ephemeral range: one picked with bind(0) could be
    taken by an outgoing connection before the daemon binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports: list[int] = []
    while len(ports) < n:
        port = random.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"last lines of {path}:\n" + "\n".join(text)


def _hardware() -> str:
    """This machine's node line as slurmd detects it: ``CPUs=.. Boards=.. SocketsPerBoard=..
    CoresPerSocket=.. ThreadsPerCore=.. RealMemory=..`` (configuring more than slurmd finds
    would drain the node)."""
    out = subprocess.run(
        [shutil.which("slurmd", path=SBIN_PATH), "-C"], capture_output=True, text=True, check=True
    ).stdout
    return " ".join(f for f in out.split("\n", 1)[0].split() if not f.startswith("NodeName="))


class SlurmCluster:
    """Start munged, slurmctld and slurmd in ``root`` (a new temporary folder, removed at exit,
    when None); at exit, cancel the remaining jobs and stop the daemons. ``extra_conf``: lines
    appended to slurm.conf. Needs root (see :func:`slurm_available`)."""

    def __init__(self, root: str | Path | None = None, start_timeout: float = 30.0, extra_conf: str = ""):
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="slurm-")) if root is None else Path(root)
        self.start_timeout = start_timeout
        self.extra_conf = extra_conf
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"
        self.munge_socket = self.root / "munge" / "munge.socket"
        #: the environment for Slurm clients: this process's, without inherited SLURM_* variables
        self.env: dict[str, str] = {}
        self.cores = 0  # the node's cores: with CR_Core, how many 1-CPU jobs run at once
        self._procs: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- start ---------------------------------------------------------------------------------
    def start(self) -> None:
        reason = slurm_available()
        if reason:
            raise SlurmError(reason)
        for sub in ("munge", "log", "state", "spool", "run", "bin"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        hardware = _hardware()
        fields = dict(f.split("=", 1) for f in hardware.split())
        self.cores = int(fields["Boards"]) * int(fields["SocketsPerBoard"]) * int(fields["CoresPerSocket"])
        self.conf.write_text(self._slurm_conf(hardware) + self.extra_conf + "\n")
        (self.root / "plugstack.conf").write_text("")  # not /etc/slurm's SPANK plugins
        sacct = self.root / "bin" / "sacct"
        sacct.write_text(SACCT)
        sacct.chmod(0o755)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_"))
        }
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([str(self.root / "bin"), env.get("PATH", os.defpath)])
        self.env = env
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-N", NODE, "-f", str(self.conf)], reaper=True)
        self._wait_idle()

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # --force: munged refuses a socket in a folder that not every user can enter (0700 here)
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--log-file={self.logs / 'munged.log'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
        )
        self._wait(self.munge_socket.exists, "munged", "socket")

    def _slurm_conf(self, hardware: str) -> str:
        r, logs = self.root, self.logs
        ctld_port, slurmd_port = _free_ports(2)
        return f"""\
ClusterName=fskdtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "run" / "slurmctld.pid"}
SlurmdPidFile={r / "run" / "slurmd.pid"}
SlurmctldLogFile={logs / "slurmctld.log"}
SlurmdLogFile={logs / "slurmd.log"}
PlugStackConfig={r / "plugstack.conf"}
# no cgroups: plain process tracking, no task binding, no resource sampling
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# no slurmdbd: job states come from slurmctld, which keeps finished jobs MinJobAge seconds;
# finished jobs are also logged to a text file (`/usr/bin/sacct --completion` reads it)
AccountingStorageType=accounting_storage/none
MinJobAge={MIN_JOB_AGE_S}
JobCompType=jobcomp/filetxt
JobCompLoc={logs / "jobcomp.txt"}
MpiDefault=none
# cores are the unit of allocation: one 1-CPU job per core, at the same time
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# fast tests: schedule every second, short timeouts, SIGKILL soon after SIGTERM (slurmd waits
# max(KillWait, 5 s))
SchedulerParameters=sched_interval=1,bf_interval=1
SlurmdTimeout=10
MessageTimeout=5
TCPTimeout=2
KillWait=1
InactiveLimit=0
ReturnToService=2
MailProg=/bin/true
NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname=localhost {hardware} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""

    def _spawn(self, name: str, argv: list[str], reaper: bool = False) -> None:
        argv = [shutil.which(argv[0], path=SBIN_PATH), *argv[1:]]
        if reaper:
            argv = [sys.executable, __file__, *argv]
        with open(self.logs / f"{name}.out", "wb") as out:
            self._procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self.env or None
            )

    def _daemon_logs(self, name: str) -> str:
        return "\n".join(
            _tail(p) for p in (self.logs / f"{name}.log", self.logs / f"{name}.out") if p.exists() and p.stat().st_size
        )

    def _wait(self, ready, name: str, what: str) -> None:
        """Poll ``ready()`` until true; fail when a daemon exits or after ``start_timeout``."""
        deadline = time.monotonic() + self.start_timeout
        while not ready():
            for daemon, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmError(
                        f"{daemon} exited with status {proc.returncode} while waiting for "
                        f"{name} ({what})\n{self._daemon_logs(daemon)}"
                    )
            if time.monotonic() > deadline:
                raise SlurmError(f"{name}: no {what} after {self.start_timeout:g} s\n{self._daemon_logs(name)}")
            time.sleep(0.2)

    def _node_state(self) -> str:
        out = self.run("sinfo", "-h", "-N", "-n", NODE, "-o", "%T", check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    def _wait_idle(self) -> None:
        try:
            self._wait(lambda: self._node_state() == "idle", "slurmd", f"idle node {NODE} in sinfo")
        except SlurmError as e:
            raise SlurmError(
                f"{e}\n(node state: {self._node_state() or 'unknown'})\n{self._daemon_logs('slurmctld')}"
            ) from None

    # -- use -----------------------------------------------------------------------------------
    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm client command (``cluster.run("squeue", "-h")``) against this cluster."""
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    # -- stop ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel the remaining jobs, stop the daemons this cluster started and remove its folder
        (when it made it). Idempotent."""
        if all(name in self._procs and self._procs[name].poll() is None for name in ("slurmctld", "slurmd")):
            self._cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _cancel_all(self) -> None:
        """scancel every job and wait (bounded) until slurmctld has none left."""
        self.run("scancel", f"--partition={PARTITION}", check=False)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            out = self.run("squeue", "-h", "-o", "%i", check=False)
            if out.returncode != 0 or not out.stdout.strip():
                return
            time.sleep(0.2)


def _children() -> list[int]:
    me = str(os.getpid())
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = stat.read_text().rsplit(") ", 1)[1].split()[1]
        except (OSError, IndexError):
            continue  # gone meanwhile
        if ppid == me:
            pids.append(int(stat.parent.name))
    return pids


def _reap(argv: list[str]) -> int:
    """Run ``argv`` (slurmd) as a child subreaper: adopt and reap its orphaned descendants (the
    job steps); pass SIGTERM and SIGINT on to it; when it ends, kill the descendants left and
    return its exit status."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")
    main = os.posix_spawn(argv[0], argv, os.environ)
    status = None

    def forward(signum, _frame):
        if status is None:
            os.kill(main, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:  # no child left
            return status
        if pid == main:
            status = os.waitstatus_to_exitcode(wait_status)
        if status is not None:  # slurmd is gone: so must be the job steps (whose children come next)
            for child in _children():
                os.kill(child, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(_reap(sys.argv[1:]))
