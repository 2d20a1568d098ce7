"""The fault battery on object storage (issue 29), in the style of test_faults.py: every test talks
to the session's real S3-API server (moto on 127.0.0.1, conftest.s3_endpoint), directly or through
a TCP proxy that stops answering on demand.

1. An endpoint that stops answering (before or in the middle of a command) fails ``fskd info`` and
   ``fskd extract`` within a bound, with one ``error:`` line naming the URL: every remote call has a
   read timeout and bounded retries, set from the storage options (a user's explicit value wins).
2. Two ``fskd extract`` processes racing to create one s3:// store: each succeeds or refuses
   cleanly (the root claim is a conditional PUT), and whatever an interrupted creation left (a
   kill at a named step or at a random time) is made again by the next run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest

from fskd.errors import ConfigError, StoreError
from fskd.store import FeatureStore
from fskd.store import schema as S
from fskd.store.location import Location, configure, storage_options
from tests.conftest import tinted_images
from tests.test_faults import EXTRACT, allway, cli, user_error
from tests.test_object_store import _assert_same

#: a stalled endpoint gives up after 1 s of silence, 2 tries (botocore's 2 x s3fs's 1): seconds, not minutes
FAST = {"config_kwargs": {"read_timeout": 1, "connect_timeout": 1}, "retries": 1}
#: how long the mid-extract stall test waits for the extract before calling it a hang
STALL_BOUND = 60


#: test_faults.py's extraction with 8-row chunks: 7 row chunks, fewer requests to the S3 server
REMOTE_EXTRACT = [
    *EXTRACT[: EXTRACT.index("--chunk-rows")],
    "--chunk-rows",
    "8",
    *EXTRACT[EXTRACT.index("--chunk-rows") + 2 :],
]


def _args(root, store, *extra) -> list[str]:
    return ["extract", "folder", "--root", str(root), "--store", str(store), *REMOTE_EXTRACT, *extra]


def _popen(root, store, env_extra: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "FSKD_FAULT"}
    env.update({"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", **(env_extra or {})})
    return subprocess.Popen(
        [sys.executable, "-m", "fskd", *_args(root, store)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _s3():
    return fsspec.filesystem("s3", skip_instance_cache=True)


def _root_attrs(fs, url: str) -> dict:
    fs.invalidate_cache()
    try:
        return json.loads(fs.cat_file(f"{url[5:]}/zarr.json"))["attributes"]
    except (FileNotFoundError, ValueError, KeyError):
        return {}


def _one_error_line(stderr: str, *needles: str) -> str:
    """A subprocess's user error: one 'error:' line on stderr, no traceback, naming what was wrong."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """test_faults.py's images: 6 classes x 8 small PNGs of coloured noise."""
    return tinted_images(tmp_path_factory.mktemp("remote-fault-images"), 6, 8, 24)


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> FeatureStore:
    """One uninterrupted extraction into a local folder: what every remote store must equal."""
    path = tmp_path_factory.mktemp("remote-ref") / "ref.zarr"
    cli(*_args(images, path))
    return FeatureStore.open(path)


# -- a TCP proxy in front of the S3 server that can stop answering ---------------------------------
class StallingProxy:
    """Forwards 127.0.0.1:port to the S3 server until :meth:`stall`; from then on it accepts
    connections and reads requests but never answers (a server that hangs mid-request)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = ("127.0.0.1", int(upstream.rsplit(":", 1)[1]))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.stalled = threading.Event()
        self.socks: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self) -> None:
        self.stalled.set()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.socks.append(conn)
            if self.stalled.is_set():
                continue  # held open, never answered
            try:
                up = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                conn.close()
                continue
            up.settimeout(None)
            self.socks.append(up)
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if self.stalled.is_set():
                if not data:
                    return
                continue  # swallowed: the answer never comes
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


@pytest.fixture
def proxy(s3_endpoint):
    p = StallingProxy(s3_endpoint)
    yield p
    p.close()


# -- 1. bounded waits ---------------------------------------------------------------------------------
def test_timeouts_and_retries_are_set_and_the_users_win(s3_bucket):
    url = f"{s3_bucket}/opts.zarr"
    opts = storage_options("s3")
    assert opts["config_kwargs"] == {
        "connect_timeout": 5,
        "read_timeout": 30,
        "retries": {"total_max_attempts": 2, "mode": "standard"},
    }
    assert opts["retries"] == 2
    assert storage_options("gs")["requests_timeout"] == 60
    assert storage_options("az")["read_timeout"] == 30 and storage_options("memory") == {}
    loc = Location(url)
    assert loc.fs().retries == 2 and loc.fs().config_kwargs["read_timeout"] == 30
    assert loc.zarr_store(read_only=True).fs.retries == 2  # zarr's own (async) instance too
    configure({"config_kwargs": {"read_timeout": 7}, "retries": 3})
    cfg = storage_options("s3")["config_kwargs"]
    assert cfg["read_timeout"] == 7 and cfg["connect_timeout"] == 5 and cfg["retries"]["total_max_attempts"] == 2
    assert loc.fs().retries == 3 and loc.fs().config_kwargs["read_timeout"] == 7
    assert loc.zarr_store(read_only=True).fs.retries == 3
    configure(None)
    user_error(
        cli("info", url, "--storage-options", json.dumps({"retries": 0}), ok=False), "retries", "positive integer"
    )


def test_writes_to_a_remote_store_are_bounded(s3_bucket, tmp_path):
    """A stalled upload gets no botocore timeout: each write to a remote store has a bound of its
    own, 3 x one request's worst case, or the user's ``fskd_call_timeout``; a local store none; the
    bound's TimeoutError counts as the backend's (one "stopped answering" error)."""
    import zarr

    from fskd.store.location import StalledWrite, _from_backend, call_timeout, store_call_timeout

    assert call_timeout("s3") == 3 * (5 + 30) * 4  # (connect + read) x botocore's 2 x s3fs's 2 tries
    assert call_timeout("gs") == 3 * 60 * 7 and call_timeout("az") == 3 * 35 * 4 and call_timeout("memory") is None
    assert store_call_timeout(zarr.storage.LocalStore(tmp_path)) is None
    try:
        configure(FAST)
        assert call_timeout("s3") == 3 * 2 * 2
        configure({"fskd_call_timeout": 90})
        assert store_call_timeout(Location(f"{s3_bucket}/bound.zarr").zarr_store(read_only=True)) == 90.0
        configure({"fskd_call_timeout": 0})
        with pytest.raises(ConfigError, match="fskd_call_timeout"):
            call_timeout("s3")
    finally:
        configure(None)
    assert _from_backend(StalledWrite("a write to x failed to finish within 12 s"))
    assert not _from_backend(TimeoutError("a write to x failed to finish within 12 s"))  # not the bound's


def test_an_endpoint_that_stops_answering_fails_info_and_extract_in_bounded_time(images, s3_bucket, proxy):
    url = f"{s3_bucket}/stalled.zarr"
    proxy.stall()
    opts = json.dumps({**FAST, "endpoint_url": proxy.url})
    for args in (["info", url], _args(images, url)):
        t0 = time.perf_counter()
        res = cli(*args, "--storage-options", opts, ok=False)
        took = time.perf_counter() - t0
        user_error(res, url, "stopped answering", "read timeout 1 s, 2 tries", proxy.url)
        assert took < 20, (args, took)
    assert _s3().find(url[5:]) == []  # nothing was written


def test_a_stalled_chunk_upload_ends_within_the_call_bound(s3_bucket, proxy):
    """The array is made through the proxy, which then stalls: the 8 MB chunk's upload is swallowed
    (a kept connection, then botocore's retry on a new one that is accepted and never read, so the
    upload blocks on a full socket buffer, where no read timeout runs: zarr's own ``arr[:] = x``
    waits forever here). The store's writes are bounded (12 s here): one "stopped answering" error
    naming the URL, in seconds."""
    import numpy as np
    import zarr

    from fskd.store.arrays import write
    from fskd.store.location import backend_errors

    url = f"{s3_bucket}/upload-stall.zarr"
    configure({**FAST, "endpoint_url": proxy.url})
    try:
        arr = zarr.create_array(
            Location(url).zarr_store(read_only=False), shape=(2048, 1024), chunks=(2048, 1024), dtype="float32"
        )
        proxy.stall()
        t0 = time.perf_counter()
        with pytest.raises(StoreError) as err, backend_errors(url):
            write(arr, slice(None), np.ones((2048, 1024), np.float32))  # every write of the store's
        took = time.perf_counter() - t0
    finally:
        configure(None)
    assert "stopped answering" in str(err.value) and url in str(err.value), err.value
    assert took < 40, took


def test_an_endpoint_that_stops_answering_mid_extract_fails_then_a_rerun_finishes(
    images, reference, s3_bucket, proxy, monkeypatch
):
    """The extract goes through the proxy (options from $FSKD_STORAGE_OPTIONS), which stalls once
    the first row chunk is marked written (in the fill, past the creation): one error line naming
    the URL, in seconds, also when the stall catches a chunk upload (botocore's read timeout never
    starts; the write's bound, 3 x (1 + 1) s x 2 tries here, ends it). A rerun straight to the
    server resumes and equals one uninterrupted run."""
    url = f"{s3_bucket}/midway.zarr"
    monkeypatch.setenv("FSKD_STORAGE_OPTIONS", json.dumps({**FAST, "endpoint_url": proxy.url}))
    flag = f"{url[5:]}/{reference.splits[0]}/written/c/0"
    stalled_at: list[float] = []
    done = threading.Event()

    def watch() -> None:  # straight to the server, not through the proxy
        fs = _s3()
        while not done.is_set():
            fs.invalidate_cache()
            if fs.exists(flag):
                proxy.stall()
                stalled_at.append(time.perf_counter())
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out: list = []
    run = threading.Thread(target=lambda: out.append(cli(*_args(images, url), ok=False)), daemon=True)
    try:
        run.start()
        run.join(STALL_BOUND)
    finally:
        done.set()
        watcher.join(10)
    assert out, f"the extract did not end within {STALL_BOUND} s of a stall (a write's bound is 12 s here)"
    res = out[0]
    assert stalled_at, f"the extract ended before its first chunk was seen: {res.output[-2000:]}"
    took = time.perf_counter() - stalled_at[0]
    user_error(res, url, "stopped answering", "read timeout 1 s, 2 tries")
    assert took < 20, took
    monkeypatch.delenv("FSKD_STORAGE_OPTIONS")
    assert not FeatureStore.open(url).is_complete()
    cli(*_args(images, url))
    _assert_same(reference, FeatureStore.open(url))


# -- 2. racing and interrupted creations ------------------------------------------------------------
@pytest.mark.slow  # 20-40 s on 2 cores: `make test-all` runs it (the default suite's 15-minute budget)
def test_two_extracts_racing_for_one_store_succeed_or_refuse_cleanly(images, reference, s3_bucket):
    outcomes = []
    for round_ in range(3):
        url = f"{s3_bucket}/race-{round_}.zarr"
        procs = [_popen(images, url) for _ in range(2)]
        for p in procs:
            try:
                _, err = p.communicate(timeout=240)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise
            assert "Traceback" not in err, err[-3000:]
            if p.returncode == 0:
                outcomes.append("ok")
            else:
                assert p.returncode == 2, err[-3000:]
                _one_error_line(err, url, "another fskd extract", "rerun when it finishes")
                outcomes.append("refused")
        assert "ok" in outcomes[-2:], outcomes  # never both refused
        if "refused" in outcomes[-2:]:
            cli(*_args(images, url))  # the rerun after a refusal
        _assert_same(reference, FeatureStore.open(url))
    assert json.loads(cli("info", url, "--check", "--json").stdout)["check"]["ok"]
    assert allway(url) == allway(reference.path)


def test_a_live_creator_is_refused_and_a_gone_or_foreign_one_is_taken_over(images, reference, s3_bucket):
    """A root marker written by a process that still runs on this machine: refused, nothing
    changed. Once it is gone, or when the marker names another machine, the next run makes the
    store again, leftovers of the interrupted creation removed."""
    from fskd.store.creation import _creator, _group_json, _proc_stat

    url = f"{s3_bucket}/claimed.zarr"
    fs = _s3()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        creator = {**_creator("someone-else"), "pid": sleeper.pid, "start": (_proc_stat(sleeper.pid) or ("", None))[1]}
        fs.pipe_file(f"{url[5:]}/zarr.json", _group_json({"format": S.CREATING_FORMAT, "creator": creator}))
        fs.pipe_file(f"{url[5:]}/train/zarr.json", b"{half-written")
        before = {k: fs.cat_file(k) for k in fs.find(url[5:])}
        user_error(
            cli(*_args(images, url), ok=False),
            url,
            "another fskd extract",
            f"pid {sleeper.pid}",
            "rerun when it finishes",
        )
        fs.invalidate_cache()
        assert {k: fs.cat_file(k) for k in fs.find(url[5:])} == before
        user_error(cli("info", url, ok=False), "being created")
    finally:
        sleeper.kill()
        sleeper.wait()
    cli(*_args(images, url))
    _assert_same(reference, FeatureStore.open(url))

    other = f"{s3_bucket}/foreign.zarr"
    marker = {"format": S.CREATING_FORMAT, "creator": {**_creator("x"), "host": "another-machine", "pid": os.getpid()}}
    fs.pipe_file(f"{other[5:]}/zarr.json", _group_json(marker))
    fs.pipe_file(f"{other[5:]}/text/classnames/c/0", b"partial")
    cli(*_args(images, other))
    _assert_same(reference, FeatureStore.open(other))


def test_a_taken_over_creation_cannot_commit(s3_bucket):
    """Of two creators, only the one holding the claim writes the completion marker (a PUT
    conditional on its claim); the other gets a clean StoreError."""
    from fskd.store.creation import _claim_creation, _commit_creation

    loc = Location(f"{s3_bucket}/two.zarr")
    first = _claim_creation(loc, "first")
    assert first
    second = _claim_creation(loc, "second")  # this process's own marker counts as interrupted: taken over
    assert second and second != first
    assert _claim_creation(loc, "second") == second  # our own claim (a retried request) is ours
    with pytest.raises(StoreError, match="another fskd extract took over"):
        _commit_creation(loc, {"format": S.FORMAT}, first)
    _commit_creation(loc, {"format": S.FORMAT, "x": 1}, second)
    _commit_creation(loc, {"format": S.FORMAT, "x": 1}, second)  # a lost answer, retried: already done
    with pytest.raises(StoreError, match="already exists"):
        _claim_creation(loc, "third")


def test_kills_during_creation_are_made_again(images, reference, s3_bucket):
    """SIGKILL right after the claim, then at random times while the root is marked as being
    created; every rerun takes the creation over, and the last one equals one uninterrupted run."""
    url = f"{s3_bucket}/killed.zarr"
    p = _popen(images, url, {"FSKD_FAULT": "store:create-claimed"})
    p.communicate(timeout=240)
    assert p.returncode == -signal.SIGKILL
    fs = _s3()
    assert _root_attrs(fs, url)["format"] == S.CREATING_FORMAT
    with pytest.raises(StoreError, match="being created"):
        FeatureStore.open(url)
    rng = random.Random(29)
    kills = 0
    for _ in range(2):
        p = _popen(images, url)
        deadline = time.time() + 120
        try:
            while p.poll() is None and time.time() < deadline:
                attrs = _root_attrs(fs, url)
                # this run's own marker (not an earlier run's): its creator is this process
                if attrs.get("format") == S.CREATING_FORMAT and attrs.get("creator", {}).get("pid") == p.pid:
                    time.sleep(rng.uniform(0.0, 0.4))  # anywhere in the removal, the arrays, the text, the commit
                    break
                if attrs.get("format") == S.FORMAT:
                    break
                time.sleep(0.01)
        finally:
            if p.poll() is None:
                p.kill()
                kills += 1
            _, err = p.communicate()
        assert "Traceback" not in err, err[-3000:]
    assert kills >= 1
    cli(*_args(images, url))
    store = FeatureStore.open(url)
    _assert_same(reference, store)
    assert json.loads(cli("info", url, "--check", "--json").stdout)["check"]["ok"]
    fs.invalidate_cache()
    assert sorted(o.rsplit("/", 1)[-1] for o in fs.ls(url[5:])) == sorted([*reference.splits, "text", "zarr.json"])


def test_a_stalled_read_is_named_as_the_network_never_as_damage(images, s3_bucket, proxy):
    """A store read over a connection that stops answering (eval, info --check, extract's
    verification) is one error naming the URL and the timeout: not "damaged", and not a chunk
    marked for re-encoding."""
    url = f"{s3_bucket}/readable.zarr"
    cli(*_args(images, url))
    configure({**FAST, "endpoint_url": proxy.url})
    try:
        st = FeatureStore.open(url)  # metadata through the proxy, still answering
        proxy.stall()
        for read in (lambda: st.features("test"), lambda: st.check_report(), lambda: st.damaged_chunks(verify=True)):
            t0 = time.perf_counter()
            with pytest.raises(StoreError) as e:
                read()
            assert "stopped answering" in str(e.value) and url in str(e.value), str(e.value)
            assert "damaged" not in str(e.value) and time.perf_counter() - t0 < 20
    finally:
        configure(None)
    assert json.loads(cli("info", url, "--check", "--json").stdout)["check"]["ok"]  # nothing was marked


def test_a_flipped_byte_in_an_s3_chunk_is_refused_on_read(images, s3_bucket):
    """The read-time CRC-32C holds on object storage too: a chunk object whose bytes changed (and
    still decode) fails eval with one line naming the chunk; the same extract repairs it."""
    url = f"{s3_bucket}/flipped.zarr"
    cli(*_args(images, url))
    good = allway(url)
    fs = _s3()
    st = FeatureStore.open(url)
    arr = st.group["test"]["features"]
    key = f"{url[5:]}/test/features/{arr.metadata.encode_chunk_key((1, 0))}"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(key, bytes(data))
    user_error(cli("eval", "--store", url, "--protocol", "allway", "--shots", "1", ok=False), "test/features chunk 1")
    res = cli(*_args(images, url))
    assert "repaired 1 damaged chunk(s) of test" in res.stdout and allway(url) == good
