"""Shared fixtures: real data from ../shared/data (skipped with the reason when absent), a cached
cub35 store, synthetic stores and a tiny open_clip model saved to a local folder."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

# Idle OpenMP threads sleep instead of spinning: on a 2-core CI box shared with DataLoader
# workers and subprocesses, spinning threads slow torch down several times. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# A shell that starts the tests in the background without job control (`cmd &` in a script, nohup)
# ignores SIGINT in them, and an ignored SIGINT is inherited by every subprocess: the Ctrl-C tests'
# children would then never see their Ctrl-C. Python's own handler is not inherited across exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FSKD_SHARED_DATA", ROOT.parent / "shared" / "data"))
CACHE = Path(os.environ.get("FSKD_TEST_CACHE", ROOT / ".pytest_cache" / "fskd-stores"))
#: where `make demo` writes its stores (the Makefile's --out)
DEMO_OUT = ROOT / "runs" / "demo"
# distillation's decoded-image cache files go beside the cached stores, not into ~/.cache
os.environ.setdefault("FSKD_CACHE_DIR", str(CACHE))


def needs_shared(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"real data {path} not present (clone the project beside ../shared to run this test)")
    return path


@pytest.fixture(scope="session")
def cub35_root() -> Path:
    return needs_shared("cub35")


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    return needs_shared("omniglot")


def cached_store(dataset: str, root: Path, encoder: str = "lite0-minilm") -> str:
    """Extract once per cache folder (later calls reuse the complete store: same fingerprint)."""
    from fskd import api
    from fskd.config import ExtractConfig
    from fskd.errors import StoreError

    path = CACHE / f"{dataset}-{encoder}.zarr"
    demo = DEMO_OUT / path.name  # `make demo` writes the same store (same inputs, same name): copy, not re-encode
    if not path.exists() and demo.is_dir():
        import shutil

        shutil.copytree(demo, path)  # extract below checks its fingerprint: a stale copy is rebuilt
    cfg = ExtractConfig(dataset=dataset, root=str(root), encoder=encoder, store=str(path), workers=1)
    try:
        api.extract(cfg)
    except StoreError:  # a cache written by an older fskd (another schema or fingerprint): the tests' own, rebuilt
        import shutil

        shutil.rmtree(path)
        api.extract(cfg)
    return str(path)


@pytest.fixture(scope="session")
def cub35_store(cub35_root) -> str:
    """cub35 encoded with lite0-minilm (Chen et al. class split: 18 base / 9 val / 8 novel)."""
    return cached_store("cub", cub35_root)


@pytest.fixture(scope="session")
def omniglot_store(omniglot_root) -> str:
    return cached_store("omniglot", omniglot_root)


@pytest.fixture
def synthetic_store(tmp_path):
    """Factory: ``synthetic_store(joint=False, n_classes=20, ...)`` -> FeatureStore in tmp_path."""
    from fskd.store.synthetic import make_synthetic_store

    count = {"n": 0}

    def make(**kwargs):
        count["n"] += 1
        return make_synthetic_store(tmp_path / f"synthetic-{count['n']}.zarr", **kwargs)

    return make


@pytest.fixture(scope="module")
def baseline_stores(tmp_path_factory):
    """A joint and a non-joint synthetic store with class text (seed 0), once per test module: the
    baselines' tests (test_baselines*.py)."""
    from fskd.store.synthetic import make_synthetic_store

    d = tmp_path_factory.mktemp("baselines")
    return {
        "joint": make_synthetic_store(d / "joint.zarr", joint=True, seed=0),
        "pair": make_synthetic_store(d / "pair.zarr", joint=False, seed=0),
    }


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny open_clip model (random weights) saved as open_clip saves a local model folder,
    loadable in any process with the spec ``openclip:local-dir:<dir>``."""
    from fskd.encoders.openclip import save_random_model

    return save_random_model(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A small real-image folder dataset: 6 classes x 8 images drawn from cub35 when present,
    else synthetic coloured squares (so CLI/store tests run anywhere)."""
    from PIL import Image

    d = tmp_path_factory.mktemp("folder")
    src = SHARED_DATA / "cub35" / "images"
    if src.exists():
        for cdir in sorted(src.iterdir())[:6]:
            (d / cdir.name).mkdir()
            for f in sorted(cdir.iterdir())[:8]:
                Image.open(f).convert("RGB").resize((64, 64)).save(d / cdir.name / f.name)
    else:
        import numpy as np

        rng = np.random.default_rng(0)
        for c in range(6):
            (d / f"class_{c}").mkdir()
            for i in range(8):
                arr = (rng.random((64, 64, 3)) * 60 + c * 30).astype("uint8")
                Image.fromarray(arr).save(d / f"class_{c}" / f"{i}.png")
    return d


@pytest.fixture(scope="session")
def two_worlds(tmp_path_factory):
    """Two stores of one encoder (one synthetic feature space) with disjoint classes, and a
    'shifted' copy of some of the first store's classes (other order, noisier rows)."""
    import numpy as np

    from fskd.store import FeatureStore
    from fskd.store.synthetic import synthetic_features

    d = tmp_path_factory.mktemp("worlds")
    splits, text = synthetic_features(n_classes=20, joint=True, seed=4)
    enc = {"spec": "synthetic-features:joint", "joint": True}

    def part(classes, name, noise=0.0, order=None):
        order = list(classes) if order is None else order
        remap = {c: i for i, c in enumerate(order)}
        rng = np.random.default_rng(0)
        out = {}
        for s, (x, y) in splits.items():
            m = np.isin(y, order)
            xs = x[m] + noise * rng.normal(size=x[m].shape).astype(np.float32)
            out[s] = (xs, np.array([remap[c] for c in y[m]]))
        n = len(order)
        return str(
            FeatureStore.from_arrays(
                d / f"{name}.zarr",
                out,
                [f"class {c}" for c in order],
                {"base": list(range(n // 2)), "val": [n // 2], "novel": list(range(n // 2 + 1, n))},
                text_embeddings=text[order],
                encoder=enc,
                dataset=name,
                chunk_rows=64,
            ).path
        )

    shifted = part(None, "shifted", noise=0.3, order=[7, 2, 5])
    return part(range(10), "a"), part(range(10, 20), "b"), shifted


def noise_images(root: Path, classes: int, per_class: int, size: int) -> Path:
    """A class-per-folder dataset of seeded random PNGs (``c0/0.png``...): fast and deterministic."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(root / f"c{c:02d}" / f"{i}.png")
    return root


def tinted_images(root: Path, classes: int, per_class: int, size: int) -> Path:
    """The fault batteries' dataset: ``class_<c>/<i>.png`` of seeded noise tinted by class (so the
    classes are separable): fast and deterministic."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray((rng.random((size, size, 3)) * 80 + c * 25).astype("uint8")).save(
                root / f"class_{c}" / f"{i}.png"
            )
    return root


# -- object storage: a real S3-API server (moto) on 127.0.0.1 for the whole session ----------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "fskd-test",
    "AWS_SECRET_ACCESS_KEY": "fskd-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    # never look for credentials on a metadata service or in the user's files
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/fskd-test",
    "AWS_CONFIG_FILE": "/nonexistent/fskd-test",
}


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """``http://127.0.0.1:PORT`` of a moto S3 server started for this session (``moto[server]``,
    a dev dependency; CI installs it, so there it is required)."""
    import socket
    import subprocess
    import sys
    import time

    try:
        import moto.server  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("moto[server] is not installed (pip install -e '.[dev]')")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"the moto S3 server exited: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("the moto S3 server did not listen within 30 s")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch, request):
    """A fresh bucket on the session's S3 server, with the environment pointing at it:
    returns ``s3://BUCKET``. Subprocesses inherit the environment."""
    import re
    import uuid

    from fskd.store import location

    for k, v in {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", location.OPTIONS_ENV, location.REQUESTS_ENV):
        monkeypatch.delenv(k, raising=False)
    location.configure(None)
    import fsspec

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(name)
    yield f"s3://{name}"
    location.configure(None)
