"""Two baselines of issue 31: ``taskres`` (Yu et al., CVPR 2023) and ``cross-modal-lp`` (Lin et al.,
CVPR 2023). Each against cases worked by hand and against torch's own optimisers (Adam, AdamW)
on the authors' schedules, batched against one-at-a-time, then fitted, saved and scored by
``fskd eval`` on joint and non-joint synthetic stores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fskd import api
from fskd.config import AdaptConfig, EvalConfig
from fskd.methods import METHODS, load_state
from fskd.methods.adapt import validation
from fskd.methods.adapt.clap import WARMUP_LR
from fskd.methods.adapt.coop import dassl_lr
from fskd.methods.adapt.cross_modal_lp import (
    fit_weights,
    halves,
    lr_at,
    search,
    train_probe,
    valid_batch_sizes,
)
from fskd.methods.adapt.regimes import ALLWAY, allway_rows
from fskd.methods.adapt.taskres import default_epochs, fit_residuals, residual_grad, train_residual
from fskd.methods.adapt.text_space import class_text, support_text_space
from fskd.methods.adapt.validation import allway_val_task, hp
from tests import baseline_helpers as B

R2 = 2**-0.5
FAST_CM = {"iters": 200, "val_episodes": 10}  # cross-modal-lp at 200 steps: the authors' 12800 is minutes


@pytest.fixture(scope="module")
def clip_like(tmp_path_factory):
    """The store on which the shots matter (GDA's test store in test_baselines.py)."""
    return B.clip_like_store(tmp_path_factory.mktemp("cliplike") / "clip-like.zarr")


# -- TaskRes ---------------------------------------------------------------------------------------
def test_taskres_gradient_and_first_step_by_hand():
    """Text weights e1, e2; one shot x = (1, 1)/sqrt 2 of class 0, alpha 0.5, r = 0. Logits
    100 x.t = (70.7, 70.7): softmax (1/2, 1/2), d = (-1/2, 1/2). dL/dw^_0 = -50 x, projected off
    w^_0 = e1: (0, -35.36); dL/dw^_1 = 50 x, off e2: (35.36, 0); times alpha: +-17.68. Adam's first
    step is -lr sign(g), at Dassl's warm-up lr 1e-5: r = ((0, 1e-5), (-1e-5, 0))."""
    x = torch.tensor([[[R2, R2]]])
    t = torch.eye(2)[None]
    onehot = torch.tensor([[[1.0, 0.0]]])
    g = residual_grad(x, onehot, t, torch.zeros_like(t), torch.tensor(0.5).reshape(1, 1, 1))
    h = 25 * 2**0.5 / 2  # 0.5 * 50 / sqrt 2
    torch.testing.assert_close(g[0], torch.tensor([[0.0, -h], [h, 0.0]]))
    r = train_residual(x[:, None], torch.tensor([[0]]), t, [0.5], seed=0, epochs=1)
    torch.testing.assert_close(r[0, 0], torch.tensor([[0.0, 1e-5], [-1e-5, 0.0]]), rtol=1e-5, atol=1e-12)
    assert default_epochs(1) == default_epochs(4) == 100 and default_epochs(8) == default_epochs(16) == 200


def _taskres_reference(x, y, t, alpha, epochs, lr, wd=5e-4):
    """The authors' loop, one episode, full batch: r = 0, torch.optim.Adam(weight_decay), Dassl's
    warm-up + cosine, logits 100 <x, (t + alpha r) / |t + alpha r|>."""
    r = torch.nn.Parameter(torch.zeros_like(t))
    opt = torch.optim.Adam([r], lr=lr, weight_decay=wd)
    B.torch_steps(
        opt,
        epochs,
        lambda epoch: dassl_lr(epoch, epochs, lr, WARMUP_LR),
        lambda: F.cross_entropy(100 * x @ F.normalize(t + alpha * r, dim=-1).T, y),
    )
    return r.detach()


def test_taskres_batched_training_equals_torch_adam_per_episode():
    E, N, K, D = 3, 4, 3, 10
    x, y, t = B.random_rows(E, N, K, D, seed=0)
    ours = train_residual(x[:, None], y, t, [0.5, 1.0], seed=3, epochs=12, lr=2e-2)  # (A, E, N, D)
    assert ours.shape == (2, E, N, D) and torch.isfinite(ours).all() and ours.abs().max() > 1e-3
    for a, alpha in enumerate((0.5, 1.0)):
        for e in range(E):
            ref = _taskres_reference(x[e], y[e], t[e], alpha, 12, 2e-2)
            torch.testing.assert_close(ours[a, e], ref, rtol=1e-4, atol=1e-6)


def test_taskres_candidates_share_the_batches_so_a_refit_is_the_kept_head():
    """Mini-batches (10 shots in batches of 4: 2 per epoch, 2 left out) and 3 views drawn per
    shot per epoch: alpha 1.0 trained beside 0.5 equals alpha 1.0 alone; identical views equal
    one row per shot."""
    g = torch.Generator().manual_seed(1)
    rows = F.normalize(torch.randn(2, 3, 10, 8, generator=g), dim=-1)
    y = torch.arange(5).repeat_interleave(2)[None].expand(2, -1).contiguous()
    t = F.normalize(torch.randn(2, 5, 8, generator=g), dim=-1)
    both = train_residual(rows, y, t, [0.5, 1.0], seed=7, epochs=9, batch=4)
    alone = train_residual(rows, y, t, [1.0], seed=7, epochs=9, batch=4)
    torch.testing.assert_close(both[1], alone[0])
    assert not torch.allclose(both[0], both[1])
    same = rows[:, :1].expand(-1, 3, -1, -1)
    torch.testing.assert_close(
        train_residual(same, y, t, [0.5], seed=7, epochs=5, batch=16),
        train_residual(rows[:, :1], y, t, [0.5], seed=7, epochs=5, batch=16),
    )


# -- cross-modal linear probe ------------------------------------------------------------------------
def test_cross_modal_schedule_is_the_authors_warmup_then_cosine():
    """LinearWarmupScheduler(50, 1e-5) over CosineAnnealingLR(12800), stepped every iteration."""
    assert (
        lr_at(0, 1e-3) == 1e-5 and lr_at(25, 1e-3) == pytest.approx(5e-4) and lr_at(49, 1e-3) == pytest.approx(9.8e-4)
    )
    assert lr_at(50, 1e-3) == pytest.approx(1e-3) and lr_at(50 + 6400, 1e-3) == pytest.approx(5e-4)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1e-3)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 12800.0)
    for i in range(50, 400):
        assert lr_at(i, 1e-3) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        cos.step()
    assert halves(8, 0.5) == (4, 4) and halves(7, 0.5) == (4, 3) and halves(32, 0.0) == (32, 0)


def test_cross_modal_batch_sizes_follow_the_authors_rule():
    assert valid_batch_sizes([8, 32], 100, 50, 0.5) == ([8, 32], "")
    ok, note = valid_batch_sizes([8, 32], 10, 5, 0.5)  # 5-way 2-shot: 16 text rows of 5 is not valid
    assert ok == [8] and "[32] left out" in note
    ok, note = valid_batch_sizes([8, 32], 3, 2, 0.5)  # none valid: their code stops, fskd cuts the halves
    assert ok == [8] and "cut to its set" in note
    assert valid_batch_sizes([8], 4, 50, 0.0)[0] == [8]  # uni-modal: no text half


def test_cross_modal_first_step_by_hand():
    """Rows: image (1, 0) of class 1, text e1 (class 0) and e2 (class 1); W0 = (e1, e2). Batch 4 =
    both halves whole. Logits 100 x W^T: the image row gives (100, 0) against label 1, so
    d = (1, -1) / 3 (the text rows are right, d ~ 0); dL/dW = 100 d^T x = (+-33.3, 0).
    AdamW's first step at the warm-up lr 1e-5: W0 (1 - lr wd) - lr sign(g)."""
    img = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    txt = torch.eye(2, dtype=torch.float64)[None]
    w = train_probe(
        img, torch.tensor([[1]]), txt, torch.tensor([[0, 1]]), txt, [1e-3], [1e-2], batch=4, steps=1, seed=0
    ).weights[0, 0]
    lr, wd = 1e-5, 1e-2
    expect = torch.tensor([[1 - lr * wd - lr, 0.0], [lr, 1 - lr * wd]], dtype=torch.float64)
    torch.testing.assert_close(w, expect, rtol=0, atol=1e-12)


def _cm_reference(img, iy, txt, ty, w0, lr, wd, steps, iters, warmup):
    """The authors' train() for one episode with both halves whole: torch.optim.AdamW on a bias-free
    linear head, logits 100 normalise(x) W^T, their scheduler, cross-entropy of image + text rows."""
    W = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([W], lr=lr, weight_decay=wd)
    x, y = torch.cat([img, txt]), torch.cat([iy, ty])
    B.torch_steps(
        opt,
        steps,
        lambda i: lr_at(i, lr, iters, warmup),
        lambda: F.cross_entropy(100 * F.normalize(x, dim=-1) @ W.T, y),
    )
    return W.detach()


def test_cross_modal_batched_training_equals_torch_adamw_per_episode():
    E, N, K, D = 3, 3, 2, 12
    img, iy, txt = B.random_rows(E, N, K, D, seed=2)
    ty = torch.arange(N)[None].expand(E, -1).contiguous()
    pairs = [(1e-2, 0.0), (1e-2, 1e-2), (1e-3, 1e-4)]
    run = train_probe(
        img,
        iy,
        txt,
        ty,
        txt,
        [p[0] for p in pairs],
        [p[1] for p in pairs],
        batch=64,
        steps=40,
        seed=0,
        iters=40,
        warmup=5,
    )
    assert run.weights.shape == (3, E, N, D) and torch.isfinite(run.weights).all()
    for j, (lr, wd) in enumerate(pairs):
        for e in range(E):
            ref = _cm_reference(img[e], iy[e], txt[e], ty[e], txt[e], lr, wd, 40, 40, 5)
            torch.testing.assert_close(run.weights[j, e], ref, rtol=1e-4, atol=1e-6)


def test_cross_modal_checkpoints_keep_each_pair_at_its_earliest_best():
    """Validation after steps 1, 11, 21, ... (every 10); a pair keeps its weights at its first best
    checkpoint; training that pair alone for that many steps gives the same weights (the loaders
    are shared by the pairs, mini-batches and reshuffles included)."""
    g = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(1, 20, 6, generator=g), dim=-1)
    iy = torch.arange(4).repeat_interleave(5)[None]
    txt = F.normalize(torch.randn(1, 4, 6, generator=g), dim=-1)
    ty = torch.arange(4)[None]
    scores = iter([[0.1, 0.5], [0.3, 0.5], [0.3, 0.4], [0.2, 0.5], [0.1, 0.1]])
    run = train_probe(
        img,
        iy,
        txt,
        ty,
        txt,
        [1e-2, 1e-3],
        [0.0, 1e-2],
        batch=6,
        steps=50,
        seed=4,
        iters=50,
        warmup=5,
        score=lambda W: torch.tensor(next(scores)),
        eval_every=10,
        keep_best=True,
    )
    assert run.checkpoints == [1, 11, 21, 31, 41] and run.history.shape == (2, 5)
    for j, steps in ((0, 11), (1, 1)):
        alone = train_probe(
            img, iy, txt, ty, txt, [[1e-2, 1e-3][j]], [[0.0, 1e-2][j]], batch=6, steps=steps, seed=4, iters=50, warmup=5
        ).weights[0]
        torch.testing.assert_close(run.best[j], alone)
    assert not torch.allclose(run.best[0], run.weights[0])


def test_cross_modal_search_breaks_ties_in_the_authors_order(baseline_stores):
    """Candidates in the authors' loop order (lr, weight decay, batch size, then the checkpoints);
    on this easy store many tie at the best validation accuracy and the first of them wins (their
    strict ``>``, at both levels); its weights at that checkpoint are kept."""
    st = baseline_stores["joint"]
    cfg = AdaptConfig(store=str(st.path), method="cross-modal-lp", shots=2, out="unused", device="cpu")
    task = allway_val_task(st, cfg, torch.device("cpu"))
    text = class_text(st, cfg, "cross-modal-lp")[0]
    opts = METHODS.get("cross-modal-lp").options(iters=120, eval_every=40)
    space = lambda s, c: support_text_space(s, c, text, True, None)  # noqa: E731
    choice, _ = search(task, space, {"lr": (1e-3, 1e-4), "weight_decay": (0.0, 1e-2), "batch_size": (8, 32)}, opts, 1)
    order = [(r["lr"], r["weight_decay"], r["batch_size"], r["steps"]) for r in choice.table]
    assert order == [(lr, wd, b, s) for lr in (1e-3, 1e-4) for wd in (0.0, 1e-2) for b in (8, 32) for s in (1, 41, 81)]
    top = max(r["val_acc"] for r in choice.table)
    ties = [r for r in choice.table if r["val_acc"] == top]
    assert len(ties) > 1 and choice.params == {k: ties[0][k] for k in ("lr", "weight_decay", "batch_size", "steps")}
    assert choice.fitted.shape == (1, st.num_classes, st.dim)


# -- fitted, saved, scored ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["joint", "pair"])
@pytest.mark.parametrize("method", ["taskres", "cross-modal-lp"])
def test_state_scored_by_fskd_eval_all_way(method, kind, baseline_stores, tmp_path):
    st = baseline_stores[kind]
    out = tmp_path / method
    state = B.cli_adapt(st, method, out, FAST_CM if method == "cross-modal-lp" else {})
    if method == "taskres":
        assert state.hparams["allway.alpha"] == state.hparams["episodic.alpha"] == 0.5
        assert "no validation data" in state.selected_on["allway.alpha"] and state.hparams["allway.epochs"] == 100
        assert state.tensors["allway.fitted.residual"].shape == (1, st.num_classes, st.dim)
        assert state.tensors["allway.fitted.residual"].abs().max() > 0
    else:
        for k in ("lr", "weight_decay", "batch_size", "steps"):
            assert state.selected_on[f"allway.{k}"] == "chosen on val split (min(K, 4) per class)"
            assert state.selected_on[f"episodic.{k}"] == "chosen on val classes"
        assert state.hparams["allway.steps"] in range(1, 201, 100) and state.hparams["episodic.batch_size"] == 8
        assert state.tensors["allway.fitted.weights"].shape == (1, st.num_classes, st.dim)
    B.cli_allway_accuracy(st, out)
    ev = api.evaluate(
        EvalConfig(store=str(st.path), state=str(out), protocol="episodic", way=5, shots=1, episodes=20, device="cpu")
    )
    assert np.isfinite(ev.accuracy) and ev.accuracy > 40


def test_kept_heads_equal_a_refit_on_the_same_shots(baseline_stores, tmp_path):
    """The all-way head kept in the state is what training the chosen settings on the state's
    shots gives (cross-modal-lp: the winner trained alone for its chosen steps)."""
    st = baseline_stores["pair"]
    x, _, classes = allway_rows(st, 2, 1)
    support = torch.from_numpy(x).reshape(len(classes), 2, -1)[None]
    cls = torch.from_numpy(classes)[None]
    for method, opts in (("taskres", {"alpha": [0.5, 2.0], "val_episodes": 20}), ("cross-modal-lp", FAST_CM)):
        r = api.adapt(
            AdaptConfig(
                store=str(st.path), method=method, shots=2, out=str(tmp_path / method), device="cpu", options=opts
            ),
            progress=None,
        )
        state = load_state(r.out)
        ts = support_text_space(support, cls, state.tensors["text"], st.joint, hp(state, ALLWAY, "ridge"))
        if method == "taskres":
            assert state.selected_on["allway.alpha"].startswith("chosen on val split")
            refit = fit_residuals(
                ts,
                [hp(state, ALLWAY, "alpha")],
                1,
                {k: state.hparams[k] for k in ("epochs", "lr", "batch_size", "weight_decay")},
            )[0]
            torch.testing.assert_close(state.tensors["allway.fitted.residual"], refit)
        else:
            torch.testing.assert_close(state.tensors["allway.fitted.weights"], fit_weights(ts, state, ALLWAY, 1))


def test_fits_are_deterministic_for_a_seed(baseline_stores, tmp_path):
    st = baseline_stores["pair"]
    for method, opts in (("taskres", {}), ("cross-modal-lp", FAST_CM)):
        states = [
            load_state(
                api.adapt(
                    AdaptConfig(
                        store=str(st.path),
                        method=method,
                        shots=2,
                        seed=3,
                        device="cpu",
                        out=str(tmp_path / f"{method}{i}"),
                        options=opts,
                    ),
                    progress=None,
                ).out
            )
            for i in range(2)
        ]
        assert states[0].hparams == states[1].hparams
        for k, v in states[0].tensors.items():
            assert torch.equal(v, states[1].tensors[k]), (method, k)


def test_validation_rows_read_by_cross_modal_lp_and_not_by_taskres(baseline_stores, tmp_path, monkeypatch):
    """TaskRes with its fixed alpha reads no validation row on a joint store; the cross-modal
    probe's lr, weight decay, batch size and steps are chosen on them."""
    calls = []

    def refuse(*a, **k):
        raise AssertionError("a validation row was read")

    st = baseline_stores["joint"]
    real = {n: getattr(validation, n) for n in ("allway_val_task", "episodic_val_task", "allway_val_rows")}
    for name in real:
        monkeypatch.setattr(validation, name, refuse)
    r = api.adapt(
        AdaptConfig(store=str(st.path), method="taskres", shots=2, out=str(tmp_path / "t"), device="cpu"), progress=None
    )
    assert not any("chosen on" in str(v) for v in r.selected_on.values()), r.selected_on
    for name, fn in real.items():
        monkeypatch.setattr(validation, name, lambda *a, _fn=fn, _n=name, **k: (calls.append(_n), _fn(*a, **k))[1])
    api.adapt(
        AdaptConfig(
            store=str(st.path), method="cross-modal-lp", shots=2, out=str(tmp_path / "c"), device="cpu", options=FAST_CM
        ),
        progress=None,
    )
    assert {"allway_val_task", "episodic_val_task"} <= set(calls)


def test_both_beat_zero_shot_on_a_separable_store_and_give_new_classes_their_text(clip_like, tmp_path):
    """The shots matter on this store; base-to-new: a new class has no shot, so no residual (TaskRes)
    and its text weight (the probe): both score the new classes exactly as zero-shot does."""
    acc, new = {}, {}
    for m in ("zero-shot", "taskres", "cross-modal-lp"):
        opts = FAST_CM if m == "cross-modal-lp" else {}
        r = api.adapt(
            AdaptConfig(store=clip_like, method=m, shots=8, out=str(tmp_path / m), device="cpu", options=opts),
            progress=None,
        )
        acc[m] = api.evaluate(
            EvalConfig(store=clip_like, state=r.out, protocol="allway", shots=8, seeds=(1,), device="cpu")
        ).accuracy
        r = api.adapt(
            AdaptConfig(
                store=clip_like,
                method=m,
                shots=8,
                out=str(tmp_path / f"b2n-{m}"),
                device="cpu",
                base_to_new=True,
                options=opts,
            ),
            progress=None,
        )
        ev = api.evaluate(
            EvalConfig(store=clip_like, state=r.out, protocol="base-to-new", shots=8, seeds=(1,), device="cpu")
        )
        new[m] = ev.new
        assert np.isfinite(ev.base) and ev.base > 100 / 6
    assert acc["taskres"] > acc["zero-shot"] + 5 and acc["cross-modal-lp"] > acc["zero-shot"] + 5, acc
    assert new["taskres"] == new["cross-modal-lp"] == new["zero-shot"] > 100 / 6, new


def test_stored_views_are_used_and_recorded(tmp_path):
    """With ``--augment-views`` in the store TaskRes draws one view per shot per epoch and the
    cross-modal probe adds every view as a row; both say so in the state."""
    path = B.views_store(tmp_path, 3)
    for m, opts in (("taskres", {}), ("cross-modal-lp", FAST_CM)):
        B.fit_on_views(path, m, tmp_path / m, 3, opts)


@pytest.mark.parametrize("method", ["taskres", "cross-modal-lp"])
def test_a_store_without_text_is_refused_like_other_text_methods(method, tmp_path):
    B.assert_refuses_a_store_without_text(method, tmp_path)


def test_registered_with_what_they_can_do():
    from fskd.catalog import method_info

    for m in ("taskres", "cross-modal-lp"):
        B.assert_registered_as_text_baseline(m)
        assert "CVPR 2023" in METHODS.describe(m)
    names = {o["name"] for o in method_info("taskres")["options"]}
    assert {"alpha", "epochs", "lr", "batch_size", "weight_decay", "ridge"} <= names
    names = {o["name"] for o in method_info("cross-modal-lp")["options"]}
    assert {"lr", "weight_decay", "batch_size", "iters", "eval_every", "warmup_iters", "text_ratio"} <= names
    assert math.isclose(math.exp(4.60517), 100.0, rel_tol=1e-6)  # the authors' logit 4.60517 is fskd's scale 100
