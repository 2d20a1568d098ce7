"""`fskd extract`: the store it writes, reuse, resume after SIGKILL, torchrun shards, bad input."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from fskd import api
from fskd.cli import app
from fskd.config import ExtractConfig
from fskd.errors import DatasetError, StoreError
from fskd.store import FeatureStore
from tests.conftest import noise_images

runner = CliRunner()


def _cfg(root, store, encoder="synthetic:16", **kw):
    return ExtractConfig(
        dataset="folder", root=str(root), encoder=encoder, store=str(store), workers=0, batch_size=4, chunk_rows=8, **kw
    )


def test_cli_extract_writes_a_complete_store(image_folder, tiny_clip_dir, tmp_path):
    store = tmp_path / "tiny.zarr"
    res = runner.invoke(
        app,
        [
            "extract",
            "folder",
            "--root",
            str(image_folder),
            "--store",
            str(store),
            "--encoder",
            f"openclip:local-dir:{tiny_clip_dir}",
            "--workers",
            "0",
            "--chunk-rows",
            "8",
            "--sample-split",
            "0.5,0.25,0.25",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "encoded 48 images" in res.output
    st = FeatureStore.open(store)
    assert st.is_complete() and st.joint and st.dim == 32
    assert sum(st.n_rows(s) for s in st.splits) == 48
    ids = np.concatenate([st.sample_ids(s) for s in st.splits])
    assert len(set(ids)) == 48 and all((image_folder / i).exists() for i in ids)
    assert st.text_embeddings().shape == (6, 32)
    np.testing.assert_allclose(np.linalg.norm(st.text_embeddings(), axis=1), 1.0, atol=1e-5)
    feats = np.concatenate([st.features(s) for s in st.splits])
    assert np.isfinite(feats).all() and feats.std() > 0
    assert st.attrs["config"]["encoder"] == f"openclip:local-dir:{tiny_clip_dir}"
    assert st.attrs["sample_split"]["sizes"] == {"train": 24, "val": 12, "test": 12}
    # the same command again re-encodes nothing
    res = runner.invoke(
        app,
        [
            "extract",
            "folder",
            "--root",
            str(image_folder),
            "--store",
            str(store),
            "--encoder",
            f"openclip:local-dir:{tiny_clip_dir}",
            "--workers",
            "0",
            "--chunk-rows",
            "8",
            "--sample-split",
            "0.5,0.25,0.25",
        ],
    )
    assert res.exit_code == 0 and "nothing re-encoded" in res.output


def test_existing_store_from_another_encoder_is_untouched(image_folder, tmp_path):
    store = tmp_path / "s.zarr"
    api.extract(_cfg(image_folder, store))
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    with pytest.raises(StoreError, match=r"extracted with encoder 'synthetic:16', not 'synthetic:8'.*untouched"):
        api.extract(_cfg(image_folder, store, encoder="synthetic:8"))
    with pytest.raises(StoreError, match="different inputs.*class_split"):
        api.extract(_cfg(image_folder, store, class_ratio=(0.5, 0.0, 0.5)))
    after = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    assert before == after
    res = runner.invoke(
        app, ["extract", "folder", "--root", str(image_folder), "--store", str(store), "--encoder", "synthetic:8"]
    )
    assert res.exit_code == 2 and "error: " in res.output and "untouched" in res.output


def test_retrained_checkpoint_at_the_same_path_is_not_reused(image_folder, tmp_path):
    import torch

    from fskd.encoders import build_encoder

    weights = tmp_path / "w.pth"
    torch.save(build_encoder("timm:resnet10t").model.state_dict(), weights)
    spec = f"timm:resnet10t:{weights}"
    api.extract(_cfg(image_folder, tmp_path / "s.zarr", encoder=spec))
    assert api.extract(_cfg(image_folder, tmp_path / "s.zarr", encoder=spec)).reused
    state = torch.load(weights)
    state["conv1.0.weight"] += 1.0  # "retrained"
    torch.save(state, weights)
    with pytest.raises(StoreError, match="different inputs.*encoder_weights"):
        api.extract(_cfg(image_folder, tmp_path / "s.zarr", encoder=spec))


def test_corrupt_image_fails_naming_the_file_or_is_skipped(image_folder, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(image_folder, root)
    bad = sorted((root / sorted(os.listdir(root))[2]).iterdir())[1]
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=f"cannot read image .*{bad.name}.*--skip-bad"):
        api.extract(_cfg(root, tmp_path / "a.zarr"))
    r = api.extract(_cfg(root, tmp_path / "b.zarr", skip_bad=True))
    skipped = [i for ids in r.skipped.values() for i in ids]
    assert skipped == [str(bad.relative_to(root))]
    st = FeatureStore.open(tmp_path / "b.zarr")
    x, y = st.gather()
    assert len(y) == 47 and (y >= 0).all()


def test_missing_root_and_unknown_names(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        api.extract(_cfg(tmp_path / "missing", tmp_path / "s.zarr"))
    res = runner.invoke(app, ["extract", "nosuch", "--store", str(tmp_path / "s.zarr")])
    assert res.exit_code == 2 and "folder" in res.output
    res = runner.invoke(
        app,
        ["extract", "folder", "--root", str(tmp_path), "--store", str(tmp_path / "s.zarr"), "--encoder", "nosuch:1"],
    )
    assert res.exit_code == 2
    assert not (tmp_path / "s.zarr").exists()


def _many_images(root: Path, classes: int = 10, per_class: int = 16) -> Path:
    return noise_images(root, classes, per_class, 96)


def _extract_cmd(root, store, *extra):
    return [
        sys.executable,
        "-m",
        "fskd",
        "extract",
        "folder",
        "--root",
        str(root),
        "--store",
        str(store),
        "--encoder",
        "timm:resnet18",
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--chunk-rows",
        "8",
        *extra,
    ]


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    root = _many_images(tmp_path / "imgs")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref.zarr"
    subprocess.run(_extract_cmd(root, ref), check=True, env=env, capture_output=True)
    store = tmp_path / "killed.zarr"
    proc = subprocess.Popen(_extract_cmd(root, store), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if store.exists():
            try:
                g = zarr.open_group(str(store), mode="r")
                done = sum(int(np.asarray(g[s]["written"][:]).sum()) for s in g.attrs["splits"])
            except Exception:
                done = 0
            if done >= 3:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_at = done
                break
        time.sleep(0.01)
    assert killed_at is not None, "extraction finished before it could be killed"
    partial = FeatureStore.open(store)
    assert not partial.is_complete()
    with pytest.raises(StoreError, match="incomplete"):
        partial.check_complete()
    out = subprocess.run(_extract_cmd(root, store), check=True, env=env, capture_output=True, text=True)
    resumed, full = FeatureStore.open(store), FeatureStore.open(ref)
    assert resumed.is_complete()
    encoded = int(out.stdout.split("encoded ")[1].split(" ")[0])
    assert encoded < 160  # only the chunks that were not written
    for s in full.splits:
        np.testing.assert_array_equal(resumed.features(s), full.features(s))
        np.testing.assert_array_equal(resumed.labels(s), full.labels(s))
        np.testing.assert_array_equal(resumed.sample_ids(s), full.sample_ids(s))


def test_torchrun_two_ranks_equal_single_process(image_folder, tmp_path, tiny_clip_dir):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this python")
    spec = f"openclip:local-dir:{tiny_clip_dir}"
    single = tmp_path / "single.zarr"
    api.extract(
        ExtractConfig(
            dataset="folder",
            root=str(image_folder),
            encoder=spec,
            store=str(single),
            workers=0,
            batch_size=4,
            chunk_rows=4,
            device="cpu",
        )
    )
    multi = tmp_path / "multi.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "fskd",
            "extract",
            "folder",
            "--root",
            str(image_folder),
            "--store",
            str(multi),
            "--encoder",
            spec,
            "--workers",
            "0",
            "--batch-size",
            "4",
            "--chunk-rows",
            "4",
            "--device",
            "cpu",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 ranks" in out.stdout
    a, b = FeatureStore.open(single), FeatureStore.open(multi)
    assert b.is_complete()
    for s in a.splits:
        np.testing.assert_allclose(a.features(s), b.features(s), atol=2e-3)
        np.testing.assert_array_equal(a.labels(s), b.labels(s))
    np.testing.assert_allclose(a.text_embeddings(), b.text_embeddings(), atol=1e-5)


def test_torchrun_two_ranks_with_views_equal_single_process(image_folder, tmp_path):
    """--augment-views under torchrun: rank 0 creates the views group, the view chunks are split over
    the ranks, and the result equals a single process's (views and splits)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this python")
    args = [
        "extract",
        "folder",
        "--root",
        str(image_folder),
        "--encoder",
        "synthetic:16",
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--chunk-rows",
        "2",
        "--device",
        "cpu",
        "--augment-views",
        "3",
        "--augment-shots",
        "1",
        "--augment-seeds",
        "1,2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, multi = tmp_path / "single.zarr", tmp_path / "multi.zarr"
    out = subprocess.run(
        [sys.executable, "-m", "fskd", *args, "--store", str(single)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    out = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "fskd", *args, "--store", str(multi)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    a, b = FeatureStore.open(single), FeatureStore.open(multi)
    assert b.views_written().all() and len(b.views_written()) >= 2  # several view chunks: both ranks wrote some
    np.testing.assert_array_equal(a.view_rows(), b.view_rows())
    va, _ = a.take_views(a.view_rows())
    vb, _ = b.take_views(b.view_rows())
    np.testing.assert_array_equal(va, vb)
    for s in a.splits:
        np.testing.assert_array_equal(a.features(s), b.features(s))
