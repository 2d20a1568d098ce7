"""Feature stores on object storage: every test talks to a real S3-API server (moto, started on
127.0.0.1 by conftest.s3_endpoint), never to a mock of fsspec. Extraction into s3:// equals a
local extraction; kills at every commit step and at random times resume to the same store; two
torchrun node groups extract into one s3:// store; eval and adapt read from it; bad input fails
fast and names the URL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from typer.testing import CliRunner

from fskd import api
from fskd.cli import app
from fskd.config import EvalConfig, ExtractConfig
from fskd.errors import StoreError
from fskd.store import FeatureStore
from fskd.store import schema as S
from fskd.store.location import Location, configure
from tests.conftest import _free_port, noise_images

runner = CliRunner()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """8 classes x 12 random 48 px PNGs (the folder layout)."""
    return noise_images(tmp_path_factory.mktemp("objimgs") / "imgs", 8, 12, 48)


def _args(root, store, *extra) -> list[str]:
    return [
        "extract",
        "folder",
        "--root",
        str(root),
        "--store",
        str(store),
        "--encoder",
        "synthetic:16",
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--chunk-rows",
        "4",
        "--device",
        "cpu",
        *extra,
    ]


def _cmd(root, store, *extra) -> list[str]:
    return [sys.executable, "-m", "fskd", *_args(root, store, *extra)]


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> FeatureStore:
    """The same extraction into a local folder: what every remote store must equal."""
    path = tmp_path_factory.mktemp("objref") / "ref.zarr"
    api.extract(
        ExtractConfig(
            dataset="folder",
            root=str(images),
            encoder="synthetic:16",
            store=str(path),
            workers=0,
            batch_size=4,
            chunk_rows=4,
            device="cpu",
        )
    )
    return FeatureStore.open(path)


def _assert_same(a: FeatureStore, b: FeatureStore) -> None:
    assert a.splits == b.splits and a.fingerprint == b.fingerprint
    for s in a.splits:
        np.testing.assert_array_equal(a.features(s), b.features(s))
        np.testing.assert_array_equal(a.labels(s), b.labels(s))
        np.testing.assert_array_equal(a.sample_ids(s), b.sample_ids(s))
        assert b.written(s).all()
    np.testing.assert_array_equal(a.text_embeddings(), b.text_embeddings())


def _objects(url: str) -> list[str]:
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    return sorted(fs.find(url.split("://", 1)[1]))


# -- extraction, reuse, reading ------------------------------------------------------------------
def test_cli_extract_to_s3_equals_local_and_is_reused(images, reference, s3_bucket):
    url = f"{s3_bucket}/cub/feats.zarr"
    secret = "do-not-store-this-secret"
    opts = json.dumps(
        {
            "key": "fskd-test",
            "secret": "fskd-test-secret",
            "client_kwargs": {"region_name": "us-east-1"},
            "fskd_note": secret,
        }
    )
    r = runner.invoke(app, _args(images, url, "--storage-options", opts))
    assert r.exit_code == 0, r.output
    assert f"{url}: encoded 96 images" in r.output
    store = FeatureStore.open(url)
    assert store.path == url and store.location.is_remote
    _assert_same(reference, store)
    assert store.is_complete() and store.check_report()["ok"]
    # storage options (credentials) are never written into the store
    root_json = fsspec.filesystem("s3", skip_instance_cache=True).cat_file(f"{url[5:]}/zarr.json").decode()
    assert "fskd-test-secret" not in root_json and secret not in root_json
    assert json.loads(root_json)["attributes"]["format"] == S.FORMAT
    again = runner.invoke(app, _args(images, url))
    assert again.exit_code == 0 and "nothing re-encoded" in again.output
    info = runner.invoke(app, ["info", url, "--check", "--json"])
    assert info.exit_code == 0, info.output
    data = json.loads(info.output)
    assert data["path"] == url and data["check"]["ok"] and data["size_bytes"] > 0


def test_reads_are_bounded_and_equal_local(reference, s3_bucket, monkeypatch):
    """gather / take / iter_chunks / features of a remote store equal the local store's, for a read
    span of 1 and of several chunks (zarr's concurrency is set to the same bound)."""
    import zarr

    url = f"{s3_bucket}/copy.zarr"
    splits = {s: (reference.features(s), reference.labels(s)) for s in reference.splits}
    FeatureStore.from_arrays(
        url,
        splits,
        reference.class_names,
        {k: v for k, v in reference.attrs["class_split"].items() if k != "source"},
        chunk_rows=4,
    )
    for n in (1, 3):
        configure({"fskd_max_requests": n})
        st = FeatureStore.open(url)
        assert st.read_span == n
        assert zarr.config.get("async.concurrency") == n
        for s in reference.splits:
            np.testing.assert_array_equal(st.features(s), reference.features(s))
            rows = np.array([5, 0, 0, 3, len(st.labels(s)) - 1, 9]) % len(st.labels(s))
            np.testing.assert_array_equal(st.take(s, rows), reference.take(s, rows))
            chunks = list(st.iter_chunks(s))
            assert [c[0] for c in chunks] == list(range(0, len(st.labels(s)), 4))
            np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), reference.features(s))
        x, y = st.gather([1, 4, 6])
        xr, yr = reference.gather([1, 4, 6])
        np.testing.assert_array_equal(x, xr)
        np.testing.assert_array_equal(y, yr)
    with pytest.raises(Exception, match="positive integer"):
        configure({"fskd_max_requests": 0})
        FeatureStore.open(url).read_span  # noqa: B018


def test_eval_and_adapt_read_from_s3(reference, s3_bucket, tmp_path):
    """`fskd eval` on an s3:// store gives the local store's numbers; a state fitted on it (out
    local) records the URL and evaluates again from it."""
    url = f"{s3_bucket}/eval.zarr"
    splits = {s: (reference.features(s), reference.labels(s)) for s in reference.splits}
    split = {k: v for k, v in reference.attrs["class_split"].items() if k != "source"}
    local = FeatureStore.from_arrays(tmp_path / "local.zarr", splits, reference.class_names, split, chunk_rows=4)
    FeatureStore.from_arrays(url, splits, reference.class_names, split, chunk_rows=4)
    cfg = dict(protocol="allway", shots=2, seeds=(1, 2), device="cpu")
    a = api.evaluate(EvalConfig(store=str(local.path), **cfg))
    b = api.evaluate(EvalConfig(store=url, **cfg))
    assert b.store == url and a.per_seed == b.per_seed and a.accuracy == b.accuracy
    out = tmp_path / "state"
    r = runner.invoke(
        app,
        [
            "adapt",
            "--store",
            url,
            "--method",
            "prototype",
            "--shots",
            "2",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((out / "state.json").read_text())["store_path"] == url
    r = runner.invoke(
        app,
        ["eval", "--store", url, "--state", str(out), "--protocol", "allway", "--shots", "2", "--seeds", "1", "--json"],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["store"] == url


def test_memory_url_round_trip(reference):
    url = f"memory://fskd-test-{os.getpid()}/m.zarr"
    splits = {s: (reference.features(s), reference.labels(s)) for s in reference.splits}
    st = FeatureStore.from_arrays(
        url, splits, reference.class_names, {"base": [0], "val": [1], "novel": [2]}, chunk_rows=4
    )
    assert st.path == url and st.is_complete()
    np.testing.assert_array_equal(FeatureStore.open(url).features("test"), reference.features("test"))


# -- commit rule: kills at every step, then at random times ---------------------------------------
@pytest.mark.parametrize(
    "point",
    # two steps in the default suite (a kill before any chunk, one inside a chunk's commit), the
    # other two under -m slow (make test-all), which keeps make test near 15 minutes
    [
        "store:create-arrays",
        pytest.param("store:chunk-data", marks=pytest.mark.slow),
        "store:chunk-checksum",
        pytest.param("store:chunk-written", marks=pytest.mark.slow),
    ],
)
def test_kill_at_each_commit_step_then_resume(images, reference, s3_bucket, point):
    url = f"{s3_bucket}/killed.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FSKD_FAULT": point}
    proc = subprocess.run(_cmd(images, url), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    if point == "store:create-arrays":
        # arrays were written but not the completion marker: readers refuse, naming the state
        with pytest.raises(StoreError, match="being created"):
            FeatureStore.open(url)
    else:
        partial = FeatureStore.open(url)
        assert not partial.is_complete()
        for s in partial.splits:  # a chunk marked written is a chunk whose data is whole
            done = np.flatnonzero(partial.written(s))
            for c in done:
                sl = slice(c * 4, (c + 1) * 4)
                np.testing.assert_array_equal(partial.features(s)[sl], reference.features(s)[sl])
    env.pop("FSKD_FAULT")
    out = subprocess.run(_cmd(images, url), env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    _assert_same(reference, FeatureStore.open(url))


@pytest.mark.slow  # 20-40 s on 2 cores: `make test-all` runs it (the default suite's 15-minute budget)
def test_sigkill_at_random_times_then_resume(images, reference, s3_bucket):
    url = f"{s3_bucket}/random.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(20261204)
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen(_cmd(images, url), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            proc.wait(timeout=rng.uniform(2.5, 6.0))  # torch's import takes ~2 s: kills land in creation and chunks
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0, proc.stderr.read()[-2000:]
    assert kills >= 1, "every run finished before it could be killed"
    out = subprocess.run(_cmd(images, url), env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    _assert_same(reference, FeatureStore.open(url))


def test_views_group_on_s3_killed_then_made_again(images, s3_bucket, tmp_path):
    url = f"{s3_bucket}/views.zarr"
    extra = ("--augment-views", "2", "--augment-shots", "2", "--augment-seeds", "1")
    local = tmp_path / "views.zarr"
    assert subprocess.run(_cmd(images, local, *extra), capture_output=True).returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FSKD_FAULT": "store:views-created"}
    proc = subprocess.run(_cmd(images, url, *extra), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    half = FeatureStore.open(url)
    assert half.views_info is None  # an unfinished views group counts as absent
    env.pop("FSKD_FAULT")
    assert subprocess.run(_cmd(images, url, *extra), env=env, capture_output=True).returncode == 0
    a, b = FeatureStore.open(local), FeatureStore.open(url)
    np.testing.assert_array_equal(a.view_rows(), b.view_rows())
    fa, _ = a.take_views(a.view_rows())
    fb, _ = b.take_views(b.view_rows())
    np.testing.assert_array_equal(fa, fb)


# -- several nodes ---------------------------------------------------------------------------------
def _torchrun_nodes(images, url, port, env_per_node, timeout=240):
    torchrun = Path(sys.executable).parent / "torchrun"
    procs = []
    for node in range(2):
        cmd = [
            str(torchrun),
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "-m",
            "fskd",
            *_args(images, url),
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                env={**os.environ, "OMP_NUM_THREADS": "1", **env_per_node[node]},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, o, e))
    return outs


@pytest.mark.slow  # 20-40 s on 2 cores: `make test-all` runs it (the default suite's 15-minute budget)
def test_torchrun_two_nodes_into_one_s3_store(images, reference, s3_bucket):
    """`torchrun --nnodes 2 --nproc_per_node 1` (two node groups, rendezvous on 127.0.0.1) into one
    s3:// store equals a single process; after one node is killed mid-run, a rerun finishes it."""
    if not (Path(sys.executable).parent / "torchrun").exists():
        pytest.fail("torchrun is not installed beside this python")
    url = f"{s3_bucket}/nodes.zarr"
    outs = _torchrun_nodes(images, url, _free_port(), [{}, {}])
    for rc, _, e in outs:
        assert rc == 0, e[-3000:]
    assert "2 ranks" in outs[0][1]
    _assert_same(reference, FeatureStore.open(url))

    killed = f"{s3_bucket}/nodes-killed.zarr"
    # node 1 dies (SIGKILL) right after writing its first chunk's data, before the flag
    outs = _torchrun_nodes(images, killed, _free_port(), [{}, {"FSKD_FAULT": "store:chunk-data"}])
    assert outs[1][0] != 0
    partial = FeatureStore.open(killed)
    assert not partial.is_complete()
    outs = _torchrun_nodes(images, killed, _free_port(), [{}, {}])
    for rc, _, e in outs:
        assert rc == 0, e[-3000:]
    _assert_same(reference, FeatureStore.open(killed))


# -- bad input -------------------------------------------------------------------------------------
def test_unreachable_endpoint_fails_fast_naming_the_url(images, s3_bucket):
    url = f"{s3_bucket}/x.zarr"
    closed = f"http://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    r = runner.invoke(app, _args(images, url, "--storage-options", json.dumps({"endpoint_url": closed})))
    took = time.perf_counter() - t0
    assert r.exit_code == 2
    assert url in r.output and "cannot reach" in r.output and closed in r.output
    assert took < 30, took
    r = runner.invoke(app, ["info", url, "--storage-options", json.dumps({"endpoint_url": closed})])
    assert r.exit_code == 2 and "cannot reach" in r.output


def test_missing_credentials_bucket_scheme_and_foreign_objects(images, s3_bucket, monkeypatch):
    url = f"{s3_bucket}/x.zarr"
    # a bucket that does not exist
    r = runner.invoke(app, _args(images, "s3://no-such-bucket-fskd/x.zarr"))
    assert r.exit_code == 2 and "bucket 'no-such-bucket-fskd' does not exist" in r.output
    r = runner.invoke(app, ["eval", "--store", "s3://no-such-bucket-fskd/x.zarr"])
    assert r.exit_code == 2 and "does not exist" in r.output
    # a store that does not exist in a bucket that does
    with pytest.raises(StoreError, match="does not exist"):
        FeatureStore.open(url)
    # a scheme nobody handles: the message lists the ones that work
    r = runner.invoke(app, _args(images, "nosuch://bucket/x.zarr"))
    assert r.exit_code == 2 and "no storage backend handles nosuch://" in r.output
    assert "s3://" in r.output and "memory://" in r.output and "file://" in r.output
    # storage options that are not a JSON object
    r = runner.invoke(app, _args(images, url, "--storage-options", "endpoint=1"))
    assert r.exit_code == 2 and "--storage-options must be a JSON object" in r.output
    # a prefix holding objects fskd did not write: refused, and the objects stay
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.pipe(f"{url[5:]}/notes.txt", b"mine")
    r = runner.invoke(app, _args(images, url))
    assert r.exit_code == 2 and "objects fskd did not write" in r.output and "notes.txt" in r.output
    assert _objects(url) == [f"{url[5:]}/notes.txt"]
    # no credentials anywhere: says which variables or options to set
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    configure(None)
    r = runner.invoke(app, _args(images, f"{s3_bucket}/y.zarr"))
    assert r.exit_code == 2 and "no credentials" in r.output and "AWS_ACCESS_KEY_ID" in r.output


def test_file_url_is_a_local_path(tmp_path):
    loc = Location(f"file://{tmp_path}/a.zarr")
    assert not loc.is_remote and loc.local == tmp_path / "a.zarr"
    with pytest.raises(StoreError, match="names no bucket"):
        Location("s3://")


def test_outputs_other_than_the_store_refuse_urls(s3_bucket, tmp_path, reference):
    """--out (states, bench folders) and --report stay local: a URL is refused before any work,
    and no local folder named like the URL appears."""
    r = runner.invoke(
        app,
        [
            "adapt",
            "--store",
            str(reference.path),
            "--method",
            "prototype",
            "--shots",
            "1",
            "--out",
            f"{s3_bucket}/state",
        ],
    )
    assert r.exit_code == 2 and "takes a local directory" in r.output
    r = runner.invoke(app, ["eval", "--store", str(reference.path), "--report", f"{s3_bucket}/report"])
    assert r.exit_code == 2 and "takes a local directory" in r.output
    assert not Path("s3:").exists()
