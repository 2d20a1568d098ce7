"""Two training-free baselines of issue 31: ``proker`` (Bendou et al., CVPR 2025) and ``ape`` (Zhu
et al., ICCV 2023). Each against cases worked by hand and oracles written from the authors'
formulas (numpy, one episode at a time), then fitted, saved and scored by ``fskd eval --state``
all-way on joint and non-joint synthetic stores."""

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
from fskd.methods.adapt.ape import BETA as APE_BETA
from fskd.methods.adapt.ape import DEFAULT as APE_DEFAULT
from fskd.methods.adapt.ape import (
    FittedAPE,
    correct_counts,
    criterion,
    key_divergence,
    refined_cache,
    select_channels,
)
from fskd.methods.adapt.ape import search as ape_search
from fskd.methods.adapt.proker import (
    BETA,
    LAMBDA,
    FittedProKeR,
    proker_coef,
    search_beta_lam,
    transferred_default,
)
from fskd.methods.adapt.regimes import ALLWAY, EPISODIC, Task
from fskd.methods.adapt.text_space import TextSpace, view_keys, view_rows
from fskd.methods.adapt.validation import VAL_CLASSES, hp
from tests import baseline_helpers as B

#: small APE grids for the fits below (the authors' grid is 200 x 20 x 20)
APE_FAST = {"val_episodes": 40, "beta": [1.0, 3.0, 5.5], "alpha": [0.1, 1.0, 3.0, 6.0], "gamma": [0.0, 0.5, 0.95]}
FAST = {"proker": {"val_episodes": 40}, "ape": APE_FAST}


def _episodes(E=3, N=4, K=3, M=10, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(E, N, 1, D, generator=g, dtype=dtype), dim=-1)
    support = F.normalize(centres + 0.6 * torch.randn(E, N, K, D, generator=g, dtype=dtype), dim=-1)
    truth = torch.randint(0, N, (E, M), generator=g)
    query = F.normalize(
        centres[torch.arange(E)[:, None], truth, 0] + 0.6 * torch.randn(E, M, D, generator=g, dtype=dtype), dim=-1
    )
    text = F.normalize(centres[:, :, 0] + 0.8 * torch.randn(E, N, D, generator=g, dtype=dtype), dim=-1)
    return support, query, truth, text


# -- ProKeR -----------------------------------------------------------------------------------------
def test_proker_two_shots_in_two_dimensions_by_hand():
    """Shots x1 = (1, 0) of class 0 and x2 = (0, 1) of class 1; the text is swapped (t0 = (0, 1),
    t1 = (1, 0)), so z(S) = [[0, 1], [1, 0]] and R = Y - z(S) = [[1, -1], [-1, 1]]. beta = ln 2:
    k(x1, x2) = exp(-ln 2) = 1/2, K = [[1, .5], [.5, 1]]; lambda = 1: (K + I)^-1 = [[2, -.5], [-.5, 2]] / 3.75,
    A = [[2/3, -2/3], [-2/3, 2/3]]. At q = (1, 0): z = (0, 1), k(q, S) = (1, 1/2), correction
    (2/3 - 1/3, -2/3 + 1/3): logits (1/3, 2/3). lambda -> infinity: A = R, logits (1/2, 1/2);
    lambda -> 0: zero-shot (0, 1)."""
    rows = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    labels = torch.tensor([[0, 1]])
    text = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    q = torch.tensor([[[1.0, 0.0]]])
    beta = math.log(2)
    coef = proker_coef(rows, labels, text, beta, 1.0)
    torch.testing.assert_close(coef[0].float(), torch.tensor([[2 / 3, -2 / 3], [-2 / 3, 2 / 3]]))
    ident = lambda x: x  # noqa: E731
    for lam, want in ((1.0, (1 / 3, 2 / 3)), (1e9, (0.5, 0.5)), (1e-9, (0.0, 1.0))):
        got = FittedProKeR(text, rows, proker_coef(rows, labels, text, beta, lam), beta, ident).logits(q)[0, 0]
        torch.testing.assert_close(got, torch.tensor(want), atol=1e-6, rtol=0)


def test_proker_is_an_rbf_kernel_ridge_regression_solved_by_numpy_per_episode():
    """Batched over episodes, against numpy one episode at a time: A = solve(K / lam + I, Y - X T^T)
    (the authors' line) = lam * (K + lam I)^-1 R (lam times the kernel ridge regression of R with
    ridge lam), and the prediction z(q) + k(q, S) A."""
    support, query, _, text = _episodes(E=3, N=4, K=3, D=16, dtype=torch.float64)
    E, N, K, D = support.shape
    rows, labels = support.reshape(E, N * K, D), torch.arange(N).repeat_interleave(K)[None].expand(E, -1)
    beta, lam = 1.7, 0.3
    coef = proker_coef(rows, labels, text, beta, lam)
    logits = FittedProKeR(text, rows, coef, beta, lambda x: x).logits(query)
    assert logits.shape == (E, query.shape[1], N) and torch.isfinite(logits).all()
    for e in range(E):
        x, t, qq = rows[e].numpy(), text[e].numpy(), query[e].numpy()
        kss = np.exp(-beta * (1 - x @ x.T))
        r = np.eye(N)[labels[e].numpy()] - x @ t.T
        a = np.linalg.solve(kss / lam + np.eye(N * K), r)
        np.testing.assert_allclose(coef[e].numpy(), a, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(a, lam * np.linalg.solve(kss + lam * np.eye(N * K), r), rtol=1e-8, atol=1e-10)
        want = qq @ t.T + np.exp(-beta * (1 - qq @ x.T)) @ a
        np.testing.assert_allclose(logits[e].numpy(), want, rtol=1e-5, atol=1e-5)


def test_proker_small_lambda_is_zero_shot_and_large_lambda_a_residual_cache():
    """lam -> 0 (the heaviest regularisation toward the zero-shot classifier): zero-shot logits
    exactly; lam -> infinity: z(q) + k(q, S) (Y - z(S)), an unnormalised cache of the residuals."""
    support, query, _, text = _episodes()
    E, N, K, D = support.shape
    rows, labels = support.reshape(E, N * K, D), torch.arange(N).repeat_interleave(K)[None].expand(E, -1)
    zs = torch.bmm(query, text.transpose(1, 2))
    small = FittedProKeR(text, rows, proker_coef(rows, labels, text, 2.0, 1e-12), 2.0, lambda x: x).logits(query)
    torch.testing.assert_close(small, zs, atol=1e-6, rtol=0)
    large = FittedProKeR(text, rows, proker_coef(rows, labels, text, 2.0, 1e12), 2.0, lambda x: x).logits(query)
    res = F.one_hot(labels, N).float() - torch.bmm(rows, text.transpose(1, 2))
    cache = torch.bmm(torch.exp(-2.0 * (1 - torch.bmm(query, rows.transpose(1, 2)))), res)
    torch.testing.assert_close(large, zs + cache, atol=1e-4, rtol=1e-4)


def _task(support, query, truth):
    E, N = support.shape[:2]
    return Task(
        support=support,
        classes=torch.arange(N)[None].expand(E, -1),
        query=query,
        truth=truth,
        description="test episodes",
        on=VAL_CLASSES,
    )


def test_proker_search_equals_a_solve_per_candidate_and_keeps_the_first_best():
    """The search reweights one eigendecomposition per beta; each candidate's accuracy equals a
    direct Cholesky solve and the head's argmax, and the winner is the first best (beta outer)."""
    support, query, truth, text = _episodes(E=5, N=4, K=2, M=12, D=16, seed=3)
    task = _task(support, query, truth)
    space = lambda s, c: TextSpace(text, lambda x: F.normalize(x, dim=-1), s)  # noqa: E731
    betas, lams = (0.5, 2.0, 6.0), (0.001, 0.1, 1.0, 30.0)
    choice, (rows, labels, coef) = search_beta_lam(task, space, betas, lams, {"beta": 1.0, "lam": 1.0})
    table = []
    for b in betas:
        for lam in lams:
            head = FittedProKeR(text, rows, proker_coef(rows, labels, text, b, lam), b, lambda x: x)
            table.append(((b, lam), task.score(head)))
    best = max(s for _, s in table)
    assert [r["val_acc"] for r in choice.table] == [round(100 * s, 2) for _, s in table]
    assert (choice.params["beta"], choice.params["lam"]) == next(c for c, s in table if s == best)
    torch.testing.assert_close(coef, proker_coef(rows, labels, text, choice.params["beta"], choice.params["lam"]))


def test_proker_defaults_are_the_authors_grid_and_imagenet_transfer():
    assert len(BETA) == 20 and BETA[0] == 0.5 and BETA[-1] == 3.0
    assert len(LAMBDA) == 10 and LAMBDA[0] == 0.001 and LAMBDA[-1] == 1.0 and LAMBDA[1] == pytest.approx(0.112)
    assert transferred_default(1) == {"beta": 3.0, "lam": 0.05}
    assert transferred_default(5) == {"beta": 1.5, "lam": 0.05}  # nearest in log scale: 4
    assert transferred_default(32) == {"beta": 1.7, "lam": 0.1}


# -- APE --------------------------------------------------------------------------------------------
def test_ape_channel_criterion_by_hand():
    """Two classes, one shot each, 3 channels. t0 = (.6, .8, 0), t1 = (.6, -.8, 0); keys
    k0 = (.6, 0, .8), k1 = (.6, 0, -.8). Class sums (1.2, .8, .8) and (1.2, -.8, -.8); the
    cross-class products summed over ordered pairs, 2 (1.44, -.64, -.64), over 2 x 1 x 2^2 = 8
    pairs of rows: sim = (.36, -.16, -.16). The text variance over the classes (unbiased):
    (0, 1.28, 0). w = .5: criterion (-.18, .72, .08): channel 0, shared by both classes, goes first."""
    t = torch.tensor([[[0.6, 0.8, 0.0], [0.6, -0.8, 0.0]]])
    k = torch.tensor([[[[0.6, 0.0, 0.8]], [[0.6, 0.0, -0.8]]]])
    torch.testing.assert_close(criterion(t, k, 0.5)[0], torch.tensor([-0.18, 0.72, 0.08]))
    assert select_channels(t, k, 0.5, 2)[0].tolist() == [1, 2]
    assert select_channels(t, k, 1.0, 1)[0].tolist() == [1]  # similarity only: a tie of 1 and 2, topk's first
    assert select_channels(t, k, 0.0, 1)[0].tolist() == [1]  # variance only


def _authors_criterion(text: np.ndarray, keys: np.ndarray, w: float) -> np.ndarray:
    """cal_criterion (only_use_txt=False) as the authors loop: text (N, D), keys (N, K, D)."""
    feats = np.concatenate([text[:, None], keys], 1)
    N, R, D = feats.shape
    s, count = np.zeros(D), 0
    for i in range(N):
        for j in range(N):
            for m in range(R):
                for n in range(R):
                    if i != j:
                        s += feats[i, m] * feats[j, n]
                        count += 1
    return -w * s / count + (1 - w) * np.var(text, axis=0, ddof=1)


def _authors_ape(q, text, keys, labels, idx, alpha, beta, gamma):
    """The authors' APE logits (main.py) for one episode, numpy."""
    n = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    tw, kk, qq = n(text[:, idx]), n(keys[:, idx]), n(q[:, idx])
    values = np.eye(text.shape[0])[labels]
    logits = kk @ tw.T
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    div = (values * np.log2((values + 1e-6) / (p + 1e-6))).sum(1)[:, None]
    soft = values * np.exp(div * gamma)
    return 100 * q @ text.T + alpha * np.exp(-beta * (1 - qq @ kk.T)) @ soft


def test_ape_batched_equals_the_authors_formulas_per_episode():
    support, query, _, text = _episodes(E=3, N=4, K=3, D=20, dtype=torch.float64)
    E, N, K, D = support.shape
    cache = refined_cache(text.float(), support.float(), 0.3, 0.6)
    assert cache.idx.shape == (E, 12)
    logits = FittedAPE(text.float(), cache, 2.0, 3.5, 0.4, lambda x: x).logits(query.float())
    assert logits.shape == (E, query.shape[1], N) and torch.isfinite(logits).all()
    for e in range(E):
        crit = _authors_criterion(text[e].numpy(), support[e].numpy(), 0.3)
        np.testing.assert_allclose(
            criterion(text[e : e + 1], support[e : e + 1], 0.3)[0].numpy(), crit, rtol=1e-5, atol=1e-7
        )
        idx = np.argsort(-crit, kind="stable")[:12]
        assert sorted(idx.tolist()) == sorted(cache.idx[e].tolist())
        want = _authors_ape(
            query[e].numpy(),
            text[e].numpy(),
            support[e].reshape(N * K, D).numpy(),
            np.repeat(np.arange(N), K),
            cache.idx[e].numpy(),
            2.0,
            3.5,
            0.4,
        )
        np.testing.assert_allclose(logits[e].numpy(), want, rtol=1e-4, atol=1e-3)


def test_ape_key_weights_grow_with_the_texts_error():
    """div = KL(one-hot || softmax(F' t'^T)) in bits = log2((1 + 1e-6) / (p_y + 1e-6)): a key the
    text places on its own class gets a smaller weight exp(gamma div) than one it misplaces."""
    t = torch.eye(2)[None]
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # both keys point at class 0's text
    div = key_divergence(keys, t, torch.tensor([[0, 1]]))
    p0 = 1 / (1 + math.exp(-1))
    torch.testing.assert_close(
        div[0], torch.tensor([math.log2((1 + 1e-6) / (p0 + 1e-6)), math.log2((1 + 1e-6) / (1 - p0 + 1e-6))])
    )
    assert div[0, 1] > div[0, 0] > 0


def test_ape_alpha_intervals_count_what_argmax_counts():
    g = torch.Generator().manual_seed(0)
    text, cache = torch.randn(7, 30, 5, generator=g), torch.randn(4, 7, 30, 5, generator=g)
    truth = torch.randint(0, 5, (7, 30), generator=g)
    alphas = torch.tensor([0.0, 0.1, 0.5, 1.0, 3.0, 10.0])
    want = torch.stack([((text + a * cache).argmax(-1) == truth).sum((-1, -2)) for a in alphas])
    assert torch.equal(correct_counts(text, cache, truth, alphas), want)


def test_ape_search_equals_scoring_every_candidate_with_the_head():
    support, query, truth, text = _episodes(E=6, N=4, K=2, M=12, D=24, seed=5)
    task = _task(support, query, truth)
    space = lambda s, c: TextSpace(text, lambda x: F.normalize(x, dim=-1), s)  # noqa: E731
    grid = {
        "w_sim": (0.2, 0.7),
        "feat_frac": (0.5, 1.0),
        "beta": (1.0, 4.0),
        "alpha": (0.1, 2.0, 6.0),
        "gamma": (0.0, 0.9),
    }
    choice = ape_search(task, space, grid, {})
    best, best_s = None, -1.0
    for w in grid["w_sim"]:
        for fr in grid["feat_frac"]:
            cache = refined_cache(text, support, w, fr)
            for b in grid["beta"]:
                for a in grid["alpha"]:
                    for gm in grid["gamma"]:
                        s = task.score(FittedAPE(text, cache, a, b, gm, lambda x: x))
                        if s > best_s + 1e-9:
                            best, best_s = {"w_sim": w, "feat_frac": fr, "beta": b, "alpha": a, "gamma": gm}, s
    assert choice.params == best and choice.score == pytest.approx(best_s)


def test_ape_defaults_are_the_authors_grid():
    assert len(APE_BETA) == 200 and APE_BETA[0] == pytest.approx(0.1) and APE_BETA[-1] == pytest.approx(6.9655)


# -- fitted, saved, scored --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["joint", "pair"])
@pytest.mark.parametrize("method", ["proker", "ape"])
def test_state_scored_by_fskd_eval_all_way(method, kind, baseline_stores, tmp_path):
    st = baseline_stores[kind]
    out = tmp_path / method
    state = B.cli_adapt(st, method, out, FAST[method])
    searched = ("beta", "lam") if method == "proker" else ("beta", "alpha", "gamma")
    for k in searched:
        assert state.selected_on[f"allway.{k}"] == "chosen on val split (min(K, 4) per class)", state.selected_on
        assert state.selected_on[f"episodic.{k}"] == "chosen on val classes"
    if method == "ape":
        assert state.selected_on["allway.w_sim"].startswith("fixed (the median of the authors'")
        assert state.metrics["allway.channels"] == round(32 * 700 / 1024)
    B.cli_allway_accuracy(st, out)


@pytest.mark.parametrize("method", ["proker", "ape"])
def test_fits_are_deterministic_and_without_validation_use_the_authors_defaults(
    method, baseline_stores, tmp_path, monkeypatch
):
    st = baseline_stores["joint"]
    a, b = (
        api.adapt(
            AdaptConfig(
                store=str(st.path), method=method, shots=2, out=str(tmp_path / t), device="cpu", options=FAST[method]
            ),
            progress=None,
        )
        for t in ("a", "b")
    )
    sa, sb = load_state(a.out), load_state(b.out)
    assert sa.hparams == sb.hparams and all(torch.equal(sa.tensors[k], sb.tensors[k]) for k in sa.tensors)
    # no validation data at all: the authors' own fallbacks, said so in the state
    for name in ("allway_val_task", "episodic_val_task"):
        monkeypatch.setattr(validation, name, lambda *a, **k: None)
    r = api.adapt(
        AdaptConfig(store=str(st.path), method=method, shots=2, out=str(tmp_path / "none"), device="cpu"), progress=None
    )
    s = load_state(r.out)
    want = transferred_default(2) if method == "proker" else APE_DEFAULT
    for regime in (EPISODIC, ALLWAY):
        assert {k: s.hparams[f"{regime}.{k}"] for k in want} == want
        assert all(s.selected_on[f"{regime}.{k}"].startswith("default (no validation data)") for k in want)


def test_beat_zero_shot_on_a_separable_store_and_new_classes_are_zero_shot(tmp_path):
    """Shots matter on this store (the text is an imperfect class centre); in base-to-new a new
    class has no shot, so both give it zero-shot's prediction."""
    path = B.clip_like_store(tmp_path / "clip-like.zarr")
    acc, new = {}, {}
    for m in ("zero-shot", "proker", "ape"):
        opts = FAST.get(m, {})
        r = api.adapt(
            AdaptConfig(store=path, method=m, shots=8, out=str(tmp_path / m), device="cpu", options=opts), progress=None
        )
        acc[m] = api.evaluate(
            EvalConfig(store=path, state=r.out, protocol="allway", shots=8, seeds=(1,), device="cpu")
        ).accuracy
        r = api.adapt(
            AdaptConfig(
                store=path,
                method=m,
                shots=8,
                out=str(tmp_path / f"{m}-b2n"),
                device="cpu",
                base_to_new=True,
                options=opts,
            ),
            progress=None,
        )
        ev = api.evaluate(
            EvalConfig(store=path, state=r.out, protocol="base-to-new", shots=8, seeds=(1,), device="cpu")
        )
        assert np.isfinite(ev.base) and ev.base > 100 / 6
        new[m] = ev.new
    assert acc["proker"] > acc["zero-shot"] + 5 and acc["ape"] > acc["zero-shot"] + 5, acc
    assert new["proker"] == new["ape"] == new["zero-shot"] > 100 / 6, new


def test_stored_views_are_the_rows_of_proker_and_the_cache_keys_of_ape(tmp_path):
    """ProKeR uses every augmented view as a row (the authors' 10 crops per shot); APE's cache key
    is the normalised mean of a shot's views (Tip-Adapter's cache); both keep that head."""
    from fskd.store import FeatureStore

    path = B.views_store(tmp_path, 4)
    store = FeatureStore.open(path)
    states = {m: B.fit_on_views(path, m, tmp_path / m, 4, FAST[m]) for m in ("proker", "ape")}
    st = states["proker"]
    ts, views = B.own_shots(st, store)
    n = ts.support.shape[1]
    rows = view_rows(ts, views).reshape(1, n * 8, -1)
    torch.testing.assert_close(st.tensors["allway.fitted.rows"], rows)
    labels = torch.arange(n).repeat_interleave(8)[None]
    coef = proker_coef(rows, labels, F.normalize(ts.weights, dim=-1), hp(st, ALLWAY, "beta"), hp(st, ALLWAY, "lam"))
    torch.testing.assert_close(st.tensors["allway.fitted.coef"], coef)
    st = states["ape"]
    ts, views = B.own_shots(st, store)
    torch.testing.assert_close(st.tensors["allway.fitted.keys"], view_keys(ts, views))


@pytest.mark.parametrize("method", ["proker", "ape"])
def test_a_store_without_text_is_refused_like_other_text_methods(method, tmp_path):
    B.assert_refuses_a_store_without_text(method, tmp_path)


def test_registered_with_what_they_can_do():
    for m in ("proker", "ape"):
        B.assert_registered_as_text_baseline(m)


@pytest.mark.parametrize("method", ["proker", "ape"])
def test_a_non_joint_store_also_searches_the_wide_scale_values(method, baseline_stores, tmp_path):
    """The authors' grids assume CLIP's cosine scale: on a joint store fskd searches exactly their
    grid; through the bridge (non-joint) the scale-bearing value (ProKeR's lambda, APE's alpha)
    may also take the wide values, after theirs."""
    fixed = (
        {"val_episodes": 20, "beta": [1.0]}
        if method == "proker"
        else {"val_episodes": 20, "beta": [3.0], "gamma": [0.5]}
    )
    want = {
        "proker": {"joint": "1 beta x 10 lambda", "pair": "1 beta x 18 lambda"},
        "ape": {"joint": "1x20x1", "pair": "1x34x1"},
    }[method]
    for kind in ("joint", "pair"):
        r = api.adapt(
            AdaptConfig(
                store=str(baseline_stores[kind].path),
                method=method,
                shots=2,
                out=str(tmp_path / kind),
                device="cpu",
                options=fixed,
            ),
            progress=None,
        )
        assert load_state(r.out).hparams["grid"] == want[kind]
