"""TransCLIP transductive evaluation (fskd.evaluation.transductive, eval --transductive)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fskd import api
from fskd.classifiers.base import FittedHead, Head
from fskd.cli import app
from fskd.config import EvalConfig
from fskd.errors import ConfigError
from fskd.evaluation import transductive as tc
from fskd.protocols.allway import run_allway
from fskd.store.synthetic import make_synthetic_store

runner = CliRunner()


# --- the update steps on a tiny case -------------------------------------------------------------


def _tiny():
    """Two classes, four test points on the unit circle (two near (1, 0), two near (0, 1)), one
    shot per class."""
    x = F.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]]), dim=-1)
    shots = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    return x, shots, torch.tensor([0, 1])


def test_knn_graph_and_laplacian_product():
    x, _, _ = _tiny()
    idx, w = tc.knn_graph(x, k=1, chunk=3)  # chunked: the second block starts at row 3
    assert idx.squeeze(1).tolist() == [1, 0, 3, 2]  # each point's nearest other point, never itself
    assert torch.allclose(w.squeeze(1), (x * x[[1, 0, 3, 2]]).sum(-1))
    idx, w = tc.knn_graph(x, k=3)
    dense = torch.zeros(4, 4)
    dense[torch.arange(4)[:, None], idx] = w
    assert torch.all(dense.diagonal() == 0)
    # k = M - 1: every other point, the raw similarity (a negative one too: x1 . x3 < 0)
    assert torch.allclose(dense, (x @ x.T).fill_diagonal_(0)) and dense[1, 3] < 0
    idx, w = tc.knn_graph(x, k=1)
    dense = torch.zeros(4, 4)
    dense[torch.arange(4)[:, None], idx] = w
    z = torch.softmax(torch.randn(4, 2, generator=torch.Generator().manual_seed(0)), -1)
    # both directions of every edge: a row's neighbours and the rows whose neighbour it is
    assert torch.allclose(torch.sparse.mm(tc.affinity(idx, w), z), (dense + dense.T) @ z)


def test_a_shot_sends_its_label_to_its_nearest_test_rows():
    x, shots, sy = _tiny()
    s_idx, s_w = tc.nearest(shots, x, k=2)
    assert [sorted(r) for r in s_idx.tolist()] == [[0, 1], [2, 3]]  # its nearest test rows, the first kept
    onehot = F.one_hot(sy, 2).float()
    msg = tc.shot_message(s_idx, s_w, onehot, 4)
    dense = torch.zeros(2, 4)
    dense[torch.arange(2)[:, None], s_idx] = s_w
    assert torch.allclose(msg, dense.T @ onehot)
    assert torch.allclose(msg[0], torch.tensor([float(shots[0] @ x[0]), 0.0]))


def test_gaussian_log_likelihood_mu_and_var_steps_by_hand():
    x, shots, sy = _tiny()
    mu = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    var = torch.tensor([0.5, 0.25])
    lp = tc.gaussian_log_likelihood(x, mu, var)
    by_hand = -0.5 * (((x[:, None, :] - mu[None]) ** 2) / var).sum(-1)
    assert torch.allclose(lp, by_hand, atol=1e-6)

    z = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 1.0]])
    onehot = F.one_hot(sy, 2).float()
    gamma = 0.02
    sw = tc.SHOT_MASS * gamma / 2  # 50 γ / S: the two shots together weigh 50 γ = 1 against 1
    new_mu = tc.mu_step(x, z, onehot.T @ shots, sw, mu)
    # class 0: (x0 + 0.5 x1) / 4 + 0.5 shot 0, class 1: (0.5 x1 + x2 + x3) / 4 + 0.5 shot 1; unit norm
    assert torch.allclose(new_mu[0], F.normalize((x[0] + 0.5 * x[1]) / 4 + 0.5 * shots[0], dim=0))
    assert torch.allclose(new_mu[1], F.normalize((0.5 * x[1] + x[2] + x[3]) / 4 + 0.5 * shots[1], dim=0))
    new_var = tc.var_step(x, z, new_mu, shots, onehot, gamma)
    test_part = (z[:, :, None] * (x[:, None, :] - new_mu[None]) ** 2).sum((0, 1)) / 4
    shot_part = ((shots - new_mu[sy]) ** 2).sum(0) * sw
    assert torch.allclose(new_var, (test_part + shot_part) / (1 + tc.SHOT_MASS * gamma), atol=1e-6)
    # zero-shot (no shots): the test rows alone, weight 1
    assert torch.allclose(tc.var_step(x, z, new_mu, shots[:0], onehot[:0], 0.0), test_part, atol=1e-6)
    # a class with no mass keeps its previous mean
    empty = tc.mu_step(x, torch.tensor([[1.0, 0.0]] * 4), torch.zeros(2, 2), 0.0, mu)
    assert torch.equal(empty[1], mu[1])


def test_z_step_by_hand():
    x, shots, sy = _tiny()
    yhat = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    z = yhat.clone()
    log_p = torch.tensor([[-1.0, -3.0], [-2.0, -2.0], [-3.0, -1.0], [-2.5, -0.5]]) * 50
    idx, w = tc.knn_graph(x, k=1)
    s_idx, s_w = tc.nearest(shots, x, k=1)
    msg = tc.shot_message(s_idx, s_w, F.one_hot(sy, 2).float(), 4)
    out = tc.assignments(tc.z_logits(yhat.log(), log_p, z, tc.affinity(idx, w), lam=0.5, shots=msg, k=1))
    # z_i ∝ ŷ_i^λ exp(ℓ_i / 50 + (Σ_j (w_ij + w_ji) z_j + Σ_s w_si e(y_s)) / 2k): here each row is its
    # neighbour's neighbour (w_ij = w_ji) and shot 0 (1) is nearest to row 0 or 1 (2 or 3)
    nn = [1, 0, 3, 2]
    for i in range(4):
        phi = 2 * w[i, 0] * z[nn[i]] + msg[i]
        u = yhat[i] ** 0.5 * torch.exp(log_p[i] / 50 + phi / 2)
        assert torch.allclose(out[i], u / u.sum(), atol=1e-6)


def _dense_transclip(x, yhat, sx, sy, vx, vy, n):
    """The procedure written plainly with dense matrices (an (M, M) affinity, a loop per γ and per
    step): the oracle of the batched code."""
    x, sx, vx = F.normalize(x, dim=-1), F.normalize(sx, dim=-1), F.normalize(vx, dim=-1)
    m, d = x.shape
    sim = x @ x.T
    sim.fill_diagonal_(float("-inf"))
    W = torch.zeros(m, m)
    top = sim.topk(3, dim=1)
    W[torch.arange(m)[:, None], top.indices] = top.values
    ssim = sx @ x.T
    Ws = torch.zeros(len(sx), m)
    stop = ssim.topk(3, dim=1)
    Ws[torch.arange(len(sx))[:, None], stop.indices] = stop.values
    onehot = F.one_hot(sy, n).float()
    z = yhat.clone()
    mu = F.normalize(onehot.T @ sx, dim=-1)
    var = torch.full((d,), 1.0 / d)
    best, chosen = -1.0, None
    for gamma in (0.002, 0.01, 0.02, 0.2):
        for t in range(11):
            ll = torch.stack([-0.5 * (((x - mu[c]) ** 2) / var).sum(-1) for c in range(n)], 1)
            for _ in range(5):
                phi = (W + W.T) @ z + Ws.T @ onehot
                u = yhat**0.5 * torch.exp(ll / 50 + phi / 6)
                z = u / u.sum(1, keepdim=True)
            if t == 10:
                break
            wq, ws = 1 / m, 50 * gamma / len(sx)
            mu = F.normalize(wq * z.T @ x + ws * onehot.T @ sx, dim=-1)
            dev = sum(wq * z[:, c : c + 1] * (x - mu[c]) ** 2 for c in range(n)).sum(0)
            dev = dev + ws * ((sx - mu[sy]) ** 2).sum(0)
            var = dev / (1 + 50 * gamma)
        acc = float((z[(vx @ x.T).argmax(1)].argmax(1) == vy).float().mean())
        if acc > best:
            best, chosen = acc, (z.argmax(1), gamma)
    return chosen


def test_the_batched_solver_equals_the_procedure_written_densely():
    g = torch.Generator().manual_seed(5)
    n, d = 4, 12
    centres = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    y = torch.arange(n).repeat_interleave(15)
    x = centres[y] + 0.35 * torch.randn(len(y), d, generator=g)
    sy = torch.arange(n).repeat_interleave(2)
    sx = centres[sy] + 0.35 * torch.randn(len(sy), d, generator=g)
    vy = torch.arange(n).repeat_interleave(2)
    vx = centres[vy] + 0.35 * torch.randn(len(vy), d, generator=g)
    yhat = torch.softmax(3 * F.normalize(x, dim=-1) @ centres.T + torch.randn(len(y), n, generator=g), -1)
    out = tc.transclip(x, yhat, sx, sy, vx, vy)
    pred, gamma = _dense_transclip(x, yhat, sx, sy, vx, vy, n)
    assert out.shot_weight == gamma and torch.equal(out.pred, pred)
    assert len(out.val_accuracy) == 4 and torch.allclose(out.z.sum(-1), torch.ones(len(y)))


def test_val_rows_choose_the_shot_weight_earliest_on_ties_and_none_keeps_the_last(monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 8, generator=g)
    yhat = torch.softmax(torch.randn(60, 3, generator=g), -1)
    sx, sy = x[:6], torch.arange(3).repeat(2)
    last = tc.transclip(x, yhat, sx, sy)
    assert last.shot_weight == tc.SHOT_WEIGHTS[-1] and last.val_accuracy == []
    ties = tc.transclip(x, yhat, sx, sy, x[:0], torch.zeros(0, dtype=torch.long))  # no val row: the last too
    assert ties.shot_weight == tc.SHOT_WEIGHTS[-1]
    # val rows equal to test rows labelled as the assignments after the first γ: a perfect score there
    first = tc.transclip(x, yhat, sx, sy, shot_weights=tc.SHOT_WEIGHTS[:1])
    chosen = tc.transclip(x, yhat, sx, sy, x, first.pred)
    assert chosen.val_accuracy[0] == 1.0 and chosen.shot_weight == tc.SHOT_WEIGHTS[0]
    assert torch.equal(chosen.pred, first.pred)  # the kept assignments are the first γ's, not the last's
    assert chosen.val_accuracy == pytest.approx([1.0] + chosen.val_accuracy[1:])


def test_a_near_oracle_head_is_followed():
    """The KL term matters: with ŷ right on 90% of its mass for the true class, the assignments follow
    it (the likelihood at 1/50 cannot drown it), far above the shots' own clusters (a flat ŷ)."""
    g = torch.Generator().manual_seed(2)
    n, d = 10, 64
    centres = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    y = torch.arange(n).repeat_interleave(30)
    x = centres[y] + 0.6 * torch.randn(len(y), d, generator=g)  # overlapping clusters
    sy = torch.arange(n)
    sx = centres[sy] + 0.6 * torch.randn(n, d, generator=g)
    oracle = F.one_hot(y, n).float() * (0.9 - 0.1 / (n - 1)) + 0.1 / (n - 1)
    flat = torch.full((len(y), n), 1.0 / n)
    acc = lambda yhat, **kw: float((tc.transclip(x, yhat, sx, sy, **kw).pred == y).float().mean())  # noqa: E731
    first = acc(oracle, shot_weights=tc.SHOT_WEIGHTS[:1])  # the shots at 0.1 x the test set
    schedule, alone = acc(oracle), acc(flat)  # after the last γ: the shots at 10 x the test set
    assert first > 0.95 and schedule > alone + 0.5 and alone < 0.3, (first, schedule, alone)


def test_a_huge_kl_weight_returns_the_inductive_predictions():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 16, generator=g)
    yhat = torch.softmax(2 * torch.randn(200, 5, generator=g), -1)
    out = tc.transclip(x, yhat, x[:10], torch.arange(10) % 5, lam=1e6)
    assert torch.equal(out.pred, yhat.argmax(-1))
    assert torch.allclose(out.z.sum(-1), torch.ones(200))


def test_defaults_are_the_authors_and_zero_shot_runs():
    assert (tc.KNN, tc.LAMBDA_FEW_SHOT, tc.LAMBDA_ZERO_SHOT, tc.Z_STEPS, tc.Z_ITERS) == (3, 0.5, 1.0, 11, 5)
    assert (tc.LIKELIHOOD_WEIGHT, tc.SHOT_MASS, tc.SHOT_WEIGHTS) == (1 / 50, 50.0, (0.002, 0.01, 0.02, 0.2))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, generator=g)
    yhat = torch.softmax(torch.randn(30, 3, generator=g), -1)
    a = tc.transclip(x, yhat)  # no shots: the zero-shot initialisation
    b = tc.transclip(x, yhat, x[:0], torch.zeros(0, dtype=torch.long))
    assert a.pred.shape == (30,) and torch.equal(a.pred, b.pred) and torch.equal(a.z, b.z)  # deterministic
    assert a.shot_weight is None and a.val_accuracy == []


# --- transduction helps when the clusters are clean and the head is noisy --------------------------


def _noisy_truth(truth: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Logits that know the class but drown it in noise: about half the rows argmax right."""
    g = torch.Generator().manual_seed(seed)
    return 2.0 * F.one_hot(truth, n).float() + 1.5 * torch.randn(len(truth), n, generator=g)


def test_transduction_improves_a_noisy_head_on_clean_clusters(tmp_path):
    st = make_synthetic_store(tmp_path / "s.zarr", n_classes=10, noise=0.15, per_class=40)
    x, y = st.gather(None, ["test"])
    tr_x, tr_y = st.gather(None, ["train"])
    truth = torch.from_numpy(y).long()
    yhat = _noisy_truth(truth, 10).softmax(-1)
    shots = np.concatenate([np.flatnonzero(tr_y == c)[:2] for c in range(10)])
    out = tc.transclip(torch.from_numpy(x), yhat, torch.from_numpy(tr_x[shots]), torch.from_numpy(tr_y[shots]))
    inductive = float((yhat.argmax(-1) == truth).float().mean())
    transductive = float((out.pred == truth).float().mean())
    assert inductive < 0.8 and transductive > inductive + 0.15, (inductive, transductive)


class _NoisyHead(Head):
    """Logits = the true way plus noise (the truth is looked up by feature row): an inductive head
    that is right about half the time."""

    name = "noisy"

    def __init__(self, features: torch.Tensor, labels: np.ndarray, n: int):
        self.lookup = {tuple(r.tolist()): int(c) for r, c in zip(features, labels, strict=True)}
        self.n = n

    def fit(self, support, classes):
        head = self

        class Fitted(FittedHead):
            def logits(self, query):
                truth = torch.tensor([head.lookup[tuple(r.tolist())] for r in query[0]])
                return _noisy_truth(truth, head.n)[None]

        return Fitted()


def test_run_allway_transductive_beats_the_noisy_head(tmp_path):
    st = make_synthetic_store(tmp_path / "s.zarr", n_classes=10, noise=0.15, per_class=40)
    x, y = st.gather(None, ["test"])
    tr_x, tr_y = st.gather(None, ["train"])
    head = _NoisyHead(torch.from_numpy(x), y, 10)
    args = (torch.from_numpy(tr_x), tr_y, torch.from_numpy(x), y, np.arange(10), 2, (1, 2), head)
    ind = run_allway(*args)
    tra = run_allway(*args, transductive=True)
    assert ind.ece is not None and tra.ece is None and tra.nll is None  # no calibration of assignments
    assert tra.top1.shape == (2,) and tra.top5.shape == (2,) and tra.per_class.shape == (2, 10)
    assert tra.top1.mean() > ind.top1.mean() + 0.15, (ind.top1, tra.top1)


# --- wiring: config, API, CLI ------------------------------------------------------------------------


def test_episodic_and_transfer_protocols_are_refused(tmp_path):
    for protocol in ("episodic", "cross-dataset", "domain-shift"):
        with pytest.raises(ConfigError, match="--transductive.*allway or base-to-new"):
            EvalConfig(store="s.zarr", protocol=protocol, transductive=True)
    EvalConfig(store="s.zarr", protocol="allway", transductive=True)
    EvalConfig(store="s.zarr", protocol="base-to-new", transductive=True)
    st = make_synthetic_store(tmp_path / "s.zarr")
    res = runner.invoke(app, ["eval", "--store", str(st.path), "--transductive", "--json"])
    assert res.exit_code == 2 and "allway or base-to-new" in res.output


def test_cli_transductive_end_to_end(tmp_path):
    st = make_synthetic_store(tmp_path / "s.zarr", n_classes=12, joint=True)
    base = [
        "eval",
        "--store",
        str(st.path),
        "--protocol",
        "allway",
        "--shots",
        "2",
        "--seeds",
        "1,2",
        "--classifier",
        "text",
        "--json",
    ]
    ind = json.loads(runner.invoke(app, base).stdout)
    res = runner.invoke(app, [*base, "--transductive", "--report", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["inductive"] is False and r["transductive"] == "TransCLIP" and ind["inductive"] is True
    assert ind["transductive"] is None and ind["ece"] is not None and r["ece"] is None and r["nll"] is None
    assert 0 <= r["accuracy"] <= 100 and r["n_seeds"] == 2 and r["top5"] is not None
    assert r["report"][0].endswith("s_text_allway_2shot_seeds1-2_transclip.json")
    saved = json.loads(open(r["report"][0]).read())
    text = json.dumps(saved)
    assert "TransCLIP" in text and "all test rows of each seed scored at once" in text
    human = runner.invoke(app, base[:-1] + ["--transductive"]).output
    assert "text + TransCLIP (transductive)" in human and "ECE" not in human
    sw = r["shot_weight"]  # chosen per seed on CoOp's few-shot val rows (a classifier has no state)
    assert sw["schedule"] == list(tc.SHOT_WEIGHTS) and "few-shot-val rows" in sw["chosen_by"]
    assert len(sw["per_seed"]) == 2 and all(len(g) == 1 and g[0] in tc.SHOT_WEIGHTS for g in sw["per_seed"])
    assert ind["shot_weight"] is None


def test_a_state_fitted_without_validation_reads_no_val_row_for_transclip(tmp_path, monkeypatch):
    from fskd.config import AdaptConfig
    from fskd.store import sampling

    st = make_synthetic_store(tmp_path / "s.zarr", n_classes=12, joint=True)
    ev = dict(store=str(st.path), protocol="allway", shots=2, seeds=(1,), transductive=True)
    few = api.adapt(AdaptConfig(store=str(st.path), method="tip-adapter", shots=2, out=str(tmp_path / "few")))
    r = api.evaluate(EvalConfig(**ev, state=few.out))
    assert "few-shot-val rows" in r.shot_weight["chosen_by"] and "chosen by the best val" in r.protocol_text()
    none = api.adapt(
        AdaptConfig(store=str(st.path), method="tip-adapter", shots=2, hp_selection="none", out=str(tmp_path / "none"))
    )

    def refuse(*a, **k):
        raise AssertionError("a val row was read under --hp-selection none")

    monkeypatch.setattr(sampling, "allway_val", refuse)
    r = api.evaluate(EvalConfig(**ev, state=none.out))
    assert "no val rows" in r.shot_weight["chosen_by"] and r.shot_weight["per_seed"] == [[tc.SHOT_WEIGHTS[-1]]]


def test_api_transductive_base_to_new(tmp_path):
    st = make_synthetic_store(tmp_path / "s.zarr", n_classes=12, joint=True)
    r = api.evaluate(
        EvalConfig(
            store=str(st.path), protocol="base-to-new", classifier="text", shots=2, seeds=(1,), transductive=True
        )
    )
    assert r.inductive is False and r.new is not None and r.base is not None
    assert "TransCLIP" in r.protocol_text() and "TransCLIP" in r.summary_line()


# --- the realistic setting: --batch B --active-classes C ---------------------------------------------


def test_realistic_batches_use_every_row_once_and_hold_at_most_c_classes():
    truth = np.random.default_rng(0).integers(0, 10, 237)
    setting = tc.BatchSetting(batch=16, active_classes=3)
    batches = tc.realistic_batches(truth, setting, seed=1)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(237))  # every row, once
    assert all(len(b) <= 16 and len(np.unique(truth[b])) <= 3 and np.all(np.diff(b) > 0) for b in batches)
    assert all(len(b) == 16 for b in batches[:5])  # early batches are full: 3 classes hold more than 16 rows
    again = tc.realistic_batches(truth, setting, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))  # seeded
    other = tc.realistic_batches(truth, setting, seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other, strict=False))
    one = tc.realistic_batches(truth, tc.BatchSetting(batch=237, active_classes=10), seed=1)
    assert len(one) == 1 and np.array_equal(one[0], np.arange(237))  # B = M, C = N: one batch, in order
    single = tc.realistic_batches(truth, tc.BatchSetting(batch=1000, active_classes=1), seed=1)
    assert len(single) == 10 and all(len(np.unique(truth[b])) == 1 for b in single)  # one class a batch


def _allway_args(tmp_path):
    st = make_synthetic_store(tmp_path / "s.zarr", n_classes=10, noise=0.15, per_class=40)
    x, y = st.gather(None, ["test"])
    tr_x, tr_y = st.gather(None, ["train"])
    head = _NoisyHead(torch.from_numpy(x), y, 10)
    return (torch.from_numpy(tr_x), tr_y, torch.from_numpy(x), y, np.arange(10), 2, (1, 2), head), y


def test_one_batch_of_every_row_and_class_is_the_all_at_once_setting(tmp_path):
    args, y = _allway_args(tmp_path)
    whole = run_allway(*args, transductive=True)
    batched = run_allway(*args, transductive=True, batch_setting=tc.BatchSetting(len(y), 10))
    assert batched.batches == [1, 1] and whole.batches is None
    for a, b in ((whole.top1, batched.top1), (whole.top5, batched.top5), (whole.per_class, batched.per_class)):
        np.testing.assert_array_equal(a, b)


def test_run_allway_scores_each_batch_alone_with_at_most_c_classes(tmp_path, monkeypatch):
    from fskd.protocols import allway

    args, y = _allway_args(tmp_path)
    seen = []
    real = allway.transclip

    def spy(test_x, yhat, *rest, **kw):
        seen.append((len(test_x), yhat.shape[1]))
        return real(test_x, yhat, *rest, **kw)

    drawn = []
    monkeypatch.setattr(tc, "transclip", spy)
    monkeypatch.setattr(
        allway,
        "realistic_batches",
        lambda truth, s, seed: drawn.append(tc.realistic_batches(truth, s, seed)) or drawn[-1],
    )
    r = run_allway(*args, transductive=True, batch_setting=tc.BatchSetting(batch=12, active_classes=2))
    assert r.batches == [len(b) for b in drawn] and sum(r.batches) == len(seen)
    assert all(m <= 12 and n == 10 for m, n in seen)  # a batch's rows, every class a candidate
    assert all(len(np.unique(y[b])) <= 2 for d in drawn for b in d)
    assert r.top1.shape == (2,) and r.per_class.shape == (2, 10) and np.isfinite(r.top1).all()
    with pytest.raises(ConfigError, match="--active-classes 11 is more than the 10 classes"):
        run_allway(*args, transductive=True, batch_setting=tc.BatchSetting(batch=12, active_classes=11))


def test_batch_options_are_validated():
    with pytest.raises(ConfigError, match="--batch and --active-classes go together"):
        EvalConfig(store="s.zarr", protocol="allway", transductive=True, batch=64)
    with pytest.raises(ConfigError, match="--batch and --active-classes go together"):
        EvalConfig(store="s.zarr", protocol="allway", transductive=True, active_classes=4)
    with pytest.raises(ConfigError, match="add --transductive"):
        EvalConfig(store="s.zarr", protocol="allway", batch=64, active_classes=4)
    for b, c in ((0, 4), (64, 0)):
        with pytest.raises(ConfigError, match=">= 1"):
            EvalConfig(store="s.zarr", protocol="allway", transductive=True, batch=b, active_classes=c)
    EvalConfig(store="s.zarr", protocol="base-to-new", transductive=True, batch=64, active_classes=4)


def test_cli_json_and_text_name_the_transductive_setting(tmp_path):
    st = make_synthetic_store(tmp_path / "s.zarr", n_classes=12, joint=True)
    base = [
        "eval",
        "--store",
        str(st.path),
        "--protocol",
        "allway",
        "--shots",
        "2",
        "--seeds",
        "1,2",
        "--classifier",
        "text",
        "--json",
    ]
    ind = json.loads(runner.invoke(app, base).stdout)
    whole = json.loads(runner.invoke(app, [*base, "--transductive"]).stdout)
    res = runner.invoke(
        app, [*base, "--transductive", "--batch", "8", "--active-classes", "3", "--report", str(tmp_path / "rep")]
    )
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert ind["transductive_setting"] is None and whole["transductive_setting"] == "all"
    st_ = r["transductive_setting"]
    assert {k: st_[k] for k in ("batch", "active_classes")} == {"batch": 8, "active_classes": 3}
    assert len(st_["batches_per_seed"]) == 2 and st_["batches"] == sum(st_["batches_per_seed"])
    assert all(n >= 120 // 8 for n in st_["batches_per_seed"])  # 12 classes x 10 test rows, at most 8 a batch
    assert r["report"][0].endswith("_transclip-b8c3.json")
    assert "batches of at most 8 rows drawn from 3 random classes" in json.dumps(
        json.loads(open(r["report"][0]).read())
    )
    human = runner.invoke(app, base[:-1] + ["--transductive", "--batch", "8", "--active-classes", "3"]).output
    assert "TransCLIP (transductive, batches of 8 from 3 classes:" in human
    bad = runner.invoke(app, [*base, "--transductive", "--batch", "8", "--active-classes", "13"])
    assert bad.exit_code == 2 and "more than the 12 classes" in bad.output
    bad = runner.invoke(app, [*base, "--batch", "8", "--active-classes", "3"])
    assert bad.exit_code == 2 and "add --transductive" in bad.output


def test_api_base_to_new_in_batches(tmp_path):
    st = make_synthetic_store(tmp_path / "s.zarr", n_classes=12, joint=True)
    r = api.evaluate(
        EvalConfig(
            store=str(st.path),
            protocol="base-to-new",
            classifier="text",
            shots=2,
            seeds=(1,),
            transductive=True,
            batch=10,
            active_classes=2,
        )
    )
    assert r.new is not None and r.base is not None
    assert r.transductive_setting["batches"] == r.transductive_setting["batches_per_seed"][0] >= 2
    assert "realistic setting" in r.protocol_text()


# --- fskd bench --transductive: a row per TransCLIP setting ------------------------------------------


def test_bench_transductive_rows_equal_eval_of_the_same_state(tmp_path):
    from fskd.config import AdaptConfig, BenchConfig

    st = make_synthetic_store(tmp_path / "s.zarr", n_classes=12, joint=True)
    out = tmp_path / "bench"
    r = runner.invoke(
        app,
        [
            "bench",
            "--stores",
            str(st.path),
            "--methods",
            "tip-adapter",
            "--shots",
            "2",
            "--seeds",
            "1",
            "--transductive",
            "all,8:3",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert row["status"] == "ok" and set(row["transductive"]) == {"all", "8:3"}
    for setting in row["transductive"].values():  # the shot weight each seed kept, chosen on few-shot val rows
        assert (
            "few-shot-val rows" in setting["shot_weight"]["chosen_by"] and len(setting["shot_weight"]["per_seed"]) == 1
        )
    # the same fit scored by fskd eval: inductive, all at once, and in batches of 8 rows from 3 classes
    fit = api.adapt(AdaptConfig(store=str(st.path), method="tip-adapter", shots=2, seed=1, out=str(tmp_path / "tip")))
    ev = dict(store=str(st.path), state=fit.out, protocol="allway", shots=2, seeds=(1,))
    assert row["accuracy"] == pytest.approx(api.evaluate(EvalConfig(**ev)).accuracy)
    assert row["transductive"]["all"]["accuracy"] == pytest.approx(
        api.evaluate(EvalConfig(**ev, transductive=True)).accuracy
    )
    assert row["transductive"]["8:3"]["accuracy"] == pytest.approx(
        api.evaluate(EvalConfig(**ev, transductive=True, batch=8, active_classes=3)).accuracy
    )
    table = (out / "table.md").read_text()
    assert "| tip-adapter |" in table and "| tip-adapter +TransCLIP |" in table
    assert "| tip-adapter +TransCLIP[8:3] |" in table and "in batches of 8 test rows drawn from 3" in table
    # timing.md: the fit's seconds on its row, each TransCLIP row's own joint-inference seconds
    timing = {
        line.split(" | ")[0].strip("| "): float(line.split(" | ")[1].strip(" |"))
        for line in (out / "timing.md").read_text().splitlines()
        if line.startswith("| tip-adapter")
    }
    assert timing["tip-adapter"] == pytest.approx(row["fit_seconds"], abs=0.0051)  # printed to .2f
    for setting, label in (("all", "tip-adapter +TransCLIP"), ("8:3", "tip-adapter +TransCLIP[8:3]")):
        assert timing[label] == pytest.approx(row["transductive"][setting]["eval_seconds"], abs=0.0051)
    # a setting that is neither 'all' nor B:C, or an episodic grid, is refused before any cell runs
    with pytest.raises(ConfigError, match="'all'.*B:C"):
        BenchConfig(stores=(str(st.path),), methods=("prototype",), transductive=("64",))
    with pytest.raises(ConfigError, match="--transductive.*not episodic"):
        BenchConfig(stores=(str(st.path),), methods=("prototype",), protocol="episodic", transductive=("all",))


def test_plot_series_names_method_policy_and_transclip_setting():
    """The plot draws one colour per method, a row of panels per policy and TransCLIP rows in their
    method's colour: each table label maps back to (method, policy, setting, legend name)."""
    from fskd.reports.bench import by_selection, plot_series, with_transductive

    rows = [
        {"key": "a", "method": "gda", "hp_selection": "none", "status": "ok", "transductive": {"all": {}, "64:4": {}}},
        {"key": "b", "method": "gda", "hp_selection": "full-val", "status": "ok"},
    ]
    assert plot_series(by_selection(with_transductive(rows))) == {
        "gda [none]": ("gda", "none", None, "gda"),
        "gda +TransCLIP [none]": ("gda", "none", "all", "gda +TransCLIP"),
        "gda +TransCLIP[64:4] [none]": ("gda", "none", "64:4", "gda +TransCLIP[64:4]"),
        "gda [full-val]": ("gda", "full-val", None, "gda"),
    }
    # one policy: labels are the methods themselves
    assert plot_series(by_selection(with_transductive(rows[1:]))) == {"gda": ("gda", "full-val", None, "gda")}
