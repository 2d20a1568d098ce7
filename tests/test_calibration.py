"""Calibration beside accuracy: ECE (15 equal-width bins) and NLL of the head's softmax in all-way
results, ``--json`` and bench tables, checked against a direct computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fskd import api
from fskd.cli import app
from fskd.config import AdaptConfig, BenchConfig, EvalConfig
from fskd.evaluation.metrics import Calibration
from fskd.store.synthetic import make_synthetic_store


def direct_ece_nll(logits: np.ndarray, truth: np.ndarray, bins: int = 15) -> tuple[float, float]:
    """Guo et al.'s ECE and the mean NLL, written out in numpy, one row at a time."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    conf, pred = p.max(1), p.argmax(1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [i for i in range(len(conf)) if lo < conf[i] <= hi or (b == 0 and conf[i] == 0)]
        if inside:
            acc = np.mean([pred[i] == truth[i] for i in inside])
            total += len(inside) / len(conf) * abs(acc - np.mean(conf[inside]))
    return total, float(np.mean([-np.log(p[i, truth[i]]) for i in range(len(truth))]))


def test_ece_bins_are_guos_half_open_intervals_at_every_boundary():
    from fskd.evaluation.metrics import ece_bins

    bins = 15
    conf = np.array([0.0] + [b / bins for b in range(1, bins + 1)] + [np.nextafter(b / bins, 1) for b in range(bins)])
    direct = [next(b for b in range(bins) if b / bins < c <= (b + 1) / bins or (b == 0 and c == 0)) for c in conf]
    assert ece_bins(conf, bins).tolist() == direct
    assert ece_bins(np.array([1 / bins, np.nextafter(1 / bins, 1)]), bins).tolist() == [0, 1]


def test_ece_and_nll_equal_a_direct_computation_over_batches():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(500, 7, generator=g, dtype=torch.float64)
    truth = torch.randint(0, 7, (500,), generator=g)
    cal = Calibration()
    for s in range(0, 500, 128):  # accumulated over query batches as the evaluation does
        cal.add(logits[s : s + 128], truth[s : s + 128])
    ece, nll = direct_ece_nll(logits.numpy(), truth.numpy())
    assert cal.ece() == pytest.approx(ece, abs=1e-9) and cal.mean_nll() == pytest.approx(nll, rel=1e-9)
    # a head that is always right with confidence 1 is perfectly calibrated
    sure = Calibration()
    sure.add(torch.eye(4) * 100, torch.arange(4))
    assert sure.ece() == pytest.approx(0.0, abs=1e-12) and sure.mean_nll() == pytest.approx(0.0, abs=1e-12)


def test_all_way_results_and_bench_tables_carry_calibration(tmp_path):
    store = make_synthetic_store(tmp_path / "s.zarr", n_classes=6, joint=True, seed=1)
    fit = api.adapt(
        AdaptConfig(store=str(store.path), method="zero-shot", shots=2, out=str(tmp_path / "st")), progress=None
    )
    r = api.evaluate(EvalConfig(store=str(store.path), state=fit.out, protocol="allway", shots=2, seeds=(1, 2)))
    assert 0 <= r.ece <= 100 and r.nll > 0 and "ECE" in r.summary_line()
    out = CliRunner().invoke(
        app,
        [
            "eval",
            "--store",
            str(store.path),
            "--state",
            fit.out,
            "--protocol",
            "allway",
            "--shots",
            "2",
            "--seeds",
            "1",
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output
    row = json.loads(out.output)
    assert set(row) >= {"ece", "nll"} and row["ece"] is not None
    episodic = api.evaluate(EvalConfig(store=str(store.path), way=2, shots=1, episodes=5))
    assert episodic.ece is None and episodic.nll is None  # all-way only
    assert episodic.hp_selection is None and r.hp_selection == "few-shot-val"  # no state; the state's policy
    b = api.bench(
        BenchConfig(
            stores=(str(store.path),),
            methods=("prototype", "zero-shot"),
            shots=(1, 2),
            seeds=(1, 2),
            transductive=("all",),  # its +TransCLIP rows have no ECE: the heads' calibration is still shown
            out=str(tmp_path / "b"),
        ),
        progress=None,
    )
    assert b.counts["failed"] == 0
    rows = [json.loads(x) for x in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    zs = [x["ece"] for x in rows if x["method"] == "zero-shot" and x["shots"] == 2]
    md = (tmp_path / "b" / "table.md").read_text()
    assert "## Calibration: expected calibration error" in md
    line = next(
        x
        for x in md.splitlines()
        if x.startswith("| zero-shot |") and "±" in x and md.index(x) > md.index("## Calibration")
    )
    assert f"{np.mean(zs):.2f}" in line.split("|")[3]
    nll = [x["nll"] for x in rows if x["method"] == "zero-shot" and x["shots"] == 2]
    section = md[md.index("## Calibration: negative log-likelihood") :]
    line = next(x for x in section.splitlines() if x.startswith("| zero-shot |"))
    assert f"{np.mean(nll):.2f}" in line.split("|")[3]
    calibration = md[md.index("## Calibration") :].split("## Paired")[0]
    assert "| zero-shot +TransCLIP |" in md
    assert not [x for x in calibration.splitlines() if x.startswith("|") and "+TransCLIP" in x]


def _val_is_test_store(path, how: str):
    """A store whose val split is (partly) its test split: ``same-ids`` (val rows named as test
    images, features differ), ``same-rows`` (the test rows under other ids), ``permuted`` (the test
    rows shuffled), ``subset`` (20 test rows, shuffled), ``partial`` (2 val rows are test rows)."""
    from fskd.store import FeatureStore
    from fskd.store.synthetic import synthetic_features

    splits, text = synthetic_features(n_classes=6, joint=True, seed=2)
    tx, ty = splits["test"]
    order = np.random.default_rng(0).permutation(len(ty))
    if how == "same-rows":
        splits["val"] = (tx, ty)
    elif how == "permuted":
        splits["val"] = (tx[order], ty[order])
    elif how == "subset":
        splits["val"] = (tx[order[:20]], ty[order[:20]])
    elif how == "partial":
        vx, vy = splits["val"]
        vx = vx.copy()
        vx[:2] = tx[:2]
        splits["val"] = (vx, vy)
    st = FeatureStore.from_arrays(
        path,
        splits,
        [f"c{i}" for i in range(6)],
        {"base": [0, 1, 2], "val": [3], "novel": [4, 5]},
        text_embeddings=text,
        encoder={"spec": "clip-like", "joint": True},
    )
    if how == "same-ids":  # the val rows named as test images (their features differ)
        FeatureStore.open(path, mode="r+").rewrite_sample_ids("val", list(st.sample_ids("test")[: st.n_rows("val")]))
        st = FeatureStore.open(path)
    return st


@pytest.mark.parametrize("how", ["same-rows", "same-ids", "permuted", "subset"])
def test_a_val_split_that_is_the_test_split_is_refused_for_validation(tmp_path, how):
    from fskd.errors import EvaluationError

    st = _val_is_test_store(tmp_path / "s.zarr", how)
    why = "val sample ids is a test sample id" if how == "same-ids" else "val feature rows is also a test feature row"
    with pytest.raises(EvaluationError, match=f"its val split is its test split .*{why}"):
        api.adapt(AdaptConfig(store=str(st.path), method="gda", shots=2, out=str(tmp_path / "g")), progress=None)
    # a fit that reads no val row is not refused: zs-lp on a joint store
    api.adapt(AdaptConfig(store=str(st.path), method="zs-lp", shots=2, out=str(tmp_path / "z")), progress=None)


def test_a_partial_val_test_overlap_is_said_not_refused(tmp_path, caplog):
    st = _val_is_test_store(tmp_path / "s.zarr", "partial")
    with caplog.at_level("WARNING", logger="fskd.store.sampling"):
        api.adapt(AdaptConfig(store=str(st.path), method="gda", shots=2, out=str(tmp_path / "g")), progress=None)
    assert "s.zarr: 0 of its 30 val sample ids are test sample ids and 2 of its val feature rows equal a test" in (
        caplog.text
    )
