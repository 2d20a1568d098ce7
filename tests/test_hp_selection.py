"""``--hp-selection few-shot-val | full-val | none``: what chooses a fit's hyper-parameters, declared
in the state and the bench tables. ``none`` reads no row of the val split and no row of a val
class (checked on the rows the store hands out), and every method either fits without them,
naming its fixed values, or refuses clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fskd import api
from fskd.config import AdaptConfig, BenchConfig, DistillConfig, EvalConfig
from fskd.errors import ConfigError
from fskd.methods import METHODS, load_state
from fskd.methods.adapt.regimes import FITTED
from fskd.methods.adapt.validation import NO_VALIDATION, VAL_SPLIT, VAL_SPLIT_FEW
from fskd.store import FeatureStore, StoreView
from fskd.store.synthetic import make_synthetic_store
from tests.test_adapt import fast, with_recipes

ADAPT = [m for m in METHODS.names() if METHODS.get(m).kind == "adapt" and not METHODS.get(m).needs_text_encoder]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("hp") / "pair.zarr", joint=False, seed=0)


class ReadLog:
    """The feature rows a fit is handed by the store's reading methods while installed:
    (split, rows) for ``take``, every split's rows of the classes for ``gather`` and ``mean`` (the
    rows they keep), a whole split for ``features`` / ``iter_chunks`` called by a method."""

    READERS = ("gather", "take", "mean", "features", "iter_chunks")

    def __init__(self, monkeypatch) -> None:
        self.reads: list[tuple[str, np.ndarray, str]] = []
        self.depth = 0
        for cls in (FeatureStore, StoreView):  # a fit reads a view of the store (which reads the store)
            for name in self.READERS:
                monkeypatch.setattr(cls, name, self._wrap(name, getattr(cls, name)))

    def _wrap(self, name, orig):
        log = self

        def reader(st, *args, **kw):
            if log.depth == 0:
                log.record(st, name, args, kw)
            log.depth += 1
            try:
                out = orig(st, *args, **kw)
                if name == "iter_chunks":
                    out = list(out)
                return iter(out) if name == "iter_chunks" else out
            finally:
                log.depth -= 1

        return reader

    def record(self, st, name, args, kw) -> None:
        if name == "take":
            split, rows = args[0] if args else kw["split"], np.asarray(args[1] if len(args) > 1 else kw["rows"])
            self.reads.append((split, rows, name))
        elif name in ("features", "iter_chunks"):
            split = args[0] if args else kw["split"]
            self.reads.append((split, np.arange(st.n_rows(split)), name))
        else:  # gather(classes, splits) / mean(classes, splits): the rows of those classes they keep
            classes = args[0] if args else kw.get("classes")
            splits = st._splits_or_default((args[1] if len(args) > 1 else kw.get("splits")) or None)
            for sp in splits:
                lab = st.labels(sp)
                keep = lab >= 0 if classes is None else np.isin(lab, list(classes))
                self.reads.append((sp, np.flatnonzero(keep), name))

    def val_reads(self, st, shots: int) -> list[str]:
        """Validation rows handed out: of the val split, any row not of a base class (every row of
        a base class is the episodic regime's training data); of a val class, any row beyond its K
        all-way train shots (the all-way regime's training data)."""
        val_classes, base = st.class_split("val"), st.class_split("base")
        bad, train_rows = [], set()
        for split, rows, _ in self.reads:
            lab = st.labels(split)[rows]
            of_val = np.isin(lab, val_classes)
            if split == "train":
                train_rows |= set(rows[of_val].tolist())
            elif of_val.any():
                bad.append(f"{split}: {int(of_val.sum())} rows of val classes")
            if split == "val" and not np.isin(lab, base).all():
                bad.append(f"val: {int((~np.isin(lab, base)).sum())} rows of non-base classes")
        if len(train_rows) > shots * len(val_classes):
            bad.append(f"train: {len(train_rows)} rows of val classes, more than their {shots} shots each")
        return bad


@pytest.mark.parametrize("method,recipe", with_recipes(ADAPT))
def test_none_reads_no_validation_row_and_names_its_fixed_values(method, recipe, store, tmp_path, monkeypatch):
    log = ReadLog(monkeypatch)
    out = tmp_path / method
    r = api.adapt(
        AdaptConfig(
            store=str(store.path),
            method=method,
            shots=2,
            seed=1,
            out=str(out),
            device="cpu",
            options=fast(method, **recipe),
            force=True,
            hp_selection="none",
        )
    )
    assert log.val_reads(store, 2) == []
    monkeypatch.undo()
    state = load_state(r.out)
    assert state.hparams["hp_selection"] == "none" and state.config["hp_selection"] == "none"
    # every hyper-parameter says where it came from, and none from validation data
    assert set(state.hparams) <= set(state.selected_on)
    on = {k: str(v) for k, v in state.selected_on.items()}
    assert not any("val split" in v or "val classes" in v or "val-class" in v for v in on.values()), on
    assert not any(k.endswith("val_acc") for k in state.metrics)


def test_validation_policies_read_what_they_say(store, tmp_path, monkeypatch):
    """few-shot-val reads min(K, 4) val rows per class, full-val the whole val split (the all-way
    task's rows, read by row; the episodic regime gathers its val classes whatever the policy)."""
    counts = {}
    for policy in ("few-shot-val", "full-val"):
        log = ReadLog(monkeypatch)
        api.adapt(
            AdaptConfig(
                store=str(store.path),
                method="tip-adapter",
                shots=1,
                seed=1,
                out=str(tmp_path / policy),
                device="cpu",
                force=True,
                hp_selection=policy,
            )
        )
        counts[policy] = len(
            {int(i) for split, rows, how in log.reads if split == "val" and how == "take" for i in rows}
        )
        monkeypatch.undo()
        state = load_state(tmp_path / policy)
        assert state.hparams["hp_selection"] == policy
        assert state.selected_on["allway.alpha"] == "chosen on " + (
            VAL_SPLIT if policy == "full-val" else VAL_SPLIT_FEW
        )
        scored = api.evaluate(
            EvalConfig(store=str(store.path), state=str(tmp_path / policy), protocol="allway", shots=1, seeds=(1,))
        )
        assert scored.hp_selection == policy and scored.to_dict()["hp_selection"] == policy
    train = store.labels("train")
    n_cls = len(np.unique(train[train >= 0]))
    val = store.labels("val")
    assert counts["few-shot-val"] == n_cls * 1  # min(K, 4) = 1 per class
    assert counts["full-val"] == int((val >= 0).sum()) > counts["few-shot-val"]


def test_none_keeps_each_methods_default(store, tmp_path):
    """Tip-Adapter under none: the authors' init alpha = 1, beta = 5.5 (their configs)."""
    api.adapt(
        AdaptConfig(
            store=str(store.path),
            method="tip-adapter",
            shots=2,
            seed=1,
            out=str(tmp_path / "t"),
            device="cpu",
            force=True,
            hp_selection="none",
        )
    )
    state = load_state(tmp_path / "t")
    assert state.hparams["allway.alpha"] == 1.0 and state.hparams["allway.beta"] == 5.5
    assert state.selected_on["allway.alpha"] == NO_VALIDATION


def test_methods_without_a_validation_free_form_refuse(store, tmp_path):
    with pytest.raises(ConfigError, match="fma has no validation-free form"):
        api.align(
            __import__("fskd.config", fromlist=["AlignConfig"]).AlignConfig(
                store=str(store.path), method="fma", shots=2, out=str(tmp_path / "f"), device="cpu", hp_selection="none"
            )
        )
    with pytest.raises(ConfigError, match="--regime base-novel has no validation-free form"):
        from fskd.methods.distill.mtkd import MTKDOptions, _plan_base_novel

        _plan_base_novel(
            store,
            DistillConfig(store=str(store.path), method="mtkd", shots=2, hp_selection="none", regime="base-novel"),
            MTKDOptions(),
            None,
        )


def test_bad_policy_is_named(store):
    with pytest.raises(ConfigError, match="--hp-selection must be one of few-shot-val, full-val, none"):
        AdaptConfig(store=str(store.path), method="gda", hp_selection="val")
    with pytest.raises(ConfigError, match="--hp-selection must be one or more of few-shot-val, full-val, none"):
        BenchConfig(stores=(str(store.path),), methods=("gda",), hp_selection=("few-shot-val", "test"))


def test_bench_sweeps_the_policy_like_shots(store, tmp_path):
    out = tmp_path / "bench"
    r = api.bench(
        BenchConfig(
            stores=(str(store.path),),
            methods=("tip-adapter", "prototype"),
            shots=(2,),
            seeds=(1, 2),
            hp_selection=("few-shot-val", "none"),
            out=str(out),
            device="cpu",
            baseline="prototype",
        )
    )
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted({(x["method"], x["hp_selection"]) for x in rows}) == [
        ("prototype", "few-shot-val"),
        ("prototype", "none"),
        ("tip-adapter", "few-shot-val"),
        ("tip-adapter", "none"),
    ]
    assert all(x["status"] == "ok" for x in rows) and len(rows) == 8
    table = (out / "table.md").read_text()
    for label in ("tip-adapter [few-shot-val]", "tip-adapter [none]", "prototype [none]"):
        assert f"| {label} |" in table
    assert "no validation data (each method's fixed values)" in table
    assert "Paired difference to prototype [few-shot-val]" in table
    # the two policies differ where a search ran (tip-adapter's alpha/beta) and agree where none did
    acc = {(x["method"], x["hp_selection"], x["seed"]): x["accuracy"] for x in rows}
    assert acc[("prototype", "none", 1)] == acc[("prototype", "few-shot-val", 1)]
    assert r.counts["ok"] == 8


def test_tip_adapter_f_under_none_trains_its_whole_budget(store, tmp_path):
    """No validation data: the authors' 20 epochs, the last kept (not the training-free cache)."""
    api.adapt(
        AdaptConfig(
            store=str(store.path),
            method="tip-adapter-f",
            shots=2,
            seed=1,
            out=str(tmp_path / "f"),
            device="cpu",
            force=True,
            hp_selection="none",
        )
    )
    state = load_state(tmp_path / "f")
    assert state.hparams["allway.epochs"] == state.hparams["epoch_budget"] == 20
    assert "the last kept" in state.selected_on["allway.epochs"]
    keys = state.tensors[f"{FITTED}.keys"]
    assert torch.isfinite(keys).all()
    # the kept keys were trained: the cache starts at the L2-normalised shots, AdamW moves them off the sphere
    assert keys.shape[-2] == store.num_classes * 2
    assert float((keys.float().norm(dim=-1) - 1).abs().max()) > 1e-3
