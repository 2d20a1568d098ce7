"""The field's cached-feature baselines: ``gda`` (Wang et al., ICLR 2024) and ``zs-lp`` / ``clap``
(Silva-Rodríguez et al., CVPR 2024). Each against a case worked by hand or an oracle written from
the authors' formulas, then fitted, saved and scored by ``fskd eval --state`` all-way on joint and
non-joint synthetic stores."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fskd import api
from fskd.config import AdaptConfig, EvalConfig
from fskd.methods import load_state
from fskd.methods.adapt import validation
from fskd.methods.adapt.clap import WARMUP_LR, train_probe, zero_shot_confidence
from fskd.methods.adapt.coop import dassl_lr
from fskd.methods.adapt.gda import FittedGDA, gda_new_classes, gda_params
from fskd.methods.adapt.text_space import view_rows
from fskd.store.synthetic import make_synthetic_store
from tests import baseline_helpers as B

LOG_HALF = math.log(0.5)


# -- GDA --------------------------------------------------------------------------------------------
def test_gda_two_classes_in_two_dimensions_by_hand():
    """Class 0: (1,0), (3,2); class 1: (0,1), (0,3). Means (2,1), (0,2); centred rows (-1,-1), (1,1),
    (0,-1), (0,1); scatter S = [[2,2],[2,4]], tr S = 6 over n - 1 = 3 rows: shrink 2;
    P = 2 (S + 2I)^-1 = 2/20 [[6,-2],[-2,4]] = [[.6,-.2],[-.2,.4]]; P mu0 = (1, 0), P mu1 = (-.4, .8);
    mu P mu = 2.0, 1.6; b = log(1/2) - (1.0, 0.8)."""
    rows = torch.tensor([[[1.0, 0.0], [3.0, 2.0]], [[0.0, 1.0], [0.0, 3.0]]])[None]  # (1, 2, 2, 2)
    pmu, b = gda_params(rows)
    torch.testing.assert_close(pmu[0], torch.tensor([[1.0, 0.0], [-0.4, 0.8]]))
    torch.testing.assert_close(b[0], torch.tensor([LOG_HALF - 1.0, LOG_HALF - 0.8]))
    # at x = (1, 0): gda = x P mu + b = (log .5, log .5 - 1.2); blended with 100 x t and alpha = 10
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0]])[None]  # the text prefers the wrong class
    head = FittedGDA(text, pmu, b, 10.0, lambda q: q)
    got = head.logits(torch.tensor([[[1.0, 0.0]]]))[0, 0]
    torch.testing.assert_close(got, torch.tensor([10 * LOG_HALF, 100 + 10 * (LOG_HALF - 1.2)]))


def _authors_gda(vecs: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The authors' estimator in numpy (main_few_shots.py): D * pinv((S-1) cov + tr(cov) I)."""
    mus = np.stack([vecs[labels == i].mean(0) for i in range(n)])
    z = vecs - mus[labels]
    cov = np.cov(z.T)
    d = vecs.shape[1]
    p = d * np.linalg.pinv((len(z) - 1) * cov + np.trace(cov) * np.eye(d))
    return mus @ p, np.log(1.0 / n) - 0.5 * np.einsum("nd,de,ne->n", mus, p, mus)


@pytest.mark.parametrize("n,k,d", [(4, 3, 24), (3, 12, 6)])  # dual (S < D) and primal forms
def test_gda_batched_equals_the_authors_formula_per_episode(n, k, d):
    g = torch.Generator().manual_seed(0)
    rows = F.normalize(torch.randn(3, n, k, d, generator=g, dtype=torch.float64), dim=-1)
    pmu, b = gda_params(rows)
    for e in range(3):
        w, bb = _authors_gda(rows[e].reshape(-1, d).numpy(), np.repeat(np.arange(n), k), n)
        np.testing.assert_allclose(pmu[e].numpy(), w, rtol=1e-4, atol=1e-4 * np.abs(w).max())
        np.testing.assert_allclose(b[e].numpy(), bb, rtol=1e-4, atol=1e-4)


def test_gda_one_row_per_class_is_zero_shot():
    """No scatter: the authors' pinv(0) = 0, so the GDA term is the prior alone."""
    pmu, b = gda_params(F.normalize(torch.randn(2, 5, 1, 8), dim=-1))
    assert torch.equal(pmu, torch.zeros_like(pmu)) and torch.allclose(b, torch.full_like(b, math.log(1 / 5)))


def test_gda_new_classes_follow_the_authors_base_to_new_rule():
    """A new class: the mean of its 64 nearest rows and 16 copies of its text weight; the precision
    the mean over new classes of D * pinv(S_i + tr(S_i)/63 I), rows centred on the text weight."""
    g = torch.Generator().manual_seed(1)
    vecs = F.normalize(torch.randn(150, 10, generator=g, dtype=torch.float64), dim=-1)
    w = F.normalize(torch.randn(1, 4, 10, generator=g, dtype=torch.float64), dim=-1)
    pmu, b = gda_new_classes(vecs, w)
    v, t = vecs.numpy(), w[0].numpy()
    mus, precs = [], []
    for c in t:
        nb = v[np.argsort(-(v @ c))[:64]]
        mus.append(np.vstack([nb, np.repeat(c[None], 16, 0)]).mean(0))
        s = (nb - c).T @ (nb - c)
        precs.append(10 * np.linalg.pinv(s + np.trace(s) / 63 * np.eye(10)))
    mus, p = np.stack(mus), np.mean(precs, 0)
    np.testing.assert_allclose(pmu[0].numpy(), mus @ p, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b[0].numpy(), np.log(1 / 4) - 0.5 * np.einsum("nd,de,ne->n", mus, p, mus), rtol=1e-4)


# -- ZS-LP and CLAP ---------------------------------------------------------------------------------
def test_clap_multipliers_are_each_class_zero_shot_confidence():
    """Class 0's shot is its text weight (softmax(100, 0) = 1 - e^-100); class 1's sits halfway
    between the two texts (softmax(70.7, 70.7) = 1/2)."""
    x = torch.tensor([[1.0, 0.0], [2**-0.5, 2**-0.5]])[None]
    lam = zero_shot_confidence(x, torch.tensor([[0, 1]]), torch.eye(2)[None])
    torch.testing.assert_close(lam, torch.tensor([[1.0, 0.5]]))


def test_zs_lp_is_sgd_with_the_authors_schedule():
    """Full batch (fewer rows than 256): train_probe = torch.optim.SGD (momentum 0.9) on the cosine
    logits, lr 1e-5 for epoch 0, then cosine from 0.1 (Dassl's warm-up + CosineAnnealingLR)."""

    def lr_at(epoch: int, epochs: int, lr: float) -> float:
        return dassl_lr(epoch, epochs, lr, WARMUP_LR)

    assert lr_at(0, 300, 0.1) == 1e-5 and lr_at(1, 300, 0.1) == pytest.approx(0.1)
    assert lr_at(151, 300, 0.1) == pytest.approx(0.05)
    g = torch.Generator().manual_seed(2)
    x = F.normalize(torch.randn(1, 12, 6, generator=g), dim=-1)
    y = torch.arange(3).repeat_interleave(4)[None]
    t = F.normalize(torch.randn(1, 3, 6, generator=g), dim=-1)
    ours, _ = train_probe(x, y, 12, t, False, seed=0, epochs=6)
    w = torch.nn.Parameter(t[0].clone())
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    B.torch_steps(
        opt, 6, lambda epoch: lr_at(epoch, 6, 0.1), lambda: F.cross_entropy(100 * x[0] @ F.normalize(w, dim=-1).T, y[0])
    )
    torch.testing.assert_close(ours[0], w.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_zs_lp_first_step_by_hand(form):
    """One row at 45 degrees between two unit text weights, its class 0: logits 100 cos 45 for
    both, so p = (1/2, 1/2) and dL/dlogits = (-1/2, 1/2); the gradient of x.w/|w| at a unit w is
    x - (x.w) w, (0, 1/sqrt2) for w0 = e1 and (1/sqrt2, 0) for w1 = e2. Epoch 0's rate is 1e-5
    (the warm-up), so w0 = (1, 1e-5 * 50 / sqrt2) and w1 = (-1e-5 * 50 / sqrt2, 1)."""
    x = torch.tensor([[[2**-0.5, 2**-0.5]]])
    step = 1e-5 * 50 * 2**-0.5
    w, lam = train_probe(x, torch.tensor([[0]]), 1, torch.eye(2)[None], False, seed=0, epochs=1, form=form)
    assert lam is None
    torch.testing.assert_close(w[0], torch.tensor([[1.0, step], [-step, 1.0]]), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("constraint", [False, True])
def test_zs_lp_and_clap_batched_over_episodes_equal_one_episode_at_a_time(constraint):
    """Three episodes trained together give each episode's weights (and multipliers) trained alone."""
    g = torch.Generator().manual_seed(6)
    x = F.normalize(torch.randn(3, 12, 8, generator=g), dim=-1)
    y = torch.arange(3).repeat_interleave(4)[None].expand(3, -1).contiguous()
    t = F.normalize(torch.randn(3, 3, 8, generator=g), dim=-1)
    together, lam = train_probe(x, y, 12, t, constraint, seed=1, epochs=40)
    for e in range(3):
        alone, lam_e = train_probe(x[e : e + 1], y[e : e + 1], 12, t[e : e + 1], constraint, seed=1, epochs=40)
        torch.testing.assert_close(together[e : e + 1], alone, rtol=1e-5, atol=1e-6)
        if constraint:
            torch.testing.assert_close(lam[e : e + 1], lam_e)
    assert (together - t).norm() > 0.1  # it moved


@pytest.mark.parametrize("constraint", [False, True])
def test_the_dual_form_trains_the_same_weights_as_the_primal(constraint):
    """Coefficients on (text weight, shots) give the autograd-trained weights, mini-batches and
    shuffles included (40 rows in batches of 16: 2 batches per epoch, 8 rows left out)."""
    g = torch.Generator().manual_seed(4)
    centres = F.normalize(torch.randn(3, 4, 1, 48, generator=g), dim=-1)
    x = F.normalize(centres + 0.5 * torch.randn(3, 4, 10, 48, generator=g), dim=-1).reshape(3, 40, 48)
    y = torch.arange(4).repeat_interleave(10)[None].expand(3, -1).contiguous()
    t = F.normalize(centres[:, :, 0] + torch.randn(3, 4, 48, generator=g), dim=-1)
    kw = dict(epochs=30, batch=16)
    primal, lam = train_probe(x, y, 40, t, constraint, seed=5, form="primal", **kw)
    dual, _ = train_probe(x, y, 40, t, constraint, seed=5, form="dual", **kw)
    assert (primal - t).norm() > 1  # it moved
    torch.testing.assert_close(dual, primal, rtol=1e-4, atol=1e-4 * float(primal.abs().max()))


def test_clap_constraint_pulls_each_class_toward_its_zero_shot_weights():
    """The text weights point away from where the shots are: ZS-LP walks off them, CLAP stays
    nearer, and the class the zero-shot classifier already gets right (larger lambda) nearest."""
    g = torch.Generator().manual_seed(3)
    centres = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    x = F.normalize(centres.repeat_interleave(5, 0) + 0.3 * torch.randn(15, 8, generator=g), dim=-1)[None]
    y = torch.arange(3).repeat_interleave(5)[None]
    t = F.normalize(centres + torch.tensor([[0.1], [1.5], [1.5]]) * torch.randn(3, 8, generator=g), dim=-1)[None]
    w_lp, _ = train_probe(x, y, 15, t, False, seed=0, epochs=60)
    w_clap, lam = train_probe(x, y, 15, t, True, seed=0, epochs=60)
    d_lp, d_clap = (w_lp - t).norm(dim=-1)[0], (w_clap - t).norm(dim=-1)[0]
    assert (d_clap < d_lp).all(), (d_clap, d_lp)
    assert lam[0, 0] > lam[0, 1:].max() and d_clap[0] < d_clap[1:].min()
    # the penalty's gradient alone, at a displaced weight: 2 lambda_k (w_k - t_k) / N
    w = (t + 0.1).requires_grad_(True)
    ((lam * (w - t).pow(2).sum(-1)).mean(-1)).sum().backward()
    torch.testing.assert_close(w.grad, 2 * lam[..., None] * 0.1 * torch.ones_like(t) / 3)


# -- fitted, saved, scored --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["joint", "pair"])
@pytest.mark.parametrize("method", ["gda", "zs-lp", "clap"])
def test_state_scored_by_fskd_eval_all_way(method, kind, baseline_stores, tmp_path):
    st = baseline_stores[kind]
    out = tmp_path / method
    state = B.cli_adapt(st, method, out, {"val_episodes": 40} if method == "gda" else {})
    if method == "gda":
        assert state.selected_on["allway.alpha"] == "chosen on val split (min(K, 4) per class)"
        assert state.selected_on["episodic.alpha"] == "chosen on val classes"
    else:  # nothing is chosen on validation data (the bridge of a non-joint store is fskd's, not the method's)
        assert not any("chosen on" in str(v) for k, v in state.selected_on.items() if not k.endswith("ridge"))
        assert "no validation data" in state.selected_on["epochs"]
        assert "allway.fitted.weights" in state.tensors  # the head of its own shots, trained once
    B.cli_allway_accuracy(st, out)


def test_zs_lp_and_clap_read_no_validation_row_on_a_joint_store(baseline_stores, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a validation row was read")

    for name in ("allway_val_task", "episodic_val_task", "allway_val_rows"):
        monkeypatch.setattr(validation, name, refuse)
    st = baseline_stores["joint"]
    for method in ("zs-lp", "clap"):
        r = api.adapt(
            AdaptConfig(store=str(st.path), method=method, shots=2, out=str(tmp_path / method), device="cpu"),
            progress=None,
        )
        assert not any("chosen on" in str(v) for v in r.selected_on.values()), r.selected_on


def test_gda_beats_zero_shot_on_a_separable_store_and_transfers_base_to_new(tmp_path):
    """Shots matter on this store (the text is an imperfect class centre); new classes (no shot)
    get the authors' synthesised Gaussians, above chance."""
    path = B.clip_like_store(tmp_path / "clip-like.zarr")
    acc = {}
    for m in ("zero-shot", "gda"):
        r = api.adapt(
            AdaptConfig(
                store=path,
                method=m,
                shots=8,
                out=str(tmp_path / m),
                device="cpu",
                options={"val_episodes": 40} if m == "gda" else {},
            ),
            progress=None,
        )
        acc[m] = api.evaluate(
            EvalConfig(store=path, state=r.out, protocol="allway", shots=8, seeds=(1,), device="cpu")
        ).accuracy
    assert acc["gda"] > acc["zero-shot"] + 5 and acc["gda"] > 60, acc
    r = api.adapt(
        AdaptConfig(
            store=path,
            method="gda",
            shots=8,
            out=str(tmp_path / "b2n"),
            device="cpu",
            base_to_new=True,
            options={"val_episodes": 40},
        ),
        progress=None,
    )
    st = load_state(r.out)
    assert st.tensors["gda.transfer_rows"].shape == (6 * 8, 32)  # the base half's shots only
    ev = api.evaluate(EvalConfig(store=path, state=r.out, protocol="base-to-new", shots=8, seeds=(1,), device="cpu"))
    assert ev.new is not None and np.isfinite(ev.new) and ev.new > 100 / 6 and ev.base > 100 / 6


def test_zs_lp_and_clap_give_new_classes_their_text_weights(tmp_path):
    """Base-to-new: a new class has no shot, so its weight is its text weight: the new-class
    accuracy of both is zero-shot's, while the base classes are trained."""
    path = str(make_synthetic_store(tmp_path / "b2n.zarr", n_classes=12, joint=True, seed=2).path)
    new = {}
    for m in ("zero-shot", "zs-lp", "clap"):
        r = api.adapt(
            AdaptConfig(store=path, method=m, shots=4, out=str(tmp_path / m), device="cpu", base_to_new=True),
            progress=None,
        )
        ev = api.evaluate(
            EvalConfig(store=path, state=r.out, protocol="base-to-new", shots=4, seeds=(1,), device="cpu")
        )
        new[m] = ev.new
        assert np.isfinite(ev.base) and ev.base > 100 / 6
    assert new["zs-lp"] == new["clap"] == new["zero-shot"] > 100 / 6, new


def test_stored_views_are_the_rows_of_gda_and_clap(tmp_path):
    """The authors encode augmented crops of every shot (GDA 10, CLAP 20) and use each as a row:
    with ``--augment-views`` in the store, both do, and say so in the state."""
    from fskd.store import FeatureStore

    path = B.views_store(tmp_path, 4)
    store = FeatureStore.open(path)
    states = {
        m: B.fit_on_views(path, m, tmp_path / m, 4, {"val_episodes": 20} if m == "gda" else {}) for m in ("gda", "clap")
    }
    # GDA's kept head is the estimator on the 4 x 2 embedded views of each class's shots
    ts, views = B.own_shots(states["gda"], store)
    rows = view_rows(ts, views)
    assert rows.shape == (1, ts.support.shape[1], 8, ts.support.shape[-1])
    pmu, b = gda_params(rows)
    torch.testing.assert_close(states["gda"].tensors["allway.fitted.pmu"], pmu)
    assert "allway.fitted.weights" in states["clap"].tensors


def test_registered_with_what_they_can_do():
    for m in ("gda", "zs-lp", "clap"):
        B.assert_registered_as_text_baseline(m)


@pytest.mark.parametrize("method", ["gda", "clap", "proker", "tip-adapter"])
def test_the_authors_inputs_export_runs_and_holds_fskds_inputs(method, tmp_path, monkeypatch):
    """benchmarks/authors_inputs.py (what the authors' code is run on for parity) exports each
    method's arrays on a small store, and the fskd result it records is fskd eval's."""
    import importlib.util
    import sys
    from pathlib import Path

    st = make_synthetic_store(tmp_path / "s.zarr", n_classes=8, joint=True, seed=3)
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "authors_inputs.py"
    spec = importlib.util.spec_from_file_location("authors_inputs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "out"
    argv = ["authors_inputs.py", "--method", method, "--shots", "2", "--seeds", "1", "--store", str(st.path)]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    mod.main()
    arrays = np.load(out / "inputs_K2_s1.npz")
    assert arrays["x"].shape == (8 * 2, arrays["text"].shape[1]) and arrays["text"].shape[0] == 8
    assert len(arrays["test"]) == len(arrays["test_truth"]) > 0 and not np.isnan(arrays["test"]).any()
    if method == "gda":  # the whole val split beside the few-shot val rows, and the authors' alpha grid
        assert len(arrays["val_full"]) > len(arrays["val"]) and len(arrays["alpha_grid"]) == 7
    recorded = json.loads((out / "fskd_results.json").read_text())["K2_s1"]["accuracy"]
    again = api.evaluate(
        EvalConfig(store=str(st.path), state=str(out / "state_K2_s1"), protocol="allway", shots=2, seeds=(1,))
    )
    assert recorded == again.accuracy
