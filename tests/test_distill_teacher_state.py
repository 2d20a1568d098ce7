"""fskd distill --teacher-state DIR: a fitted all-way state's head as the teacher. Its logits are the
soft targets (checked against the Classifier fskd predict uses), the refusals (another store, an
episodic-only state, a base-to-new state, a student), the provenance in the student's state and
in --json, and a CLI run whose student extracts a store (tiny students, 1-2 epochs, noise images)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fskd import api
from fskd.cli import app
from fskd.config import AdaptConfig, AlignConfig, DistillConfig, ExtractConfig
from fskd.deploy.classifier import Classifier
from fskd.errors import ConfigError, StateError
from fskd.methods import load_state
from fskd.methods.distill import mtkd
from fskd.methods.distill.losses import DistillLoss
from fskd.store import FeatureStore

from .test_distill import TINY, TINY_OPTS

runner = CliRunner()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """8 classes x 8 coloured-noise images (class-dependent tint)."""
    from PIL import Image

    d = tmp_path_factory.mktemp("teacher-state-images")
    rng = np.random.default_rng(0)
    for c in range(8):
        (d / f"class_{c}").mkdir()
        for i in range(8):
            Image.fromarray((rng.random((40, 48, 3)) * 80 + c * 20).astype("uint8")).save(d / f"class_{c}" / f"{i}.png")
    return d


@pytest.fixture(scope="module")
def store(images, tiny_clip_dir, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("teacher-state-store") / "teacher.zarr"
    api.extract(
        ExtractConfig(
            dataset="folder",
            root=str(images),
            encoder=f"openclip:local-dir:{tiny_clip_dir}",
            store=str(path),
            workers=0,
            device="cpu",
        )
    )
    return str(path)


@pytest.fixture(scope="module")
def tip_state(store, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("teacher-state-tip") / "tip"
    api.adapt(
        AdaptConfig(store=store, method="tip-adapter", shots=2, seed=3, out=str(out), device="cpu"), progress=None
    )
    return str(out)


def _cfg(store, out, **kw) -> DistillConfig:
    opts = {**TINY_OPTS, **kw.pop("options", {})}
    base = {
        "store": store,
        "student": TINY,
        "epochs": 1,
        "out": str(out),
        "device": "cpu",
        "options": opts,
        "force": True,
    }
    return DistillConfig(**{**base, **kw})


def _sha(directory) -> str:
    return hashlib.sha256((Path(directory) / "state.json").read_bytes()).hexdigest()


def test_soft_targets_are_the_state_heads_logits(store, tip_state, tmp_path, monkeypatch):
    """Every teacher logit row the losses see is the state's all-way head on a training row's cached
    features: softmax of it equals Classifier(state).probabilities of the same features."""
    seen, given = [], []
    real_logits, real_call = mtkd.StateTeacher.logits, DistillLoss.__call__

    def logits(self, raw):
        out = real_logits(self, raw)
        given.append((raw.clone(), out.clone()))
        return out

    def call(self, feats, lg, proj, teacher):
        seen.append(teacher.logits.clone())
        return real_call(self, feats, lg, proj, teacher)

    monkeypatch.setattr(mtkd.StateTeacher, "logits", logits)
    monkeypatch.setattr(DistillLoss, "__call__", call)
    res = api.distill(_cfg(store, tmp_path / "s", shots=2, teacher_state=tip_state, epochs=2), progress=None)
    assert seen and given
    by_value = [out for _, out in given]
    for t in seen:  # what the losses got is what the state's head gave (no other teacher)
        assert any(t.shape == o.shape and torch.equal(t, o) for o in by_value)

    fs = FeatureStore.open(store)
    feats = {
        s: torch.from_numpy(fs.features(s, fs.attrs["dtype"])[fs.labels(s) >= 0]).float() for s in ("train", "val")
    }
    train = feats["train"]
    clf = Classifier(tip_state, device="cpu")
    assert clf.class_names == fs.class_names  # semi regime: every class is a training class, in store order
    for raw, out in given:
        torch.testing.assert_close(torch.softmax(out, -1), clf.probabilities(raw), rtol=1e-5, atol=1e-6)
    # the rows are the store's cached train features (and the val rows of the teacher's val accuracy)
    rows = torch.cat([raw for raw, _ in given])
    exact = torch.cdist(rows, torch.cat([train, feats["val"]]), compute_mode="donot_use_mm_for_euclid_dist")
    assert float(exact.min(1).values.max()) == 0.0

    # deterministic (the same rows give the same logits), and row-wise: batching changes only float rounding
    st = mtkd.load_teacher_state(
        tip_state, fs, _cfg(store, tmp_path / "x", shots=2), list(range(fs.num_classes)), torch.device("cpu")
    )
    st.batch = 5
    a = real_logits(st, train)
    torch.testing.assert_close(a, real_logits(st, train), rtol=0, atol=0)
    st.batch = 4096
    torch.testing.assert_close(a, real_logits(st, train))
    torch.testing.assert_close(torch.softmax(a, -1), clf.probabilities(train), rtol=0, atol=1e-4)  # other batches

    state = load_state(res.out)
    assert state.hparams["teacher_state"]["state_json_sha256"] == _sha(tip_state)
    assert state.metrics["teacher_val_accuracy"] is not None  # the state's head on the val rows
    assert "teacher.weight" in state.tensors  # --losses all: the built-in head gives the class anchors
    assert "built-in teacher head" in state.hparams["class_anchors"]


def test_base_novel_online_teacher_columns_and_no_builtin_head(store, tip_state, tmp_path):
    """base-novel: the state's logits restricted to the base classes (in the student's class order);
    --online-teacher: the augmented views go through the same head; without the prototype loss the
    built-in head is not fitted."""
    fs = FeatureStore.open(store)
    base = fs.class_split("base")
    st = mtkd.load_teacher_state(
        tip_state, fs, _cfg(store, tmp_path / "x", regime="base-novel", shots=1), base, torch.device("cpu")
    )
    x = torch.from_numpy(fs.features("train")).float()
    torch.testing.assert_close(st.logits(x), Classifier(tip_state, device="cpu").logits(x)[:, base])

    res = api.distill(
        _cfg(
            store,
            tmp_path / "bn",
            regime="base-novel",
            shots=1,
            teacher_state=tip_state,
            online_teacher=True,
            losses="instance",
        ),
        progress=None,
    )
    state = load_state(res.out)
    assert state.hparams["teacher_head_steps"] is None and "teacher.weight" not in state.tensors
    assert state.hparams["class_anchors"] is None and state.metrics["online_teacher"]
    assert state.selected_on["teacher_head_steps"].startswith("not fitted")
    assert state.metrics["teacher_train_accuracy"] is not None


def test_refusals_name_both(store, tip_state, synthetic_store, tmp_path):
    # a state fitted on another store
    other = synthetic_store(joint=True)
    st_other = tmp_path / "other"
    api.adapt(
        AdaptConfig(store=str(other.path), method="prototype", shots=2, out=str(st_other), device="cpu"), progress=None
    )
    with pytest.raises(
        StateError,
        match=r"--teacher-state .*other was fitted on store .*synthetic.*fingerprint.*not on "
        r"the distill store .*teacher\.zarr",
    ):
        api.distill(_cfg(store, tmp_path / "a", shots=2, teacher_state=str(st_other)), progress=None)

    # an episodic-only state (on a store of its own: refused before any image is needed)
    ep = tmp_path / "fma"
    api.align(
        AlignConfig(
            store=str(other.path),
            method="fma",
            shots=2,
            out=str(ep),
            device="cpu",
            options={"recipe": "lite", "regime": "episodic", "iters": 20},
        ),
        progress=None,
    )
    with pytest.raises(StateError, match=r"--teacher-state .*fma.*no all-way head.*regime=allway"):
        api.distill(_cfg(str(other.path), tmp_path / "b", shots=2, teacher_state=str(ep)), progress=None)

    # a base-to-new state does not cover the semi student's classes
    b2n = tmp_path / "b2n"
    api.adapt(
        AdaptConfig(store=str(other.path), method="prototype", shots=2, base_to_new=True, out=str(b2n), device="cpu"),
        progress=None,
    )
    with pytest.raises(
        ConfigError,
        match=r"base-to-new on the first half.*semi student trains on 20 classes, 10 of "
        r"which the state never learned",
    ):
        api.distill(_cfg(str(other.path), tmp_path / "c", shots=2, teacher_state=str(b2n)), progress=None)
    # ... while a student trained on classes of its base half gets their logits (its head over that half)
    covered = load_state(b2n).hparams["class_split"]["base"]
    st = mtkd.load_teacher_state(
        str(b2n), other, _cfg(str(other.path), tmp_path / "x", regime="base-novel"), covered[3:6], torch.device("cpu")
    )
    x = torch.from_numpy(other.features("test")[:7]).float()
    full = st.head.logits(x)
    assert full.shape == (7, len(covered)) and st.head.class_names == [other.class_names[c] for c in covered]
    torch.testing.assert_close(st.logits(x), full[:, 3:6])

    # not a state at all, and --out the teacher's own directory
    with pytest.raises(StateError, match="not an fskd state directory"):
        api.distill(_cfg(store, tmp_path / "d", shots=2, teacher_state=str(tmp_path)), progress=None)
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_cli_run_records_provenance_and_student_extracts(store, tip_state, images, tmp_path):
    out = tmp_path / "student"
    sets = [a for k, v in TINY_OPTS.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    r = runner.invoke(
        app,
        [
            "distill",
            "--store",
            store,
            "--shots",
            "2",
            "--student",
            TINY,
            "--epochs",
            "1",
            "--teacher-state",
            tip_state,
            "--out",
            str(out),
            "--device",
            "cpu",
            "--json",
            *sets,
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    sha = _sha(tip_state)
    prov = {
        "path": str(Path(tip_state).absolute()),
        "method": "tip-adapter",
        "kind": "adapt",
        "shots": 2,
        "seed": 3,
        "state_json_sha256": sha,
    }
    assert prov.items() <= res["hparams"]["teacher_state"].items()
    assert (
        res["hparams"]["teacher"] == f"state {Path(tip_state).absolute()} (tip-adapter, 2 shots, seed 3, sha256 {sha})"
    )
    assert res["selected_on"]["teacher"] == "given (--teacher-state)"
    state = load_state(out)
    assert state.hparams["teacher_state"] == res["hparams"]["teacher_state"]
    assert state.config["teacher_state"] == tip_state

    # the student extracts a store (and is evaluated on it like any student)
    s_store = tmp_path / "student.zarr"
    r = runner.invoke(
        app,
        [
            "extract",
            "folder",
            "--root",
            str(images),
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
    assert FeatureStore.open(s_store).attrs["encoder"]["preprocess"]["student_id"] == state.hparams["student_id"]

    # the student itself is no teacher
    with pytest.raises(ConfigError, match="is a distilled student"):
        api.distill(_cfg(store, tmp_path / "e", shots=2, teacher_state=str(out)), progress=None)
