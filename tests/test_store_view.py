"""StoreView: what a protocol lets a method see of a store, read-only; a store never changes."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from fskd import api
from fskd.config import AdaptConfig, EvalConfig
from fskd.store import FeatureStore, StoreView, class_split_override
from fskd.store.synthetic import make_synthetic_store

SPLIT = {"base": [0, 1, 2, 3, 4, 5], "val": [], "novel": [6, 7, 8, 9, 10, 11], "source": "test halves"}


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return str(make_synthetic_store(tmp_path_factory.mktemp("view") / "s.zarr", n_classes=12, joint=True, seed=3).path)


@pytest.fixture
def store(path):
    return FeatureStore.open(path)


def _masks(store, p=0.4, seed=0):
    rng = np.random.default_rng(seed)
    return {s: rng.random(store.n_rows(s)) < p for s in store.splits}


def _same_gather(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_a_view_without_restriction_reads_as_the_store(store):
    v = store.view()
    assert dict(v.attrs) == store.attrs and not v.restricted and v.description is None
    for s in store.splits:
        np.testing.assert_array_equal(v.labels(s), store.labels(s))
        np.testing.assert_array_equal(v.valid_rows(s, [1, 2]), store.valid_rows(s, [1, 2]))
        np.testing.assert_array_equal(v.take(s, np.array([3, 0, 3])), store.take(s, np.array([3, 0, 3])))
    _same_gather(v.gather(), store.gather())
    _same_gather(v.gather([0, 5], None, 3), store.gather([0, 5], None, 3))
    np.testing.assert_array_equal(v.mean([0, 1]), store.mean([0, 1]))
    assert (v.path, v.fingerprint, v.dim, v.num_classes, v.class_names, v.splits, v.joint) == (
        store.path,
        store.fingerprint,
        store.dim,
        store.num_classes,
        store.class_names,
        store.splits,
        store.joint,
    )
    np.testing.assert_array_equal(v.text_embeddings(), store.text_embeddings())


def test_row_masks_hide_rows_from_every_label_reader(store):
    keep = _masks(store)
    v = store.view(keep=keep, default_splits=["train"], description="only some rows")
    assert v.restricted and v.description == "only some rows" and v.attrs["row_restriction"] == "only some rows"
    assert v.default_splits == ["train"]
    for s in store.splits:
        raw = store.labels(s)
        want = np.where(keep[s], raw, -1)
        np.testing.assert_array_equal(v.labels(s), want)
        np.testing.assert_array_equal(v.valid_rows(s), np.flatnonzero(want >= 0))
        chunks = list(v.iter_chunks(s))
        np.testing.assert_array_equal(np.concatenate([lab for _, _, lab in chunks]), want)
        np.testing.assert_array_equal(np.concatenate([f for _, f, _ in chunks]), store.features(s))
    # a read naming no split reads the default ones, the visible rows only
    x, y = v.gather()
    rows = np.flatnonzero(keep["train"] & (store.labels("train") >= 0))
    np.testing.assert_array_equal(x, store.take("train", rows))
    np.testing.assert_array_equal(y, store.labels("train")[rows])
    x, y = v.gather([1, 2], ["train", "test"], 2)
    assert set(np.unique(y)) <= {1, 2} and np.bincount(y).max() <= 2
    test_rows = np.flatnonzero(keep["test"] & np.isin(store.labels("test"), [0, 1]))
    np.testing.assert_allclose(v.mean([0, 1], ["test"]), store.take("test", test_rows).mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mask has 3 rows"):
        store.view(keep={"train": np.ones(3, bool)})


def test_class_split_override(store, path):
    v = store.view(class_split=SPLIT)
    assert v.class_split("novel") == SPLIT["novel"] and v.attrs["class_split"] == SPLIT
    assert v.summary()["class_split"] == {"base": 6, "val": 0, "novel": 6}
    assert store.class_split("novel") != SPLIT["novel"]  # the store keeps its own
    _same_gather(v.gather(v.class_split("base")), store.gather(SPLIT["base"]))
    ratio = class_split_override(store, None, (0.5, 0.25, 0.25), 7)
    assert ratio is not None and ratio["source"].startswith("override: ") and class_split_override(store) is None
    assert sorted(ratio["base"] + ratio["val"] + ratio["novel"]) == list(range(12))


def test_a_view_of_a_view_composes(store):
    a, b = _masks(store, seed=1), _masks(store, seed=2)
    v1 = store.view(class_split=SPLIT, keep=a, default_splits=["train"], description="first")
    v2 = v1.view(keep={"train": b["train"]})
    assert v2.class_split("base") == SPLIT["base"] and v2.default_splits == ["train"] and v2.description == "first"
    np.testing.assert_array_equal(v2.labels("train"), np.where(a["train"] & b["train"], store.labels("train"), -1))
    np.testing.assert_array_equal(v2.labels("test"), v1.labels("test"))
    split2 = {**SPLIT, "val": [0], "base": SPLIT["base"][1:]}
    v3 = StoreView.of(v2, class_split=split2, default_splits=["test"], description="second")
    assert v3.class_split("val") == [0] and v3.default_splits == ["test"] and v3.attrs["row_restriction"] == "second"
    _same_gather(v3.gather(), v2.gather(None, ["test"]))
    assert v1.class_split("val") == []  # the inner view is unchanged


def test_a_view_is_read_only(store):
    v = store.view(keep={"train": np.ones(store.n_rows("train"), bool)})
    with pytest.raises(AttributeError):
        v.attrs = {}  # type: ignore[misc]
    with pytest.raises(AttributeError):
        v._keep = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        v.attrs["class_split"] = SPLIT  # type: ignore[index]
    with pytest.raises(ValueError):
        v.row_mask("train")[0] = False  # type: ignore[index]
    for write in ("write_chunk", "mark_unwritten", "create_views", "override_class_split", "restrict_rows"):
        assert not hasattr(v, write)
    assert not hasattr(store, "override_class_split") and not hasattr(store, "restrict_rows")


def _snapshot(store):
    return copy.deepcopy(store.attrs), {k: v for k, v in vars(store).items() if k != "attrs"}


def test_a_fit_and_an_evaluation_leave_the_store_unchanged(path, tmp_path, monkeypatch):
    opened = []
    real_open = FeatureStore.open.__func__

    def recording_open(cls, *args, **kwargs):
        st = real_open(cls, *args, **kwargs)
        opened.append((st, _snapshot(st)))
        return st

    monkeypatch.setattr(FeatureStore, "open", classmethod(recording_open))
    b2n = api.adapt(
        AdaptConfig(store=path, method="prototype", shots=4, seed=1, out=str(tmp_path / "b2n"), base_to_new=True),
        progress=None,
    )
    api.evaluate(EvalConfig(store=path, state=b2n.out, protocol="base-to-new", shots=4, seeds=(1,)))
    fit = api.adapt(
        AdaptConfig(
            store=path, method="prototype", shots=2, out=str(tmp_path / "ratio"), class_ratio=(0.5, 0.25, 0.25)
        ),
        progress=None,
    )
    api.evaluate(EvalConfig(store=path, state=fit.out, shots=2, way=3, episodes=5))
    api.evaluate(EvalConfig(store=path, protocol="base-to-new", classifier="prototype", shots=2, seeds=(1,)))
    assert len(opened) >= 5
    for st, (attrs, rest) in opened:
        assert st.attrs == attrs and "row_restriction" not in st.attrs
        assert {k: v for k, v in vars(st).items() if k != "attrs"} == rest
