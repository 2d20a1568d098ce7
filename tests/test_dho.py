"""fskd distill --method dho (Dual-Head Optimization): the inference rule and its alpha/beta search
on hand-worked numbers, the loss on hand-worked numbers and where its gradients go, a tiny
end-to-end CLI run (distill -> reopen -> extract with student:DIR -> eval) whose all-way head is
the mixed prediction, and the refusals. Parity with the authors' code: docs/methods/distillation.md."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fskd import api
from fskd.cli import app
from fskd.config import DistillConfig, EvalConfig
from fskd.encoders import build_encoder
from fskd.errors import ConfigError
from fskd.methods import METHODS, load_state
from fskd.methods.distill.dho import (
    ALPHA_GRID,
    BETA_GRID,
    DHO,
    DHOOptions,
    DualHead,
    DualHeadNet,
    dho_loss,
    linear_warmup_decay,
    mixed_log_probs,
    mixed_probs,
    search_alpha_beta,
)
from fskd.store import FeatureStore

from .test_distill import TINY, TINY_OPTS, tiny_images, tiny_teacher_store  # noqa: F401 - fixtures

runner = CliRunner()
#: test_distill's tiny-student settings, the ones dho has (mtkd's projection and episodes are not dho's)
DHO_TINY = {k: v for k, v in TINY_OPTS.items() if k in {f.name for f in dataclasses.fields(DHOOptions)}}
LN = math.log


# -- the inference rule -------------------------------------------------------------------------------
def test_mixed_prediction_hand_worked():
    # ce = [ln 3, 0] -> softmax [3/4, 1/4]; kd = [0, ln 9], beta 2 -> kd / 2 = [0, ln 3] -> [1/4, 3/4];
    # alpha 1/4: 1/4 [3/4, 1/4] + 3/4 [1/4, 3/4] = [3/16 + 3/16, 1/16 + 9/16] = [0.375, 0.625].
    # beta 1 -> softmax(kd) = [1/10, 9/10]: 1/4 [3/4, 1/4] + 3/4 [1/10, 9/10] = [0.2625, 0.7375]
    ce, kd = torch.tensor([[LN(3), 0.0]]), torch.tensor([[0.0, LN(9)]])
    torch.testing.assert_close(mixed_probs(ce, kd, 0.25, 2.0), torch.tensor([[0.375, 0.625]]))
    torch.testing.assert_close(mixed_probs(ce, kd, 0.25, 1.0), torch.tensor([[0.2625, 0.7375]]))
    torch.testing.assert_close(mixed_probs(ce, kd, 1.0, 1.0), torch.tensor([[0.75, 0.25]]))  # alpha 1: the CE head
    torch.testing.assert_close(mixed_log_probs(ce, kd, 0.25, 2.0).exp(), torch.tensor([[0.375, 0.625]]))


def test_alpha_beta_search_hand_worked():
    # row A (label 0): ce [ln 3, 0] -> [.75, .25]; row B (label 1): ce [ln 1.5, 0] -> [.6, .4];
    # both kd [0, ln 9] -> beta 1: [.1, .9], beta 2: [.25, .75].
    # beta 1: A right iff .75a + .1(1 - a) > .5 (a > .615); B right iff .4a + .9(1 - a) > .5 (a < .8).
    #   a = 0: B only (1 hit: the first best); .25, .5: B only; .75: A (.5875) and B (.525) -> 2 hits; 1: A only.
    # beta 2 (searched after beta 1): A right iff a > .5, B iff .4a + .75(1 - a) > .5 (a < .714): no grid
    #   value is strictly better than 2 hits, so the first best, a = .75 at beta 1, stays.
    ce = torch.tensor([[LN(3), 0.0], [LN(1.5), 0.0]])
    kd = torch.tensor([[0.0, LN(9)], [0.0, LN(9)]])
    y = torch.tensor([0, 1])
    assert search_alpha_beta(ce, kd, y, (0.0, 0.25, 0.5, 0.75, 1.0), (1.0, 2.0)) == (1.0, 0.75, 1.0)
    torch.testing.assert_close(mixed_probs(ce, kd, 0.75, 1.0), torch.tensor([[0.5875, 0.4125], [0.475, 0.525]]))
    # ties keep the first candidate (beta outer, alpha inner): a = 0 and a = 1 both score 1 hit
    assert search_alpha_beta(ce, kd, y, (0.0, 1.0), (1.0,)) == (0.5, 0.0, 1.0)
    # nothing right (alpha 1: the CE head alone predicts class 0 for both rows; labels [1, 1]): the
    # authors' start (alpha 0, beta 1) stays
    assert search_alpha_beta(ce, kd, torch.tensor([1, 1]), (1.0,), (2.0,)) == (0.0, 0.0, 1.0)
    # the default grids are the authors': np.arange(0, 1.05, 0.05) and [0.5, ..., 4]
    np.testing.assert_allclose(ALPHA_GRID, np.arange(0, 1.05, 0.05))
    assert BETA_GRID == (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)


def test_dual_head_logits_are_log_mixed_probs_per_episode():
    """DualHead (what fskd eval uses): softmax of its all-way logits is the mixed prediction; an
    episode's columns are its classes; a class the student never learned scores lowest."""
    torch.manual_seed(0)
    d, c = 6, 4
    w = [torch.randn(c, d), torch.randn(c), torch.randn(c, d), torch.randn(c)]
    train_classes = torch.tensor([0, 2, 3, 5])  # store classes 1 and 4 were never learned
    head = DualHead(*w, train_classes, 0.3, 1.5, n_classes=6)
    q = torch.randn(1, 7, d)
    p = mixed_probs(q[0] @ w[0].T + w[1], q[0] @ w[2].T + w[3], 0.3, 1.5)
    allway = head.fit(torch.zeros(1, 4, 0, d), train_classes[None]).logits(q)
    torch.testing.assert_close(F.softmax(allway[0], -1), p)
    ep = head.fit(torch.zeros(2, 3, 1, d), torch.tensor([[5, 0, 1], [2, 3, 4]])).logits(q.expand(2, -1, -1))
    assert ep.shape == (2, 7, 3)
    torch.testing.assert_close(ep[0, :, :2], p[:, [3, 0]].log())
    assert bool((ep[0, :, 2] < ep[0, :, :2].min(1).values).all()) and torch.isfinite(ep).all()


# -- the loss -----------------------------------------------------------------------------------------
def test_loss_hand_worked():
    # one labelled row: ce [0, 0], label 0 -> CE = ln 2; kd equal to the teacher -> KL 0;
    # one unlabelled row: teacher [2 ln 3, 0] / T=2 -> [.75, .25], student kd [0, 0] -> [.5, .5]:
    #   KL = .75 ln(.75/.5) + .25 ln(.25/.5) = .75 ln 1.5 - .25 ln 2 = 0.1308120, times T^2 = 0.5232481;
    # loss = 0.5 ln 2 + 0.5 (0 + 0.5232481) = 0.3465736 + 0.2616240 = 0.6081976
    out = dho_loss(
        torch.zeros(1, 2),
        torch.tensor([[1.0, -1.0]]),
        torch.zeros(1, 2),
        torch.tensor([[1.0, -1.0]]),
        torch.tensor([[2 * LN(3), 0.0]]),
        torch.tensor([0]),
    )
    assert float(out["task_loss"]) == pytest.approx(LN(2), abs=1e-6)
    assert float(out["kd_labelled"]) == pytest.approx(0.0, abs=1e-6)
    assert float(out["kd_unlabelled"]) == pytest.approx(4 * (0.75 * LN(1.5) - 0.25 * LN(2)), abs=1e-6)
    assert float(out["kd_unlabelled"]) == pytest.approx(0.5232481, abs=1e-6)
    assert float(out["loss"]) == pytest.approx(0.6081976, abs=1e-6)
    assert float(out["kd_loss"]) == pytest.approx(float(out["kd_labelled"] + out["kd_unlabelled"]))


def test_gradients_reach_both_heads_and_the_backbone_each_head_its_own_loss():
    from fskd.encoders.student import build_student_backbone

    torch.manual_seed(0)
    net = DualHeadNet(build_student_backbone("test_resnet", 32), 5)
    x_l, x_u = torch.rand(6, 3, 32, 32), torch.rand(8, 3, 32, 32)
    y, t_l, t_u = torch.tensor([0, 1, 2, 3, 4, 0]), 4 * torch.randn(6, 5), 4 * torch.randn(8, 5)
    net.train()
    # one SGD step first: timm zero-initialises the last BN of each residual branch, which blocks the
    # gradient of that branch at initialisation only
    dho_loss(*net(x_l, x_u), t_l, t_u, y)["loss"].backward()
    torch.optim.SGD(net.parameters(), lr=0.01).step()

    def grads(w_ce: float, w_kd: float) -> dict[str, torch.Tensor | None]:
        net.zero_grad(set_to_none=True)
        out = dho_loss(*net(x_l, x_u), t_l, t_u, y, w_ce=w_ce, w_kd=w_kd)
        assert all(torch.isfinite(v) for v in out.values())
        out["loss"].backward()
        return {n: p.grad for n, p in net.named_parameters()}

    both = grads(0.5, 0.5)
    dead = [n for n, g in both.items() if g is None or not torch.isfinite(g).all() or float(g.abs().sum()) == 0]
    assert not dead, dead
    ce_only, kd_only = grads(1.0, 0.0), grads(0.0, 1.0)
    assert all(
        ce_only[f"kd_head.{k}"] is None or float(ce_only[f"kd_head.{k}"].abs().sum()) == 0 for k in ("weight", "bias")
    )
    assert all(
        kd_only[f"ce_head.{k}"] is None or float(kd_only[f"ce_head.{k}"].abs().sum()) == 0 for k in ("weight", "bias")
    )
    assert float(ce_only["ce_head.weight"].abs().sum()) > 0 and float(kd_only["kd_head.weight"].abs().sum()) > 0


def test_schedule_is_linear_warmup_then_linear_decay():
    f = linear_warmup_decay(100, 0.1)  # transformers.get_linear_schedule_with_warmup(10 warm-up, 100 steps)
    assert [f(s) for s in (0, 5, 10, 55, 100, 120)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]


# -- end to end, through the CLI ----------------------------------------------------------------------
def test_cli_dho_distill_reopen_extract_eval(tiny_teacher_store, tiny_images, tmp_path):  # noqa: F811
    out = tmp_path / "dho"
    sets = [a for k, v in DHO_TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    r = runner.invoke(
        app,
        [
            "distill",
            "--method",
            "dho",
            "--store",
            tiny_teacher_store,
            "--shots",
            "2",
            "--student",
            TINY,
            "--epochs",
            "2",
            "--out",
            str(out),
            "--device",
            "cpu",
            *sets,
        ],
    )
    assert r.exit_code == 0, r.output
    assert f"dho (distill) -> {out}" in r.output
    state = load_state(out)
    assert state.method == "dho" and state.kind == "distill" and state.hparams["regime"] == "semi"
    n_cls, d = len(state.tensors["train_classes"]), 96  # test_resnet's pooled feature
    assert n_cls == 10
    for h in ("ce_head", "kd_head"):
        assert state.tensors[f"{h}.weight"].shape == (n_cls, d) and state.tensors[f"{h}.bias"].shape == (n_cls,)
    assert not any(k.startswith(("classifier", "proj.")) for k in state.tensors)  # mtkd's head is not saved
    assert all(torch.isfinite(v).all() for v in state.tensors.values() if v.is_floating_point())
    hp = state.hparams
    assert hp["alpha"] in ALPHA_GRID and hp["beta"] in BETA_GRID and hp["temperature"] == 2.0
    assert hp["weights"] == {"ce": 0.5, "kd": 0.5}
    for k in ("alpha", "beta", "best_epoch"):
        assert state.selected_on[k].startswith("chosen on val split ("), (k, state.selected_on[k])
    log = state.metrics["log"]
    assert [e["epoch"] for e in log] == [1, 2]
    assert all(np.isfinite(e[k]) for e in log for k in ("loss", "task_loss", "kd_labelled", "kd_unlabelled"))
    best = log[hp["best_epoch"] - 1]
    assert (best["alpha"], best["beta"]) == (hp["alpha"], hp["beta"])
    assert state.metrics["val_accuracy"] == best["val_accuracy"]
    # the recorded choice is the search on the best epoch's val logits, recomputed from the saved
    # student (same centre views, through the student encoder) and heads
    teacher = FeatureStore.open(tiny_teacher_store)
    from fskd.datasets import build_dataset
    from fskd.store.sampling import validation_rows

    vy = teacher.labels("val")
    keep = validation_rows(vy, state.tensors["train_classes"].tolist(), 2, 1, "few-shot-val")
    enc = build_encoder(f"student:{out}")
    ds = build_dataset("folder", str(tiny_images))
    with torch.no_grad():
        f = enc.encode_images(torch.stack([enc.preprocess(ds.open(s)) for s in teacher.sample_ids("val")[keep]]))
    col = {int(c): i for i, c in enumerate(state.tensors["train_classes"])}
    yv = torch.tensor([col[int(c)] for c in vy[keep]])
    t = state.tensors
    acc, alpha, beta = search_alpha_beta(
        f @ t["ce_head.weight"].T + t["ce_head.bias"], f @ t["kd_head.weight"].T + t["kd_head.bias"], yv
    )
    assert (alpha, beta) == (hp["alpha"], hp["beta"]) and round(100 * acc, 3) == best["val_accuracy"]

    # the student extracts a store; fskd eval of the state there scores the mixed prediction
    s_store = tmp_path / "dho.zarr"
    r = runner.invoke(
        app,
        [
            "extract",
            "folder",
            "--root",
            str(tiny_images),
            "--encoder",
            f"student:{out}",
            "--store",
            str(s_store),
            "--workers",
            "0",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    ev = api.evaluate(EvalConfig(store=str(s_store), state=str(out), protocol="allway", shots=2, seeds=(1,)))
    st = FeatureStore.open(s_store)
    x, y = torch.from_numpy(st.features("test")).float(), st.labels("test")
    p = mixed_probs(
        x @ t["ce_head.weight"].T + t["ce_head.bias"],
        x @ t["kd_head.weight"].T + t["kd_head.bias"],
        hp["alpha"],
        hp["beta"],
    )
    pred = t["train_classes"][p.argmax(1)].numpy()
    assert ev.accuracy == pytest.approx(100 * float((pred == y).mean()), abs=1e-3)
    assert ev.classifier == "dho"


def test_refusals(tiny_teacher_store, tmp_path):  # noqa: F811
    def cfg(**kw):
        return DistillConfig(
            **{
                "store": tiny_teacher_store,
                "method": "dho",
                "student": TINY,
                "epochs": 1,
                "out": str(tmp_path / "x"),
                "device": "cpu",
                "options": DHO_TINY,
                **kw,
            }
        )

    with pytest.raises(ConfigError, match="no base-novel form"):
        api.distill(cfg(regime="base-novel", shots=1))
    with pytest.raises(ConfigError, match="--losses none: --losses picks mtkd's loss terms"):
        api.distill(cfg(losses="none"))
    with pytest.raises(ConfigError, match="unknown key.*proj_hidden"):
        api.distill(cfg(options={**DHO_TINY, "proj_hidden": 32}))
    with pytest.raises(ConfigError, match="alpha_grid"):
        api.distill(cfg(options={**DHO_TINY, "alpha_grid": [0.5, 1.5]}))
    assert not (tmp_path / "x").exists()


def test_no_validation_data_keeps_the_authors_start(tiny_teacher_store, tmp_path):  # noqa: F811
    res = api.distill(
        DistillConfig(
            store=tiny_teacher_store,
            method="dho",
            student=TINY,
            epochs=2,
            out=str(tmp_path / "n"),
            device="cpu",
            options=DHO_TINY,
            hp_selection="none",
        ),
        progress=None,
    )
    state = load_state(res.out)
    assert (state.hparams["alpha"], state.hparams["beta"], state.hparams["best_epoch"]) == (0.0, 1.0, 2)
    assert state.selected_on["alpha"].startswith("fixed (no validation data")
    assert state.metrics["val_accuracy"] is None


def test_registered_with_the_authors_defaults():
    assert METHODS.get("dho") is DHO and DHO.kind == "distill"
    from fskd.catalog import method_info

    opts = {o["name"]: o for o in method_info("dho")["options"]}
    assert opts["temperature"]["default"] == "2.0" and "authors" in opts["temperature"]["meaning"]
    assert json.loads(opts["beta_grid"]["default"]) == list(BETA_GRID)
    o = DHOOptions()
    assert (o.lr, o.weight_decay, o.batch_size, o.epochs, o.w_ce, o.w_kd, o.crop_scale) == (
        1e-3,
        0.01,
        64,
        200,
        0.5,
        0.5,
        (0.5, 1.0),
    )
