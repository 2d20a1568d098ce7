"""``ape-t``, APE's trained form (Zhu et al., ICCV 2023): the trained logits worked by hand, the
residual and value weights against a one-episode re-derivation of the authors' ``APE_Training``
and ``APE_T`` loop (their index assignment, torch's AdamW and cosine schedule), the search against
scoring every candidate with the head, gradients, batching, the state round trip, stored views,
and the fitted all-way head against zero-shot on the real cub35 store."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fskd import api
from fskd.config import AdaptConfig, EvalConfig
from fskd.methods import load_state
from fskd.methods.adapt import validation
from fskd.methods.adapt.ape import select_channels
from fskd.methods.adapt.ape_t import (
    EPOCHS,
    FEAT_FRAC,
    W_SIM,
    FittedAPET,
    Products,
    Recipe,
    apet_logits,
    channels,
    search,
    train,
    trained_parts,
)
from fskd.methods.adapt.regimes import ALLWAY, EPISODIC
from fskd.methods.adapt.text_space import TextSpace, view_keys
from tests import baseline_helpers as B

#: a short fit for the synthetic stores (the authors' 30 epochs and 200 x 20 grid are the defaults)
FAST = {"val_episodes": 40, "epochs": 5, "beta": [1.0, 3.0, 5.5], "alpha": [0.1, 1.0, 3.0, 6.0]}


def _recipe(**kw) -> Recipe:
    base = dict(
        init_alpha=1.0,
        init_beta=1.0,
        w_sim=W_SIM,
        feat_frac=0.5,
        criterion="text",
        epochs=6,
        lr=1e-2,
        eps=1e-3,
        weight_decay=0.1,
        batch_size=5,
    )
    return Recipe(**{**base, **kw})


def _space(E=3, N=4, K=3, M=10, D=16, seed=0):
    """E episodes: support (E, N, K, D), queries (E, M, D) with their ways, text (E, N, D), all L2."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(E, N, 1, D, generator=g), dim=-1)
    support = F.normalize(centres + 0.7 * torch.randn(E, N, K, D, generator=g), dim=-1)
    truth = torch.randint(0, N, (E, M), generator=g)
    query = F.normalize(centres[torch.arange(E)[:, None], truth, 0] + 0.7 * torch.randn(E, M, D, generator=g), dim=-1)
    text = F.normalize(centres[:, :, 0] + 0.9 * torch.randn(E, N, D, generator=g), dim=-1)
    return TextSpace(text, lambda x: F.normalize(x, dim=-1), support), query, truth


def test_trained_logits_by_hand():
    """N = 2 classes, one shot each, D = 2, the residual in channel 1 only (Q = 1). Text t0 = (1, 0),
    t1 = (0, 1); keys k0 = (.6, .8), k1 = (.8, -.6); residual r0 = .5, r1 = -.5; value weights
    (2, 1). Then t0' = (1, .5), t1' = (0, .5), k0' = (.6, 1.3), k1' = (.8, -1.1) (no normalisation),
    values [[2, 0], [0, 1]]. At x = (1, 0), alpha 3, beta 2: text 100 (1, 0); affinities
    exp(-2 (1 - .6)) = e^-.8 and exp(-2 (1 - .8)) = e^-.4; logits (100 + 3 * 2 e^-.8, 3 e^-.4). At
    x = (0, 1): text 100 (.5, .5), affinities e^(2 * .3) and e^(-2 * 2.1): (50 + 6 e^.6, 50 + 3 e^-4.2)."""
    w = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    keys = torch.tensor([[[0.6, 0.8], [0.8, -0.6]]])
    idx = torch.tensor([[1]])
    res = torch.tensor([[[0.5], [-0.5]]])
    vw = torch.tensor([[2.0, 1.0]])
    w2, k2, v2 = trained_parts(w, keys, idx, res, vw)
    torch.testing.assert_close(w2[0], torch.tensor([[1.0, 0.5], [0.0, 0.5]]))
    torch.testing.assert_close(k2[0], torch.tensor([[0.6, 1.3], [0.8, -1.1]]))
    torch.testing.assert_close(v2[0], torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    want = torch.tensor(
        [[100 + 6 * math.exp(-0.8), 3 * math.exp(-0.4)], [50 + 6 * math.exp(0.6), 50 + 3 * math.exp(-4.2)]]
    )
    torch.testing.assert_close(apet_logits(q, w2, k2, v2, alpha=3.0, beta=2.0)[0], want)
    head = FittedAPET(w2, k2, v2, 3.0, 2.0, lambda x: x)
    torch.testing.assert_close(head.logits(q)[0], want)
    # no keys (a class set with no shot): the text weights alone
    torch.testing.assert_close(FittedAPET(w, keys[:, :0], v2[:, :0], 3.0, 2.0, lambda x: x).logits(q)[0], 100 * q[0])


def test_the_residual_lives_in_the_refined_channels_and_gradients_reach_both_parameters():
    ts, query, truth = _space(E=2, N=3, K=2, D=12)
    E, N, K, D = ts.support.shape
    idx = channels(ts.weights, ts.support, W_SIM, 0.5, "text")
    assert idx.shape == (E, 6)
    res = torch.randn(E, N, 6, requires_grad=True)
    vw = torch.ones(E, N * K, requires_grad=True)
    keys = ts.support.reshape(E, N * K, D)
    w2, k2, v2 = trained_parts(ts.weights, keys, idx, res, vw)
    out = torch.ones(E, D, dtype=torch.bool)
    out[torch.arange(E)[:, None], idx] = False
    assert torch.all((w2 - ts.weights)[out[:, None].expand(-1, N, -1)] == 0)  # nothing moves outside the channels
    dk = (k2 - keys).reshape(E, N, K, D)
    torch.testing.assert_close(dk[:, :, 0], dk[:, :, 1])  # a class's keys share its residual ...
    torch.testing.assert_close(dk[:, :, 0], w2 - ts.weights)  # ... with its text weight
    loss = F.cross_entropy(apet_logits(query, w2, k2, v2, 1.0, 1.0).reshape(-1, N), truth.reshape(-1))
    loss.backward()
    assert res.grad is not None and vw.grad is not None
    assert torch.isfinite(res.grad).all() and torch.isfinite(vw.grad).all()
    assert (res.grad.abs() > 0).all() and (vw.grad.abs() > 0).all()


def test_the_text_criterion_is_the_authors_only_use_txt_loop():
    """``criterion=text`` (what their APE_Training asks cal_criterion for): the similarity over
    pairs of different classes' text weights only, count N (N - 1); ``text+cache`` is ape's."""
    ts, _, _ = _space(E=1, N=4, K=3, D=10, seed=2)
    t = ts.weights[0].double().numpy()
    s = sum(t[i] * t[j] for i in range(4) for j in range(4) if i != j) / 12
    crit = -W_SIM * s + (1 - W_SIM) * np.var(t, axis=0, ddof=1)
    want = np.argsort(-crit, kind="stable")[:5]
    assert sorted(channels(ts.weights, ts.support, W_SIM, 0.5, "text")[0].tolist()) == sorted(want.tolist())
    torch.testing.assert_close(
        channels(ts.weights, ts.support, W_SIM, 0.5, "text+cache"), select_channels(ts.weights, ts.support, W_SIM, 5)
    )


def test_training_scores_are_the_trained_logits_and_leave_one_out_drops_a_shots_own_key():
    """:class:`Products` (what a training step scores, without forming the trained keys) equals
    :func:`apet_logits` of :func:`trained_parts`; with ``own`` each query's own key is left out."""
    ts, _, _ = _space(E=2, N=3, K=2, D=12, seed=3)
    E, N, K, D = ts.support.shape
    keys = ts.support.reshape(E, N * K, D)
    idx = channels(ts.weights, ts.support, W_SIM, 0.5, "text")
    g = torch.Generator().manual_seed(0)
    res, vw = 0.3 * torch.randn(E, N, 6, generator=g), 1 + torch.rand(E, N * K, generator=g)
    w2, k2, v2 = trained_parts(ts.weights, keys, idx, res, vw)
    p = Products.of(keys, ts.weights, keys, idx)
    torch.testing.assert_close(p.logits(res, vw, 2.0, 3.0), apet_logits(keys, w2, k2, v2, 2.0, 3.0))
    loo = p.logits(res, vw, 2.0, 3.0, own=torch.arange(N * K))
    for s in range(N * K):
        keep = torch.arange(N * K) != s
        want = apet_logits(keys[:, s : s + 1], w2, k2[:, keep], v2[:, keep], 2.0, 3.0)
        torch.testing.assert_close(loo[:, s : s + 1], want)


def _authors_loop(ts: TextSpace, recipe: Recipe, perms: list[torch.Tensor]) -> tuple:
    """One episode as the authors' APE_T trains it (fp32): nn.Parameters res (N, Q) and
    value_weights (S, 1), their forward's index assignment (keys (S, D), clip_weights (D, N)),
    AdamW and a cosine schedule stepped per batch, cross-entropy, the rows in ``perms`` order."""
    _, N, K, D = ts.support.shape
    keys, cw = ts.support[0].reshape(N * K, D), ts.weights[0].T
    values = F.one_hot(torch.arange(N).repeat_interleave(K), N).float()
    idx = channels(ts.weights, ts.support, recipe.w_sim, recipe.feat_frac, recipe.criterion)[0]
    res = torch.nn.Parameter(torch.zeros(N, len(idx)))
    vw = torch.nn.Parameter(torch.ones(N * K, 1))

    def forward():
        nk = keys.clone()
        nk[:, idx] = nk[:, idx] + res.unsqueeze(1).repeat(1, K, 1).reshape(-1, len(idx))
        nw = cw.clone()
        nw[idx, :] = cw[idx, :] + res.t()
        return nk, nw, values * vw

    opt = torch.optim.AdamW([vw, res], lr=recipe.lr, eps=recipe.eps, weight_decay=recipe.weight_decay)
    n_batches = math.ceil(N * K / recipe.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, recipe.epochs * n_batches)
    target = torch.arange(N).repeat_interleave(K)
    for perm in perms:
        for i in range(0, N * K, recipe.batch_size):
            r = perm[i : i + recipe.batch_size]
            nk, nw, nv = forward()
            f = keys[r]
            logits = 100.0 * f @ nw + recipe.init_alpha * torch.exp(-recipe.init_beta * (1 - f @ nk.t())) @ nv
            loss = F.cross_entropy(logits, target[r])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return forward()


def test_training_equals_the_authors_loop_per_episode_and_batched_episodes_train_alone():
    """Three episodes trained at once equal each trained alone, and each equals the authors' loop
    (re-derived above) fed the same batches; a refit to the same number of epochs retraces it."""
    ts, _, _ = _space(E=3, N=4, K=3, D=16, seed=4)
    recipe = _recipe()
    run = train(ts, recipe, seed=7)
    assert run.epoch == recipe.epochs and run.weights.shape == (3, 4, 16) and run.keys.shape == (3, 12, 16)
    assert run.values.shape == (3, 12, 4) and all(torch.isfinite(t).all() for t in (run.weights, run.keys, run.values))
    g = torch.Generator().manual_seed(7)
    perms = [torch.randperm(12, generator=g) for _ in range(recipe.epochs)]
    for e in range(3):
        one = TextSpace(ts.weights[e : e + 1], ts.embed, ts.support[e : e + 1])
        alone = train(one, recipe, seed=7)
        for a, b in ((alone.weights, run.weights), (alone.keys, run.keys), (alone.values, run.values)):
            torch.testing.assert_close(a[0], b[e], rtol=1e-5, atol=1e-6)
        nk, nw, nv = _authors_loop(one, recipe, perms)
        torch.testing.assert_close(run.keys[e], nk, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(run.weights[e], nw.T, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(run.values[e], nv, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(run.values, F.one_hot(torch.arange(4).repeat_interleave(3), 4).float())  # it trained


def test_validation_keeps_the_best_epoch_and_a_refit_to_it_retraces_the_run():
    ts, query, truth = _space(E=4, N=4, K=2, M=12, D=16, seed=5)
    recipe = _recipe(epochs=8, lr=5e-2)
    run = train(ts, recipe, seed=3, val=(query, truth))
    assert len(run.curve) == 8 and 1 <= run.epoch <= 8
    assert run.curve[run.epoch - 1] == max(run.curve) and max(run.curve[: run.epoch - 1], default=-1) < max(run.curve)
    again = train(ts, recipe, seed=3, stop=run.epoch)
    for a, b in ((again.weights, run.weights), (again.keys, run.keys), (again.values, run.values)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_search_equals_scoring_every_candidate_with_the_head():
    ts, query, truth = _space(E=5, N=4, K=2, M=12, D=16, seed=6)
    run = train(ts, _recipe(epochs=3), seed=1)
    betas, alphas = (0.5, 2.0, 6.0), (0.1, 1.0, 30.0, 500.0)
    choice, count = search(query, truth, run, betas, alphas)
    best, best_s = None, -1
    for b in betas:
        for a in alphas:
            pred = FittedAPET(run.weights, run.keys, run.values, a, b, lambda x: x).logits(query).argmax(-1)
            s = int((pred == truth).sum())
            if s > best_s:
                best, best_s = {"beta": b, "alpha": a}, s
    assert choice == best and count == best_s


# -- fitted, saved, scored --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["joint", "pair"])
def test_state_scored_by_fskd_eval_all_way(kind, baseline_stores, tmp_path):
    st = baseline_stores[kind]
    state = B.cli_adapt(st, "ape-t", tmp_path / "s", FAST)
    for k in ("beta", "alpha", "epochs"):
        assert state.selected_on[f"allway.{k}"].startswith("chosen on val split (min(K, 4) per class)"), (
            state.selected_on
        )
        assert state.selected_on[f"episodic.{k}"].startswith("chosen on val classes")
    assert state.hparams["epoch_budget"] == 5 and state.selected_on["epoch_budget"] == "fixed (--set option)"
    assert state.hparams["w_sim"] == W_SIM and state.selected_on["w_sim"].startswith("fixed (the authors' APE_T")
    assert state.metrics["allway.channels"] == round(32 * FEAT_FRAC)
    assert {"allway.fitted.weights", "allway.fitted.keys", "allway.fitted.values"} <= set(state.tensors)
    B.cli_allway_accuracy(st, tmp_path / "s")


def test_without_validation_it_trains_every_epoch_at_the_authors_init_values(baseline_stores, tmp_path, monkeypatch):
    for name in ("allway_val_task", "episodic_val_task"):
        monkeypatch.setattr(validation, name, lambda *a, **k: None)
    r = api.adapt(
        AdaptConfig(
            store=str(baseline_stores["joint"].path), method="ape-t", shots=2, out=str(tmp_path / "s"), device="cpu"
        ),
        progress=None,
    )
    s = load_state(r.out)
    for regime in (EPISODIC, ALLWAY):
        assert {k: s.hparams[f"{regime}.{k}"] for k in ("epochs", "beta", "alpha")} == {
            "epochs": EPOCHS,
            "beta": 1.0,
            "alpha": 1.0,
        }
        assert s.selected_on[f"{regime}.beta"].startswith("default (no validation data)")


def test_stored_views_are_the_cache_keys_and_the_training_queries(tmp_path):
    """The keys start at the normalised mean of a shot's views (Tip-Adapter's cache) and move by
    their class's residual; the kept head is the one the search trained."""
    from fskd.store import FeatureStore

    path = B.views_store(tmp_path, 4)
    store = FeatureStore.open(path)
    st = B.fit_on_views(path, "ape-t", tmp_path / "apet", 4, FAST)
    ts, views = B.own_shots(st, store)
    n = ts.support.shape[1]
    moved = (st.tensors["allway.fitted.keys"] - view_keys(ts, views)).reshape(1, n, 2, -1)
    torch.testing.assert_close(moved[:, :, 0], moved[:, :, 1])
    torch.testing.assert_close(moved[:, :, 0], st.tensors["allway.fitted.weights"] - ts.weights)


def test_registered_with_what_it_can_do_and_refuses_a_store_without_text(tmp_path):
    B.assert_registered_as_text_baseline("ape-t")
    B.assert_refuses_a_store_without_text("ape-t", tmp_path)


def test_real_cub35_ape_t_beats_zero_shot_at_4_shots(cub35_store, tmp_path):
    """All-way, 4 shots, seed 1, the authors' recipe: far above zero-shot (whose bridged text is weak
    on cub35: 8.9 against 58.6 when written), with every parameter finite."""
    acc = {}
    for m in ("zero-shot", "ape-t"):
        r = api.adapt(
            AdaptConfig(store=cub35_store, method=m, shots=4, seed=1, out=str(tmp_path / m), device="cpu"),
            progress=None,
        )
        acc[m] = api.evaluate(
            EvalConfig(store=cub35_store, state=r.out, protocol="allway", shots=4, seeds=(1,), device="cpu")
        ).accuracy
    st = load_state(tmp_path / "ape-t")
    assert all(torch.isfinite(t.float()).all() for t in st.tensors.values())
    assert 1 <= st.hparams["allway.epochs"] <= EPOCHS
    assert acc["ape-t"] > acc["zero-shot"] + 30, acc
