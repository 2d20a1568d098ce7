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
    st = FeatureStore.from_arrays(
        path,
        {"train": (x, y), "test": (x[:10], y[:10])},
        [f"c{i}" for i in range(5)],
        {"base": [0, 1], "val": [2], "novel": [3, 4]},
        text_embeddings=rng.normal(size=(5, 3)).astype(np.float32),
        dtype=dtype,
        chunk_rows=chunk_rows,
    )
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


def test_take_reads_rows_in_any_order_and_only_their_chunks(tmp_path, monkeypatch):
    st, x, y = _store(tmp_path / "s.zarr")  # 50 rows in chunks of 8
    rows = np.array([41, 3, 3, 17, 49, 0])
    np.testing.assert_allclose(st.take("train", rows), x[rows], atol=1e-2)
    reads = []
    orig = FeatureStore._read
    monkeypatch.setattr(
        FeatureStore, "_read", lambda self, s, n, sel, c=None: reads.append((s, n, c)) or orig(self, s, n, sel, c)
    )
    st.take("train", np.array([17, 16, 20]))  # rows of chunk 2 only
    assert reads == [("train", "features", 2)]
    assert st.take("train", np.array([], int)).shape == (0, 6)
    with pytest.raises(IndexError, match="outside train"):
        st.take("train", np.array([50]))
    np.testing.assert_array_equal(st.valid_rows("train", [3]), np.flatnonzero(y == 3))


def test_allway_shots_read_by_row_equal_the_gathered_ones(tmp_path):
    """The all-way shots and the CoOp validation rows, sampled on labels and read by row, are the
    rows a gather of the whole split followed by the same sampling gives."""
    from fskd.store import sampling

    st, x, y = _store(tmp_path / "s.zarr", n=200, chunk_rows=16)
    st2 = FeatureStore.from_arrays(
        tmp_path / "v.zarr",
        {"train": (x, y), "val": (x[:100], y[:100])},
        [f"c{i}" for i in range(5)],
        {"base": [0, 1], "val": [2], "novel": [3, 4]},
        dtype="float16",
        chunk_rows=16,
    )
    for seed in (1, 2):
        fx, fy, classes = sampling.allway_shots(st2, 4, seed)
        gx, gy = st2.gather(None, ["train"])
        rows = sampling.sample_shots(gy, np.unique(gy), 4, seed).reshape(-1)
        np.testing.assert_array_equal(fx, gx[rows])
        np.testing.assert_array_equal(fy, gy[rows])
        vx, vy = sampling.allway_val(st2, classes, 4, seed, "few-shot-val")
        hx, hy = st2.gather(classes, ["val"])
        keep = sampling.validation_rows(hy, classes, 4, seed, "few-shot-val")
        np.testing.assert_array_equal(vx, hx[keep])
        np.testing.assert_array_equal(vy, hy[keep])


def test_gather_max_per_class_keeps_a_fixed_subset(tmp_path):
    st, x, y = _store(tmp_path / "s.zarr", n=200, chunk_rows=16)  # 40 train + 2 test rows... per class
    fx, fy = st.gather([1, 2], max_per_class=10)
    assert np.bincount(fy, minlength=5)[[1, 2]].tolist() == [10, 10]
    gx, gy = st.gather([1, 2], max_per_class=10)
    np.testing.assert_array_equal(fx, gx)  # the same rows every call
    ax, ay = st.gather([1, 2])
    rows = {tuple(r) for r in ax}
    assert all(tuple(r) in rows for r in fx)  # a subset of the class's rows
    bx, by = st.gather([1, 2], max_per_class=10_000)  # a cap above the count changes nothing
    np.testing.assert_array_equal(bx, ax)
