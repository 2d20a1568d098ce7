"""``clip-adapter`` (Gao et al., IJCV 2024): against a case worked by hand, against the authors'
module (nn.Linear layers without biases, ReLUs) trained by torch.optim.SGD on CoOp's schedule one
episode at a time, then fitted, saved and scored by ``fskd eval`` on joint and non-joint stores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fskd import api
from fskd.config import AdaptConfig, EvalConfig
from fskd.methods import load_state
from fskd.methods.adapt import validation
from fskd.methods.adapt.clip_adapter import RECIPE_KEYS, ClipAdapterOptions, fit_adapters, init_weights, train_adapters
from fskd.methods.adapt.regimes import ALLWAY, allway_rows
from fskd.methods.adapt.text_space import support_text_space
from fskd.methods.adapt.validation import hp
from tests import baseline_helpers as B

DEFAULTS = {k: getattr(ClipAdapterOptions(), k) for k in RECIPE_KEYS}


def recipe(**kw) -> dict:
    return {**DEFAULTS, **kw}


def _authors_module(D: int, seed: int) -> torch.nn.Sequential:
    """The authors' ``Adapter``: Linear(D, D/4, bias=False), ReLU, Linear(D/4, D, bias=False), ReLU,
    with fskd's seeded start (nn.Linear keeps (out, in) weights)."""
    fc = torch.nn.Sequential(
        torch.nn.Linear(D, D // 4, bias=False),
        torch.nn.ReLU(),
        torch.nn.Linear(D // 4, D, bias=False),
        torch.nn.ReLU(),
    )
    w1, w2 = init_weights(D, D // 4, seed)
    with torch.no_grad():
        fc[0].weight.copy_(w1.T)
        fc[2].weight.copy_(w2.T)
    return fc


def _cosine_lrs(lr: float, epochs: int) -> list[float]:
    """torch's CosineAnnealingLR(T_max=epochs) from ``lr``, one value per step."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(epochs))
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        cos.step()
    return out


def _authors_fit(x, y, t, ratio, epochs, rec, orders, seed):
    """The authors' CustomCLIP forward and Dassl's loop for one episode: SGD(momentum, weight decay),
    one constant warm-up epoch, then the cosine stepped per epoch; the batches in ``orders``."""
    fc = _authors_module(x.shape[-1], seed)
    opt = torch.optim.SGD(fc.parameters(), lr=rec["lr"], momentum=rec["momentum"], weight_decay=rec["weight_decay"])
    cos = _cosine_lrs(rec["lr"], epochs)
    bs = min(rec["batch_size"], len(x))
    stop = (len(x) // bs) * bs
    for epoch, (perm, _) in enumerate(orders):
        for g in opt.param_groups:
            g["lr"] = rec["warmup_lr"] if epoch == 0 else cos[epoch - 1]
        for i in range(0, stop, bs):
            idx = perm[i : i + bs]
            feats = ratio * fc(x[idx]) + (1 - ratio) * x[idx]
            logits = rec["logit_scale"] * F.normalize(feats, dim=-1) @ F.normalize(t, dim=-1).T
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return fc[0].weight.detach().T, fc[2].weight.detach().T


def test_first_step_by_hand():
    """D = 4, a bottleneck of 1, one shot x = -sign(W1[0, 0]) e1: x W1 <= 0, the first ReLU is dead,
    A(x) = 0 and no gradient reaches W1 or W2. SGD's first step then moves each weight by its
    decay alone: W <- W - lr wd W at the warm-up lr 1e-5 (momentum's buffer starts at the gradient)."""
    w1_0, w2_0 = init_weights(4, 1, 0)
    assert w1_0.shape == (4, 1) and w2_0.shape == (1, 4)
    assert w1_0.abs().max() <= 0.5 and w2_0.abs().max() <= 1.0  # nn.Linear's bound 1/sqrt(fan_in)
    x = torch.zeros(1, 1, 1, 4)
    x[..., 0] = -float(torch.sign(w1_0[0, 0]))
    t = torch.eye(4)[None, :2]
    w1, w2 = train_adapters(x, torch.tensor([[0]]), t, [0.2], seed=0, epochs=1, recipe=recipe())
    decay = 1 - 1e-5 * 5e-4
    torch.testing.assert_close(w1[0, 0], w1_0 * decay, rtol=0, atol=1e-9)
    torch.testing.assert_close(w2[0, 0], w2_0 * decay, rtol=0, atol=1e-9)


@pytest.mark.parametrize("K", [2, 13])  # 13 shots x 3 classes = 39 rows: one batch of 32, 7 dropped
def test_batched_training_equals_the_authors_module_per_episode(K):
    E, N, D = 3, 3, 16
    x, y, t = B.random_rows(E, N, K, D, seed=0)
    rec = recipe(lr=0.05)
    orders: list = []
    w1, w2 = train_adapters(x[:, None], y, t, [0.2, 0.6], seed=4, epochs=6, recipe=rec, orders=orders)
    assert w1.shape == (2, E, D, D // 4) and w2.shape == (2, E, D // 4, D) and torch.isfinite(w1).all()
    w1_0, _ = init_weights(D, D // 4, 4)
    assert (w1[0] - w1_0).abs().max() > 1e-4  # it learned
    for a, ratio in enumerate((0.2, 0.6)):
        for e in range(E):
            r1, r2 = _authors_fit(x[e], y[e], t[e], ratio, 6, rec, orders, seed=4)
            torch.testing.assert_close(w1[a, e], r1, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(w2[a, e], r2, rtol=1e-4, atol=1e-6)


def test_the_fit_does_not_depend_on_a_rows_norm():
    """No biases and ReLUs: A(c x) = c A(x), so raw features (the authors') and L2-normalised rows
    (the store's) train the same adapter."""
    x, y, t = B.random_rows(2, 3, 4, 12, seed=1)
    scale = torch.rand(2, 12, 1, generator=torch.Generator().manual_seed(0)) * 9 + 1
    a = train_adapters(x[:, None], y, t, [0.2], seed=0, epochs=5, recipe=recipe(lr=0.05))
    b = train_adapters((x * scale)[:, None], y, t, [0.2], seed=0, epochs=5, recipe=recipe(lr=0.05))
    torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-6)


def test_candidates_share_the_batches_and_views():
    g = torch.Generator().manual_seed(1)
    rows = F.normalize(torch.randn(2, 3, 40, 8, generator=g), dim=-1)
    y = torch.arange(5).repeat_interleave(8)[None].expand(2, -1).contiguous()
    t = F.normalize(torch.randn(2, 5, 8, generator=g), dim=-1)
    rec = recipe(lr=0.05)
    both = train_adapters(rows, y, t, [0.2, 0.5], seed=7, epochs=4, recipe=rec)
    alone = train_adapters(rows, y, t, [0.5], seed=7, epochs=4, recipe=rec)
    torch.testing.assert_close(both[0][1], alone[0][0])
    same = rows[:, :1].expand(-1, 3, -1, -1)
    torch.testing.assert_close(
        train_adapters(same, y, t, [0.2], seed=7, epochs=3, recipe=rec)[0],
        train_adapters(rows[:, :1], y, t, [0.2], seed=7, epochs=3, recipe=rec)[0],
    )


@pytest.mark.parametrize("kind", ["joint", "pair"])
def test_state_scored_by_fskd_eval(kind, baseline_stores, tmp_path):
    st = baseline_stores[kind]
    out = tmp_path / "ca"
    state = B.cli_adapt(st, "clip-adapter", out, {"epochs": 20})
    assert state.hparams["allway.ratio"] == state.hparams["episodic.ratio"] == 0.2
    assert "no validation data" in state.selected_on["allway.ratio"] and state.hparams["allway.epochs"] == 20
    assert state.tensors["allway.fitted.w1"].shape == (1, st.dim, st.dim // 4)
    B.cli_allway_accuracy(st, out)
    ev = api.evaluate(
        EvalConfig(store=str(st.path), state=str(out), protocol="episodic", way=5, shots=1, episodes=20, device="cpu")
    )
    assert np.isfinite(ev.accuracy) and ev.accuracy > 40


def test_a_ratio_list_is_chosen_on_validation_and_the_kept_head_is_a_refit(baseline_stores, tmp_path):
    st = baseline_stores["pair"]
    r = api.adapt(
        AdaptConfig(
            store=str(st.path),
            method="clip-adapter",
            shots=2,
            out=str(tmp_path / "ca"),
            device="cpu",
            options={"ratio": [0.2, 0.6], "epochs": 10, "val_episodes": 20},
        ),
        progress=None,
    )
    state = load_state(r.out)
    assert state.selected_on["allway.ratio"].startswith("chosen on val split")
    assert state.selected_on["episodic.ratio"].startswith("chosen on val classes")
    x, _, classes = allway_rows(st, 2, 1)
    support = torch.from_numpy(x).reshape(len(classes), 2, -1)[None]
    ts = support_text_space(
        support, torch.from_numpy(classes)[None], state.tensors["text"], st.joint, hp(state, ALLWAY, "ridge")
    )
    w1, w2 = fit_adapters(ts, [hp(state, ALLWAY, "ratio")], 1, {k: state.hparams[k] for k in RECIPE_KEYS})
    torch.testing.assert_close(state.tensors["allway.fitted.w1"], w1[0])
    torch.testing.assert_close(state.tensors["allway.fitted.w2"], w2[0])


def test_the_fixed_ratio_reads_no_validation_row(baseline_stores, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a validation row was read")

    for name in ("allway_val_task", "episodic_val_task", "allway_val_rows"):
        monkeypatch.setattr(validation, name, refuse)
    r = api.adapt(
        AdaptConfig(
            store=str(baseline_stores["joint"].path),
            method="clip-adapter",
            shots=2,
            out=str(tmp_path / "ca"),
            device="cpu",
            options={"epochs": 5},
        ),
        progress=None,
    )
    assert not any("chosen on" in str(v) for v in r.selected_on.values()), r.selected_on


def test_beats_zero_shot_on_a_separable_store_and_gives_new_classes_an_adapted_text_head(tmp_path, tmp_path_factory):
    clip_like = B.clip_like_store(tmp_path_factory.mktemp("cliplike") / "clip-like.zarr")
    acc = {}
    for m in ("zero-shot", "clip-adapter"):
        r = api.adapt(
            AdaptConfig(store=clip_like, method=m, shots=8, out=str(tmp_path / m), device="cpu"), progress=None
        )
        acc[m] = api.evaluate(
            EvalConfig(store=clip_like, state=r.out, protocol="allway", shots=8, seeds=(1,), device="cpu")
        ).accuracy
    assert acc["clip-adapter"] > acc["zero-shot"] + 5, acc
    r = api.adapt(
        AdaptConfig(
            store=clip_like, method="clip-adapter", shots=8, out=str(tmp_path / "b2n"), device="cpu", base_to_new=True
        ),
        progress=None,
    )
    ev = api.evaluate(
        EvalConfig(store=clip_like, state=r.out, protocol="base-to-new", shots=8, seeds=(1,), device="cpu")
    )
    assert np.isfinite(ev.base) and np.isfinite(ev.new) and ev.new > 100 / 6


def test_stored_views_are_used_and_recorded(tmp_path):
    B.fit_on_views(B.views_store(tmp_path, 3), "clip-adapter", tmp_path / "ca", 3, {"epochs": 5})


def test_a_store_without_text_is_refused_and_it_is_registered_as_a_text_baseline(tmp_path):
    B.assert_refuses_a_store_without_text("clip-adapter", tmp_path)
    B.assert_registered_as_text_baseline("clip-adapter")
