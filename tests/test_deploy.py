"""fskd predict / fskd export (issue 32): predictions agree with `fskd eval --state` all-way on the
same rows, the exported ONNX model (run by examples/onnx_predict.py in a fresh virtual environment
holding only onnxruntime, Pillow and numpy) agrees with `fskd predict`, and bad input is refused
with one error line, leaving nothing half-written and no file fskd did not write changed."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fskd import api
from fskd.config import EvalConfig
from fskd.store import FeatureStore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "onnx_predict.py"
runner = CliRunner()
from tests.conftest import tinted_images  # noqa: E402
from tests.test_faults import ENV, EXTRACT, cli, user_error  # noqa: E402 - the fault battery's CLI helpers


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """6 classes x 8 small PNGs (coloured noise), as tests/test_faults.py."""
    return tinted_images(tmp_path_factory.mktemp("deploy-images"), 6, 8, 24)


@pytest.fixture(scope="module")
def fitted(images, tmp_path_factory):
    """(store, tip-adapter state at 2 shots) on the synthetic:8 encoder of ``images``."""
    d = tmp_path_factory.mktemp("deploy")
    cli("extract", "folder", "--root", images, "--store", d / "s.zarr", *EXTRACT)
    cli(
        "adapt",
        "--store",
        d / "s.zarr",
        "--method",
        "tip-adapter",
        "--shots",
        "2",
        "--out",
        d / "tip",
        "--device",
        "cpu",
    )
    return d / "s.zarr", d / "tip"


def eval_predictions(store: Path, state: Path) -> tuple[np.ndarray, list[str]]:
    """What `fskd eval --state --protocol allway` predicts for each test row (its own code path:
    fskd.verbs.evaluate.head_for, store_rows, sample_shots, the head's fit and predict), and the rows' sample ids."""
    from fskd.methods import load_state
    from fskd.protocols.allway import store_rows
    from fskd.store.sampling import sample_shots
    from fskd.verbs.evaluate import head_for

    st = load_state(state)
    k, seed = st.config["shots"], st.config["seed"]
    cfg = EvalConfig(store=str(store), state=str(state), protocol="allway", shots=k, seeds=(seed,), device="cpu")
    s = FeatureStore.open(store)
    head, _, _ = head_for(cfg, s, torch.device("cpu"), st)
    take, train_y = store_rows(s, "train", torch.device("cpu"))
    test_x, test_y = s.gather(None, ["test"])
    classes = np.unique(test_y)
    rows = sample_shots(train_y, classes, k, seed, s.class_names)
    support = head.prepare(take(rows.reshape(-1)))
    fitted = head.fit(support.reshape(len(classes), k, -1)[None], torch.as_tensor(classes)[None])
    pred = fitted.predict(head.prepare(torch.from_numpy(test_x))[None])[0].numpy()
    ids = s.sample_ids("test")[s.valid_rows("test")]
    acc = api.evaluate(cfg).accuracy
    assert abs(100 * float((classes[pred] == test_y).mean()) - acc) < 1e-6
    return classes[pred], list(ids)


def test_predict_agrees_with_eval_allway_and_adds_label(fitted, images, tmp_path):
    store, state = fitted
    pred, ids = eval_predictions(store, state)
    names = FeatureStore.open(store).class_names
    res = cli("predict", "--state", state, "--split", "test", "--out", tmp_path / "p.csv", "--device", "cpu", "--json")
    summary = json.loads(res.stdout)
    rows = read_rows(tmp_path / "p.csv")
    assert [r["path"] for r in rows] == [str(images / i) for i in ids]
    assert [r["prediction"] for r in rows] == [names[c] for c in pred]
    truth = [r["label"] for r in rows]
    assert truth == [Path(i).parent.name.replace("_", " ") for i in ids]  # the folder dataset's class names
    assert summary["accuracy"] == pytest.approx(100 * np.mean([r["prediction"] == r["label"] for r in rows]), abs=1e-3)
    assert summary["count"] == len(ids) and summary["skipped"] == 0
    assert list(rows[0]) == ["path", "label", "prediction", "probability"] + [
        c for i in range(1, 6) for c in (f"top{i}", f"top{i}_probability")
    ]
    p = np.array([[float(r[f"top{i}_probability"]) for i in range(1, 6)] for r in rows])
    assert (np.diff(p, axis=1) <= 1e-9).all() and (p.sum(1) <= 1 + 1e-5).all()
    meta = json.loads((tmp_path / "p.csv.fskd.json").read_text())
    assert meta["format"] == "fskd-predictions" and meta["rows"] == len(rows)
    assert meta["classifier"]["method"] == "tip-adapter"
    # the confusion matrix beside it: a PNG of a sensible size, recorded in the manifest
    png = tmp_path / "p.csv.confusion.png"
    assert summary["confusion"] == str(png) and meta["confusion_png"]["file"] == png.name
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.format == "PNG" and 500 <= min(im.size) and max(im.size) <= 2500, im.size

    # the same test images re-encoded from their files: the same predictions as from the cached features
    res = cli(
        "predict",
        "--state",
        state,
        "--images",
        images,
        "--out",
        tmp_path / "q.jsonl",
        "--workers",
        "0",
        "--top-k",
        "2",
        "--device",
        "cpu",
    )
    by_path = {r["path"]: r for r in read_rows(tmp_path / "q.jsonl")}
    assert len(by_path) == 48
    assert list(next(iter(by_path.values()))) == [
        "path",
        "prediction",
        "probability",
        "top1",
        "top1_probability",
        "top2",
        "top2_probability",
    ]
    same = [by_path[r["path"]]["prediction"] == r["prediction"] for r in rows]
    assert np.mean(same) >= 0.9, same  # float16 store vs float32 re-encoding may flip a near tie


def test_python_classifier_returns_the_same_rows(fitted, images, tmp_path):
    store, state = fitted
    clf = api.load_classifier(str(state), device="cpu")
    files = sorted(str(p) for p in images.rglob("*.png"))[:10]
    from_paths = clf.predict(files)
    from_pil = clf.predict([Image.open(f) for f in files])
    cli(
        "predict",
        "--state",
        state,
        "--images",
        images,
        "--out",
        tmp_path / "a.jsonl",
        "--workers",
        "0",
        "--device",
        "cpu",
    )
    cli_rows = {r["path"]: r for r in read_rows(tmp_path / "a.jsonl")}
    for a, b in zip(from_paths, from_pil, strict=True):
        assert a["path"] in cli_rows and a["prediction"] == b["prediction"] == cli_rows[a["path"]]["prediction"]
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-6)
        assert a["probability"] == pytest.approx(cli_rows[a["path"]]["probability"], abs=1e-5)
    s = FeatureStore.open(store)
    feats = s.features("test")[s.valid_rows("test")]
    rows = clf.predict(torch.from_numpy(feats), top_k=3)
    pred, _ = eval_predictions(store, state)
    assert [r["prediction"] for r in rows] == [s.class_names[c] for c in pred]
    assert rows[0]["path"] is None and "top3" in rows[0] and "top4" not in rows[0]


def load_example():
    spec = importlib.util.spec_from_file_location("onnx_predict", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_model_agrees_with_predict(fitted, images, tmp_path, fmt):
    store, state = fitted
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="the export extra: pip install 'fskd[export]'")
    out = tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt")
    r = json.loads(cli("export", "--state", state, "--out", out, "--format", fmt, "--json").stdout)
    assert r["classes"] == 6 and r["max_difference"] <= 1e-3 and out.stat().st_size == r["bytes"]
    files = sorted(str(p) for p in images.rglob("*.png"))
    cli(
        "predict",
        "--state",
        state,
        "--images",
        images,
        "--out",
        tmp_path / "p.csv",
        "--workers",
        "0",
        "--device",
        "cpu",
    )
    want = {r["path"]: r for r in read_rows(tmp_path / "p.csv")}
    ex = load_example()
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        meta = sess.get_modelmeta().custom_metadata_map
        names, prep = json.loads(meta["class_names"]), json.loads(meta["preprocess"])
        x = np.stack([ex.preprocess(ex.load_rgb(f), prep) for f in files])
        probs = sess.run(["probabilities"], {"images": x})[0]
    else:
        extra = {"fskd.json": ""}
        m = torch.jit.load(str(out), _extra_files=extra)
        meta = json.loads(extra["fskd.json"])
        names, prep = meta["class_names"], meta["preprocess"]
        x = np.stack([ex.preprocess(ex.load_rgb(f), prep) for f in files])
        probs = m(torch.from_numpy(x)).detach().numpy()
    assert names == FeatureStore.open(store).class_names and prep["resize"] == [8, 8]
    for f, p in zip(files, probs, strict=True):
        assert names[int(p.argmax())] == want[f]["prediction"]
        assert float(p.max()) == pytest.approx(float(want[f]["probability"]), abs=1e-3)


def test_onnx_example_runs_in_a_fresh_venv_with_three_packages(fitted, images, tmp_path):
    """examples/onnx_predict.py with only onnxruntime, Pillow and numpy installed (pip's cache keeps
    this under a minute after the first run)."""
    pytest.importorskip("onnx", reason="the export extra: pip install 'fskd[export]'")
    store, state = fitted
    cli("export", "--state", state, "--out", tmp_path / "m.onnx")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    pip = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "onnxruntime", "pillow", "numpy"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if pip.returncode != 0:
        pytest.skip(f"cannot install onnxruntime, pillow, numpy from PyPI here: {pip.stderr.strip()[-300:]}")
    assert subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode != 0
    assert subprocess.run([str(py), "-c", "import fskd"], capture_output=True, cwd=tmp_path).returncode != 0
    files = sorted(str(p) for p in images.rglob("*.png"))
    res = subprocess.run(
        [str(py), str(EXAMPLE), str(tmp_path / "m.onnx"), *files],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    got = [line.split("\t") for line in res.stdout.splitlines()]
    cli(
        "predict",
        "--state",
        state,
        "--images",
        images,
        "--out",
        tmp_path / "p.csv",
        "--workers",
        "0",
        "--device",
        "cpu",
    )
    want = {r["path"]: r for r in read_rows(tmp_path / "p.csv")}
    assert [g[0] for g in got] == files
    for path, name, prob in got:
        assert name == want[path]["prediction"]
        assert float(prob) == pytest.approx(float(want[path]["probability"]), abs=1e-3)


# -- bad input --------------------------------------------------------------------------------------
def test_out_is_never_a_file_fskd_did_not_write(fitted, images, tmp_path):
    store, state = fitted
    out = tmp_path / "p.csv"
    args = ["predict", "--state", state, "--split", "test", "--device", "cpu", "--out"]
    cli(*args, out)
    before = out.read_bytes()
    user_error(cli(*args, out, ok=False), "already holds", "--force")
    cli(*args, out, "--force")
    out.write_text(out.read_text() + "a user's note\n")  # changed since fskd wrote it: no longer fskd's to replace
    user_error(cli(*args, out, "--force", ok=False), "is not fskd predict's output")
    assert out.read_text().endswith("a user's note\n")
    mine = tmp_path / "mine.csv"
    mine.write_text("path,prediction\nx,y\n")
    user_error(cli(*args, mine, "--force", ok=False), "is not fskd predict's output")
    assert mine.read_text() == "path,prediction\nx,y\n"
    model = tmp_path / "mine.onnx"
    model.write_bytes(before)
    user_error(cli("export", "--state", state, "--out", model, "--force", ok=False), "not a model file written by fskd")
    assert model.read_bytes() == before
    user_error(cli(*args, store / "p.csv", ok=False), "inside")  # never into the feature store
    user_error(cli(*args, tmp_path / "p.txt", ok=False), "must end in .csv or .jsonl or .parquet")
    # the confusion matrix beside --out: a user's file of that name is never replaced, --force or not
    png = tmp_path / "n.csv.confusion.png"
    png.write_bytes(b"a user's picture")
    for force in ([], ["--force"]):
        user_error(cli(*args, tmp_path / "n.csv", *force, ok=False), "n.csv.confusion.png", "not a confusion matrix")
    assert png.read_bytes() == b"a user's picture" and not (tmp_path / "n.csv").exists()
    cli(*args, out.with_name("p2.csv"))  # fskd's own pair, unchanged: replaced with --force
    first = (tmp_path / "p2.csv.confusion.png").read_bytes()
    cli(*args, out.with_name("p2.csv"), "--force")
    assert (tmp_path / "p2.csv.confusion.png").read_bytes() == first


def test_parquet_output_has_the_same_rows(fitted, images, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="the parquet extra: pip install 'fskd[parquet]'")
    _, state = fitted
    for src in (["--split", "test"], ["--images", images, "--workers", "0", "--skip-bad"]):
        cli("predict", "--state", state, *src, "--out", tmp_path / "p.csv", "--device", "cpu", "--force")
        cli("predict", "--state", state, *src, "--out", tmp_path / "p.parquet", "--device", "cpu", "--force")
        want = read_rows(tmp_path / "p.csv")
        table = pq.read_table(tmp_path / "p.parquet")
        assert table.column_names == list(want[0])
        assert (
            str(table.schema.field("probability").type) == "float" and str(table.schema.field("top1").type) == "string"
        )
        got = table.to_pylist()
        assert [g["path"] for g in got] == [w["path"] for w in want]
        assert [g["prediction"] for g in got] == [w["prediction"] for w in want]
        assert np.allclose(
            [g["top2_probability"] for g in got], [float(w["top2_probability"]) for w in want], atol=1e-6
        )
    meta = json.loads((tmp_path / "p.parquet.fskd.json").read_text())
    assert meta["output_format"] == "parquet" and meta["rows"] == len(got)
    user_error(
        cli("predict", "--state", state, "--split", "test", "--out", tmp_path / "p.parquet", ok=False), "--force"
    )


def test_parquet_without_pyarrow_names_the_extra(fitted, tmp_path, monkeypatch):
    _, state = fitted
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    user_error(
        cli("predict", "--state", state, "--split", "test", "--out", tmp_path / "p.parquet", ok=False),
        "pyarrow",
        "fskd[parquet]",
        ".csv or .jsonl",
    )
    assert list(tmp_path.iterdir()) == []


def test_a_moved_store_is_named_and_can_be_given(fitted, images, tmp_path):
    store, state = fitted
    s2, st2 = tmp_path / "s.zarr", tmp_path / "tip"
    shutil.copytree(store, s2)
    cli("adapt", "--store", s2, "--method", "prototype", "--shots", "2", "--out", st2, "--device", "cpu")
    moved = tmp_path / "moved.zarr"
    s2.rename(moved)
    user_error(
        cli("predict", "--state", st2, "--split", "test", "--out", tmp_path / "p.csv", ok=False),
        str(s2),
        "not there any more",
        "--store",
    )
    cli("predict", "--state", st2, "--store", moved, "--split", "test", "--out", tmp_path / "p.csv", "--device", "cpu")
    other = tmp_path / "other.zarr"  # the same images in other chunks: another fingerprint
    cli("extract", "folder", "--root", images, "--store", other, *EXTRACT[:-6], "--chunk-rows", "8", *EXTRACT[-4:])
    user_error(
        cli("predict", "--state", st2, "--store", other, "--split", "test", "--out", tmp_path / "q.csv", ok=False),
        "fingerprint",
    )  # another store: refused by its fingerprint


def test_an_encoder_that_cannot_be_rebuilt_is_named_with_what_to_do(fitted, images, tmp_path):
    """The store names an encoder this machine cannot build (a timm model that is not installed
    here): predict on images says which encoder and what to do, before writing anything; cached
    features (--split) need no encoder and still work."""
    import zarr

    store, state = fitted
    s2, st2 = tmp_path / "s.zarr", tmp_path / "tip"
    shutil.copytree(store, s2)
    cli("adapt", "--store", s2, "--method", "prototype", "--shots", "2", "--out", st2, "--device", "cpu")
    g = zarr.open_group(str(s2), mode="r+")
    g.attrs["encoder"] = {**dict(g.attrs["encoder"]), "spec": "timm:no_such_model_xyz"}
    out = tmp_path / "p.csv"
    user_error(
        cli("predict", "--state", st2, "--images", images / "class_0", "--out", out, ok=False),
        "cannot rebuild the encoder",
        "timm:no_such_model_xyz",
        "then run again",
    )
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".p.csv")]
    cli("predict", "--state", st2, "--split", "test", "--out", out, "--device", "cpu")
    assert out.exists()


def test_an_episodic_only_state_is_refused_naming_what_to_fit(synthetic_store, tmp_path):
    store = synthetic_store(joint=True).path  # 20 classes: val classes enough for episodes
    st = tmp_path / "fma"
    api.align(
        api.AlignConfig(
            store=str(store),
            method="fma",
            shots=2,
            out=str(st),
            device="cpu",
            options={"recipe": "lite", "regime": "episodic", "iters": 20},
        ),
        progress=None,
    )
    err = user_error(
        cli("predict", "--state", st, "--split", "test", "--out", tmp_path / "p.csv", ok=False),
        "no all-way head",
        "--shots K",
        "regime=allway",
    )
    assert "fma" in err
    user_error(cli("export", "--state", st, "--out", tmp_path / "m.onnx", ok=False), "no all-way head")
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "m.onnx").exists()


def test_unreadable_and_wrong_kind_images(fitted, images, tmp_path):
    _, state = fitted
    bad = tmp_path / "imgs"
    shutil.copytree(images / "class_0", bad)
    (bad / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "p.csv"
    user_error(
        cli("predict", "--state", state, "--images", bad, "--out", out, "--workers", "0", ok=False),
        "broken.png",
        "--skip-bad",
    )
    assert not out.exists() and not list(tmp_path.glob(".p.csv*"))
    (bad / "5b.png").write_bytes(b"")  # an empty file between readable ones
    res = cli(
        "predict",
        "--state",
        state,
        "--images",
        bad,
        "--out",
        out,
        "--workers",
        "0",
        "--skip-bad",
        "--device",
        "cpu",
        "--batch-size",
        "3",
    )
    assert "skipped 2 unreadable" in res.output
    rows = read_rows(out)  # every image a row, in input order; the unreadable ones with their error
    assert [Path(r["path"]).name for r in rows] == [
        "0.png",
        "1.png",
        "2.png",
        "3.png",
        "4.png",
        "5.png",
        "5b.png",
        "6.png",
        "7.png",
        "broken.png",
    ]
    assert list(rows[0])[-1] == "error"
    for r in rows:
        broken = Path(r["path"]).name in ("5b.png", "broken.png")
        assert (r["prediction"] == "" and r["probability"] == "" and r["top1"] == "") if broken else r["prediction"]
        assert (Path(r["path"]).name in r["error"]) if broken else r["error"] == ""
    meta = json.loads((tmp_path / "p.csv.fskd.json").read_text())
    assert meta["rows"] == 10 and meta["predicted"] == 8 and meta["skipped_count"] == 2
    assert any("broken.png" in m for m in meta["skipped"])
    res = cli(
        "predict",
        "--state",
        state,
        "--images",
        bad,
        "--out",
        tmp_path / "p.jsonl",
        "--workers",
        "0",
        "--skip-bad",
        "--device",
        "cpu",
        "--json",
    )
    assert json.loads(res.stdout)["count"] == 8 and json.loads(res.stdout)["skipped"] == 2
    j = {Path(r["path"]).name: r for r in read_rows(tmp_path / "p.jsonl")}
    assert (
        j["broken.png"]["prediction"] is None and j["broken.png"]["probability"] is None and j["0.png"]["error"] is None
    )
    clf = api.load_classifier(str(state), device="cpu")
    py = clf.predict(bad, skip_bad=True)  # the Python API returns the same rows
    assert [r["path"] for r in py] == [r["path"] for r in rows] and py[-1]["error"] and py[0]["error"] is None
    blob = tmp_path / "list.bin"
    blob.write_bytes(bytes(range(256)) * 4)
    user_error(
        cli("predict", "--state", state, "--images", blob, "--out", tmp_path / "b.csv", ok=False), "neither an image"
    )
    listing = tmp_path / "list.txt"
    listing.write_text(f"{images / 'class_1' / '0.png'}\n# a comment\n{images / 'class_2' / '3.png'}\n")
    cli(
        "predict",
        "--state",
        state,
        "--images",
        listing,
        "--out",
        tmp_path / "l.csv",
        "--workers",
        "0",
        "--device",
        "cpu",
    )
    assert len(read_rows(tmp_path / "l.csv")) == 2
    table = tmp_path / "t.csv"
    table.write_text("id,path\n1,imgs/0.png\n")
    cli("predict", "--state", state, "--csv", table, "--out", tmp_path / "c.jsonl", "--workers", "0", "--device", "cpu")
    assert read_rows(tmp_path / "c.jsonl")[0]["path"] == str(tmp_path / "imgs" / "0.png")
    user_error(
        cli("predict", "--state", state, "--csv", listing, "--out", tmp_path / "d.csv", ok=False), "'path' column"
    )


def test_ctrl_c_leaves_no_partial_output(fitted, images, tmp_path):
    _, state = fitted
    out = tmp_path / "p.csv"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "fskd",
            "predict",
            "--state",
            str(state),
            "--images",
            str(images),
            "--out",
            str(out),
            "--workers",
            "0",
            "--batch-size",
            "4",
            "--device",
            "cpu",
        ],
        env={**ENV, "FSKD_FAULT": "predict:batch@sigint"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 130, res.stderr[-2000:]
    assert "interrupted" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_distilled_student_state_is_not_a_classifier(fitted, tmp_path):
    """A distill state names the pipeline to use (extract --encoder student:DIR, adapt, predict)."""
    from fskd.deploy.classifier import Classifier
    from fskd.errors import StateError
    from fskd.methods.base import MethodState, save_state

    store, _ = fitted
    s = FeatureStore.open(store)
    save_state(
        tmp_path / "st",
        MethodState(
            method="mtkd",
            kind="distill",
            store_path=str(store),
            store_fingerprint=s.fingerprint,
            encoder=s.encoder_spec,
            config={"shots": 2, "seed": 1},
            tensors={"x": torch.zeros(1)},
        ),
    )
    with pytest.raises(StateError, match="student:"):
        Classifier(tmp_path / "st", device="cpu")


# -- real data: cub35 with the offline teacher ------------------------------------------------------
@pytest.mark.slow
def test_cub35_parity_onnx_and_eval(cub35_store, tmp_path):
    """The issue's parity test: the exported ONNX model and `fskd predict` agree on >= 99.5% of 200
    cub35 images (probabilities within 1e-3), and predict on the store's test images (re-encoded)
    is within 0.5 points of eval's all-way accuracy."""
    pytest.importorskip("onnxruntime", reason="the export extra: pip install 'fskd[export]'")
    st = tmp_path / "tip"
    api.adapt(
        api.AdaptConfig(store=cub35_store, method="tip-adapter", shots=16, out=str(st), device="cpu"), progress=None
    )
    acc = api.evaluate(
        EvalConfig(store=cub35_store, state=str(st), protocol="allway", shots=16, seeds=(1,), device="cpu")
    ).accuracy
    s = FeatureStore.open(cub35_store)
    root = Path(s.attrs["dataset"]["root"])
    files = [str(root / i) for i in s.sample_ids("test")[s.valid_rows("test")]]
    listing = tmp_path / "test.txt"
    listing.write_text("\n".join(files) + "\n")
    res = cli(
        "predict",
        "--state",
        st,
        "--images",
        listing,
        "--out",
        tmp_path / "p.csv",
        "--workers",
        "1",
        "--device",
        "cpu",
        "--json",
    )
    rows = read_rows(tmp_path / "p.csv")
    truth = dict(zip(files, (s.class_names[c] for c in s.labels("test")[s.valid_rows("test")]), strict=True))
    re_acc = 100 * np.mean([r["prediction"] == truth[r["path"]] for r in rows])
    assert abs(re_acc - acc) <= 0.5, (re_acc, acc, json.loads(res.stdout))
    cli("export", "--state", st, "--out", tmp_path / "m.onnx")
    ex = load_example()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    names, prep = json.loads(meta["class_names"]), json.loads(meta["preprocess"])
    sub = rows[:: max(1, len(rows) // 200)][:200]
    x = np.stack([ex.preprocess(ex.load_rgb(r["path"]), prep) for r in sub])
    probs = np.concatenate([sess.run(["probabilities"], {"images": x[i : i + 32]})[0] for i in range(0, len(x), 32)])
    agree = np.mean([names[int(p.argmax())] == r["prediction"] for p, r in zip(probs, sub, strict=True)])
    assert len(sub) == 200 and agree >= 0.995, agree
    close = [abs(float(p.max()) - float(r["probability"])) <= 1e-3 for p, r in zip(probs, sub, strict=True)]
    assert np.mean(close) >= 0.995, np.mean(close)


# -- the deployment pipeline: distill -> extract with the student -> adapt -> predict -> export -------
TINY_DISTILL = [
    "--student",
    "timm:test_resnet",
    "--epochs",
    "2",
    "--device",
    "cpu",
    *[
        a
        for k, v in {
            "image_size": 32,
            "batch_size": 8,
            "proj_hidden": 16,
            "val_episodes": 10,
            "val_query": 2,
            "teacher_steps": 5,
            "decode_threads": 1,
        }.items()
        for a in ("--set", f"{k}={v}")
    ],
]


def photos(images: Path, root: Path) -> list[str]:
    """New images of other shapes than the store's 24x24 ones (a class's image scaled up, nearest
    neighbour: the same tint): odd and even sides, portrait and landscape, and one large enough for
    PIL's reducing gap, so the student's own resize and crops meet the exported metadata's."""
    root.mkdir()
    out = []
    for c, size in enumerate(((301, 230), (250, 400), (37, 53), (64, 64), (900, 310), (31, 23))):
        im = Image.open(images / f"class_{c}" / "7.png").resize(size, Image.NEAREST)
        im.save(root / f"{c}.png")
        out.append(str(root / f"{c}.png"))
    return out


def test_distilled_student_is_the_deployment_path(fitted, images, tmp_path):
    """fskd distill (a tiny timm student) -> fskd extract --encoder student:DIR -> fskd adapt
    tip-adapter -> fskd predict --images -> fskd export --format onnx: the exported model, fed as
    its metadata says (examples/onnx_predict.py), agrees with fskd predict (top-1, probabilities
    within 1e-3), and predict agrees with fskd eval --state all-way on the student store's rows."""
    pytest.importorskip("onnxruntime", reason="the export extra: pip install 'fskd[export]'")
    teacher, _ = fitted
    student, s_store, tip = tmp_path / "student", tmp_path / "student.zarr", tmp_path / "tip"
    cli("distill", "--store", teacher, "--out", student, *TINY_DISTILL)
    cli("extract", "folder", "--root", images, "--store", s_store, "--encoder", f"student:{student}", *EXTRACT[2:])
    assert FeatureStore.open(s_store).encoder_spec == f"student:{student}"
    cli("adapt", "--store", s_store, "--method", "tip-adapter", "--shots", "2", "--out", tip, "--device", "cpu")

    # predict on the store's test rows = eval --state all-way, row by row and in accuracy
    pred, ids = eval_predictions(s_store, tip)
    names = FeatureStore.open(s_store).class_names
    res = json.loads(
        cli(
            "predict", "--state", tip, "--split", "test", "--out", tmp_path / "t.csv", "--device", "cpu", "--json"
        ).stdout
    )
    rows = read_rows(tmp_path / "t.csv")
    assert [r["path"] for r in rows] == [str(images / i) for i in ids]
    assert [r["prediction"] for r in rows] == [names[c] for c in pred]
    ev = json.loads(
        cli(
            "eval",
            "--store",
            s_store,
            "--state",
            tip,
            "--protocol",
            "allway",
            "--shots",
            "2",
            "--seeds",
            "1",
            "--device",
            "cpu",
            "--json",
        ).stdout
    )
    assert res["accuracy"] == pytest.approx(ev["accuracy"], abs=1e-3)

    # predict on image files (the store's and new shapes) through the student, then the exported model
    files = sorted(str(p) for p in images.rglob("*.png")) + photos(images, tmp_path / "photos")
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(files) + "\n")
    cli(
        "predict", "--state", tip, "--images", listing, "--out", tmp_path / "p.csv", "--workers", "0", "--device", "cpu"
    )
    want = {r["path"]: r for r in read_rows(tmp_path / "p.csv")}
    assert len(want) == len(files)
    r = json.loads(cli("export", "--state", tip, "--format", "onnx", "--out", tmp_path / "m.onnx", "--json").stdout)
    assert r["encoder"] == f"student:{student}" and r["max_difference"] <= 1e-3
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    prep, got_names = json.loads(meta["preprocess"]), json.loads(meta["class_names"])
    # the student's own preprocessing, not torchvision's: 32 px crops of a 37 px square, longer side rounded
    assert {
        k: prep[k]
        for k in ("resize", "resize_rounding", "interpolation", "reducing_gap", "square", "crop", "crop_offset")
    } == {
        "resize": 37,
        "resize_rounding": "round",
        "interpolation": "bicubic",
        "reducing_gap": 3.0,
        "square": 37,
        "crop": [32, 32],
        "crop_offset": "floor",
    }
    assert got_names == names and json.loads(meta["fskd"])["encoder"] == f"student:{student}"
    ex = load_example()
    x = np.stack([ex.preprocess(ex.load_rgb(f), prep) for f in files])
    # the pixels first (these tinted classes saturate the probabilities, which alone would hide a shift)
    from fskd.datasets.base import open_rgb
    from fskd.encoders.student import StudentEncoder

    enc = StudentEncoder(str(student))
    own = np.stack([enc.preprocess(open_rgb(f)).numpy() for f in files])
    assert x.shape == own.shape == (len(files), 3, 32, 32) and np.abs(x - own).max() <= 1e-4
    probs = sess.run(["probabilities"], {"images": x})[0]
    for f, p in zip(files, probs, strict=True):
        assert names[int(p.argmax())] == want[f]["prediction"], f
        assert float(p.max()) == pytest.approx(float(want[f]["probability"]), abs=1e-3), f


def test_export_refuses_a_student_whose_preprocessing_it_cannot_describe(fitted, tmp_path, monkeypatch):
    """Should the student's resize change (here: another resample filter), the metadata fskd would
    write no longer reproduces it: the export is refused naming what it would have written, and
    nothing is written."""
    from fskd.deploy import export as export_mod
    from fskd.encoders.student import StudentEncoder
    from fskd.errors import EncoderError

    teacher, _ = fitted
    student = tmp_path / "student"
    cli("distill", "--store", teacher, "--out", student, *TINY_DISTILL, "--epochs", "1")
    enc = StudentEncoder(str(student))
    spec = export_mod.describe_preprocess(enc)
    assert export_mod.check_preprocess(enc, spec) <= export_mod.PREPROCESS_TOLERANCE
    with pytest.raises(EncoderError, match=r"interpolation bilinear.*differ by.*nothing was written"):
        export_mod.check_preprocess(enc, {**spec, "interpolation": "bilinear"})
    with pytest.raises(EncoderError, match="crop_offset round"):
        export_mod.check_preprocess(enc, {**spec, "square": None, "crop_offset": "round"})
