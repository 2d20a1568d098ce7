"""The CLIP few-shot protocols: CoOp's few-shot validation rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fskd import api
from fskd.config import AdaptConfig
from fskd.errors import ConfigError
from fskd.store.sampling import sample_shots, validation_rows


def test_few_shot_validation_takes_min_k_4_per_class():
    labels = np.repeat(np.arange(5), [10, 10, 3, 10, 10])
    classes = np.array([0, 1, 2, 3])  # class 4 is not evaluated
    for k, want in [(1, [1, 1, 1, 1]), (2, [2, 2, 2, 2]), (4, [4, 4, 3, 4]), (16, [4, 4, 3, 4])]:
        rows = validation_rows(labels, classes, k, seed=1, rule="few-shot-val")
        assert np.bincount(labels[rows], minlength=5).tolist() == want + [0]
        assert (np.diff(rows) > 0).all()
    a, b = (validation_rows(labels, classes, 4, s, "few-shot-val") for s in (1, 2))
    assert not np.array_equal(a, b)  # seeded: another seed, other rows
    np.testing.assert_array_equal(a, validation_rows(labels, classes, 4, 1, "few-shot-val"))
    assert len(validation_rows(labels, classes, 0, 1, "few-shot-val")) == 0
    np.testing.assert_array_equal(validation_rows(labels, classes, 1, 1, "full-val"), np.flatnonzero(labels < 4))
    # the train shots of seed s do not move when validation rows are drawn
    np.testing.assert_array_equal(sample_shots(labels, classes, 2, 1), sample_shots(labels, classes, 2, 1))


def test_fit_records_the_validation_rule(synthetic_store, tmp_path):
    store = str(synthetic_store(n_classes=10).path)
    few = api.adapt(AdaptConfig(store=store, method="linear-probe", shots=2, out=str(tmp_path / "a")), progress=None)
    full = api.adapt(
        AdaptConfig(store=store, method="linear-probe", shots=2, out=str(tmp_path / "b"), hp_selection="full-val"),
        progress=None,
    )
    task_few = few.metrics["allway.val_task"]
    assert "min(K, 4) = 2 per class of 10 classes" in task_few and "20 val-split rows" in task_few
    assert "full val split" in full.metrics["allway.val_task"]
    assert any("min(K, 4)" in str(v) for v in few.selected_on.values())
    with pytest.raises(ConfigError, match="--hp-selection must be one of few-shot-val, full-val, none"):
        AdaptConfig(store=store, method="linear-probe", hp_selection="all")


#: methods whose heads transfer to new classes; ``NAME:RECIPE``: that recipe of the method
TRANSFER = ["zero-shot", "lp++", "tip-adapter", "tip-adapter-f", "fma", "fma:lite"]


def _fit_b2n(store, method, out, shots=4, seed=1):
    from fskd.config import AlignConfig
    from fskd.methods import METHODS

    method, _, recipe = method.partition(":")
    cfg = dict(
        store=store,
        method=method,
        shots=shots,
        seed=seed,
        out=str(out),
        base_to_new=True,
        options={**({"iters": 150} if method.startswith("fma") else {}), **({"recipe": recipe} if recipe else {})},
    )
    if METHODS.get(method).kind == "align":
        return api.align(AlignConfig(**cfg), progress=None)
    return api.adapt(AdaptConfig(**cfg), progress=None)


@pytest.fixture(scope="module")
def joint_store(tmp_path_factory):
    from fskd.store.synthetic import make_synthetic_store

    return str(make_synthetic_store(tmp_path_factory.mktemp("b2n") / "j.zarr", n_classes=12, joint=True, seed=2).path)


@pytest.mark.parametrize("method", ["prototype", "linear-probe", "residual-adapter", "syntrans", *TRANSFER])
def test_base_to_new_fits_on_the_base_half_and_transfers_where_it_can(method, joint_store, tmp_path):
    from fskd.config import EvalConfig
    from fskd.methods import METHODS
    from fskd.methods.base import load_state

    r = _fit_b2n(joint_store, method, tmp_path / "s")
    st = load_state(r.out)
    assert st.hparams["class_split"] == {"base": list(range(6)), "val": [], "novel": list(range(6, 12))}
    assert "hidden" in st.metrics["base_to_new"]
    ev = api.evaluate(EvalConfig(store=joint_store, state=r.out, protocol="base-to-new", shots=4, seeds=(1,)))
    assert ev.protocol == "base-to-new" and 100 / 6 < ev.base <= 100
    if METHODS.get(method.partition(":")[0]).transfers_to_new_classes:
        assert ev.new is not None and np.isfinite(ev.new) and ev.new > 100 / 6  # above chance on unseen classes
        assert ev.hm == pytest.approx(2 * ev.base * ev.new / (ev.base + ev.new), abs=0.01)
    else:
        assert ev.new is None and ev.hm is None and any("no shot of" in w for w in ev.warnings)
    assert "Base-to-new (CoCoOp)" in ev.protocol_text()


def test_base_to_new_fit_never_sees_the_new_half(joint_store, tmp_path):
    from fskd.protocols.base_to_new import restrict_for_fit
    from fskd.store import FeatureStore

    st = FeatureStore.open(joint_store)
    st = restrict_for_fit(st, 4, 1, "few-shot-val")
    x, y = st.gather()  # what a method reads by default: the base shots only
    assert set(np.unique(y)) == set(range(6)) and np.bincount(y).tolist() == [4] * 6
    _, yv = st.gather(None, ["val"])
    assert np.bincount(yv).tolist() == [4] * 6
    assert len(st.gather(None, ["test"])[1]) == 0 and len(st.gather(range(6, 12), ["train", "val", "test"])[1]) == 0
    # the K shots a base-to-new fit sees are the ones the evaluation draws for seed 1
    full = FeatureStore.open(joint_store)
    from fskd.store.sampling import sample_shots

    _, ty = full.gather(None, ["train"])
    rows = sample_shots(ty, np.arange(6), 4, 1).reshape(-1)
    np.testing.assert_array_equal(np.sort(full.gather(None, ["train"])[0][rows], axis=0), np.sort(x, axis=0))


def test_base_to_new_refusals(joint_store, tmp_path):
    from fskd.config import EvalConfig
    from fskd.errors import EvaluationError

    allway = api.adapt(
        AdaptConfig(store=joint_store, method="zero-shot", shots=4, out=str(tmp_path / "a")), progress=None
    )
    with pytest.raises(EvaluationError, match="fitted on every class, the new half included"):
        api.evaluate(EvalConfig(store=joint_store, state=allway.out, protocol="base-to-new", shots=4, seeds=(1,)))
    b2n = _fit_b2n(joint_store, "zero-shot", tmp_path / "b")
    with pytest.raises(EvaluationError, match="evaluate it with --protocol base-to-new"):
        api.evaluate(EvalConfig(store=joint_store, state=b2n.out, protocol="allway", shots=4, seeds=(1,)))
    with pytest.raises(EvaluationError, match="--shots 4 --seeds 1"):
        api.evaluate(EvalConfig(store=joint_store, state=b2n.out, protocol="base-to-new", shots=4, seeds=(1, 2)))
    with pytest.raises(ConfigError, match="drop --class-split"):
        api.adapt(
            AdaptConfig(
                store=joint_store,
                method="zero-shot",
                shots=4,
                out=str(tmp_path / "c"),
                base_to_new=True,
                class_ratio=(0.5, 0.25, 0.25),
            ),
            progress=None,
        )
    # no state: the text head transfers, prototypes give base only
    t = api.evaluate(EvalConfig(store=joint_store, protocol="base-to-new", classifier="text", shots=4))
    p = api.evaluate(EvalConfig(store=joint_store, protocol="base-to-new", classifier="prototype", shots=4))
    assert t.new is not None and p.new is None and p.base is not None and len(t.per_seed) == 3


@pytest.mark.parametrize("method", ["zero-shot", "lp++", "tip-adapter", "fma"])
def test_cross_dataset_transfers_to_another_stores_classes(method, two_worlds, tmp_path):
    from fskd.config import AlignConfig, EvalConfig

    a, b, _ = two_worlds
    kw = dict(store=a, method=method, shots=4, out=str(tmp_path / "s"))
    r = (
        api.align(AlignConfig(**kw, options={"iters": 150}), progress=None)
        if method == "fma"
        else api.adapt(AdaptConfig(**kw), progress=None)
    )
    ev = api.evaluate(EvalConfig(store=b, state=r.out, protocol="cross-dataset"))
    assert ev.protocol == "cross-dataset" and ev.classes == 10 and ev.source_store == str(Path(a).absolute())
    assert ev.accuracy > 30  # chance is 10%: the head classifies classes it never saw, from their text
    assert "none of which it learned" in ev.protocol_text()


def test_cross_dataset_and_domain_shift_refusals(two_worlds, synthetic_store, tmp_path):
    from fskd.config import EvalConfig
    from fskd.errors import EvaluationError

    a, b, _ = two_worlds
    proto = api.adapt(AdaptConfig(store=a, method="prototype", shots=4, out=str(tmp_path / "p")), progress=None)
    with pytest.raises(
        EvaluationError,
        match="cannot classify classes it has no shot of.*methods that can: ape, ape-t, clap, clip-adapter, coop, cross-modal-lp, fma",
    ):
        api.evaluate(EvalConfig(store=b, state=proto.out, protocol="cross-dataset"))
    other = str(synthetic_store(n_classes=6, joint=False).path)  # another encoder
    with pytest.raises(EvaluationError, match="needs the same encoder"):
        api.evaluate(EvalConfig(store=other, state=proto.out, protocol="cross-dataset"))
    with pytest.raises(EvaluationError, match="not classes of"):
        api.evaluate(EvalConfig(store=b, state=proto.out, protocol="domain-shift"))
    with pytest.raises(EvaluationError, match="pass --state"):
        api.evaluate(EvalConfig(store=b, protocol="domain-shift"))


@pytest.mark.parametrize("method", ["prototype", "tip-adapter"])
def test_domain_shift_maps_classes_by_key_and_scores_among_them(method, two_worlds, tmp_path):
    import torch

    from fskd.config import EvalConfig
    from fskd.methods import METHODS, load_state
    from fskd.protocols.allway import run_allway
    from fskd.store import FeatureStore

    a, _, shifted = two_worlds
    r = api.adapt(AdaptConfig(store=a, method=method, shots=4, out=str(tmp_path / "s")), progress=None)
    ev = api.evaluate(EvalConfig(store=shifted, state=r.out, protocol="domain-shift"))
    assert ev.classes == 3 and ev.protocol == "domain-shift"
    # oracle: the same head fitted on the source's seed-1 shots, scoring the shifted rows mapped to
    # the source's classes 7, 2, 5 (the target lists them in that order)
    src, tgt = FeatureStore.open(a), FeatureStore.open(shifted)
    st = load_state(r.out)
    head = METHODS.get(method)().head(st, src, torch.device("cpu"))
    tx, ty = src.gather(None, ["train"])
    qx, qy = tgt.gather(None, ["test"])
    scores = run_allway(
        torch.from_numpy(tx), ty, torch.from_numpy(qx), np.array([7, 2, 5])[qy], np.array([2, 5, 7]), 4, (1,), head
    )
    assert ev.accuracy == pytest.approx(100 * scores.top1[0], abs=1e-3)
    assert ev.accuracy > 100 / 3


def test_syntrans_base_to_new_at_one_shot_skips_meta_training(joint_store, tmp_path):
    from fskd.config import EvalConfig

    r = _fit_b2n(joint_store, "syntrans", tmp_path / "s", shots=1)
    assert r.metrics["meta.steps"] == 0 and "single row" in r.metrics["meta.task"]
    ev = api.evaluate(EvalConfig(store=joint_store, state=r.out, protocol="base-to-new", shots=1, seeds=(1,)))
    assert ev.base > 100 / 6 and ev.new is None
