"""The Zarr feature store: schema validation, chunked reads, errors that name the array."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from fskd.errors import StoreError
from fskd.store import FeatureStore


def _store(path, n=50, dim=6, dtype="float16", chunk_rows=8):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = np.arange(n) % 5
    st = FeatureStore.from_arrays(path, {"train": (x, y), "test": (x[:10], y[:10])}, [f"c{i}" for i in range(5)],
                                  {"base": [0, 1], "val": [2], "novel": [3, 4]},
                                  text_embeddings=rng.normal(size=(5, 3)).astype(np.float32), dtype=dtype,
                                  chunk_rows=chunk_rows)
    return st, x, y


def test_roundtrip_float16_on_disk_float32_in_compute(tmp_path):
    st, x, y = _store(tmp_path / "s.zarr")
    assert zarr.open_group(str(tmp_path / "s.zarr"))["train/features"].dtype == np.float16
    f = st.features("train")
    assert f.dtype == np.float32 and np.abs(f - x).max() < 1e-2
    np.testing.assert_array_equal(st.labels("train"), y)
    assert st.is_complete() and st.written("train").shape == (7,)
    chunks = list(st.iter_chunks("train"))
    assert [c[0] for c in chunks] == list(range(0, 50, 8)) and sum(len(c[1]) for c in chunks) == 50
    fx, fy = st.gather([3, 4])
    assert set(fy) == {3, 4} and len(fy) == 20 + 4
    np.testing.assert_allclose(st.mean([0, 1], ["train"]), x[np.isin(y, [0, 1])].mean(0), atol=1e-2)
    assert st.text_embeddings().shape == (5, 3)


def test_open_reports_missing_and_mismatched_arrays(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        FeatureStore.open(tmp_path / "nope.zarr")
    _store(tmp_path / "a.zarr")
    g = zarr.open_group(str(tmp_path / "a.zarr"), mode="r+")
    del g["train"]["labels"]
    with pytest.raises(StoreError, match="train/labels is missing"):
        FeatureStore.open(tmp_path / "a.zarr")
    _store(tmp_path / "b.zarr")
    g = zarr.open_group(str(tmp_path / "b.zarr"), mode="r+")
    g.attrs["schema_version"] = 99
    with pytest.raises(StoreError, match="schema version 99"):
        FeatureStore.open(tmp_path / "b.zarr")


def test_incomplete_store_says_how_to_resume(tmp_path):
    st, _, _ = _store(tmp_path / "s.zarr")
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    g["train"]["written"][2] = False
    with pytest.raises(StoreError, match="run the same `fskd extract` again to resume"):
        FeatureStore.open(tmp_path / "s.zarr").check_complete()


def test_create_refuses_to_overwrite(tmp_path):
    _store(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="already exists"):
        _store(tmp_path / "s.zarr")
