"""The CUDA paths: extraction (autocast, channels-last, pinned memory), distillation (autocast),
flow alignment and the FAISS search on a GPU agree with the CPU runs.

Marked ``gpu`` (``pytest -m gpu``) and skipped without CUDA. ``FSKD_GPU_TEST_DEVICE=cpu`` runs
the same checks against the CPU path, which is how their logic is exercised on machines
without a GPU; the GPU itself has not been available to this project's sessions yet.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fskd import api
from fskd.classifiers.prototype import faiss_nearest
from fskd.config import AlignConfig, DistillConfig, EvalConfig, ExtractConfig
from fskd.methods import load_state
from fskd.store import FeatureStore

from .test_coop import FAST as COOP_FAST
from .test_coop import photo_store  # noqa: F401 (fixture)
from .test_distill import TINY, TINY_OPTS, tiny_images, tiny_teacher_store  # noqa: F401 (fixtures)

DEVICE = os.environ.get("FSKD_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def test_extract_on_the_device_matches_cpu(image_folder, tiny_clip_dir, tmp_path):
    spec = f"openclip:local-dir:{tiny_clip_dir}"
    stores = {}
    for dev in ("cpu", DEVICE):
        path = tmp_path / f"{dev.replace(':', '')}-{len(stores)}.zarr"
        api.extract(
            ExtractConfig(
                dataset="folder",
                root=str(image_folder),
                encoder=spec,
                store=str(path),
                workers=1,
                batch_size=8,
                chunk_rows=16,
                device=dev,
            )
        )
        stores[len(stores)] = FeatureStore.open(path)
    cpu, dev = stores[0], stores[1]
    assert dev.is_complete()
    for split in cpu.splits:
        a, b = cpu.features(split), dev.features(split)
        assert np.isfinite(b).all()
        assert _cos(a, b).min() > 0.99, split  # autocast (float16 / bfloat16) against float32
        np.testing.assert_array_equal(cpu.labels(split), dev.labels(split))


def test_distill_on_the_device(tiny_teacher_store, tmp_path):  # noqa: F811
    out = tmp_path / "student"
    r = api.distill(
        DistillConfig(
            store=tiny_teacher_store,
            student=TINY,
            shots=2,
            epochs=2,
            out=str(out),
            device=DEVICE,
            options=dict(TINY_OPTS),
        )
    )
    state = load_state(r.out)
    log = state.metrics["log"]
    assert [e["epoch"] for e in log] == [1, 2] and all(np.isfinite(e["loss"]) for e in log)
    assert all(torch.isfinite(v).all() for v in state.tensors.values() if v.is_floating_point())


def test_align_on_the_device_matches_cpu(synthetic_store, tmp_path):
    store = synthetic_store(joint=True, n_classes=12, noise=1.2, gap=3.0, seed=3)
    opts = {"width": 64, "depth": 2, "iters": 200, "batch_size": 64, "val_episodes": 50}
    acc = {}
    for dev in ("cpu", DEVICE):
        out = str(tmp_path / f"fma-{len(acc)}")
        api.align(AlignConfig(store=str(store.path), shots=4, steps=(1, 2, 4), out=out, device=dev, options=opts))
        acc[len(acc)] = api.evaluate(
            EvalConfig(store=str(store.path), state=out, protocol="allway", shots=4, seeds=(1,), device=dev)
        ).accuracy
    assert abs(acc[0] - acc[1]) < 5.0, acc  # same data and seed; kernels differ, the result should not


def test_faiss_search_matches_numpy():
    rng = np.random.default_rng(0)
    protos = rng.standard_normal((50, 64)).astype(np.float32)
    queries = rng.standard_normal((5000, 64)).astype(np.float32)
    np.testing.assert_array_equal(faiss_nearest(protos, queries), (queries @ protos.T).argmax(1))


def test_coop_on_the_device_matches_cpu(photo_store, tmp_path):  # noqa: F811
    """Prompt learning under autocast on the device learns the context the CPU run learns: the class
    text features it gives agree (cosine), and so do the all-way accuracies."""
    from fskd.config import AdaptConfig

    text, acc = {}, {}
    for i, dev in enumerate(("cpu", DEVICE)):
        out = str(tmp_path / f"coop-{i}")
        api.adapt(
            AdaptConfig(
                store=str(photo_store.path),
                method="coop",
                shots=2,
                seed=1,
                out=out,
                device=dev,
                options={**COOP_FAST, "n_ctx": 4, "regime": "allway"},
                force=True,
            )
        )
        state = load_state(out)
        text[i] = state.tensors["allway.text"].float().numpy()
        assert np.isfinite(text[i]).all()
        acc[i] = api.evaluate(
            EvalConfig(store=str(photo_store.path), state=out, protocol="allway", shots=2, seeds=(1,), device=dev)
        ).accuracy
    assert _cos(text[0], text[1]).min() > 0.98
    assert abs(acc[0] - acc[1]) < 5.0, acc
