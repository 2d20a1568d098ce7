"""The fault battery (issue 9), one section per class of fault, driven through the CLI as a user
(or an attacker) would: exit code, message, and that nothing outside fskd's own files changed
(a hash of the directory before and after). Kill points are real SIGKILLs of a subprocess at a
named step (``FSKD_FAULT``, see ``fskd.fsutil.fault_point``)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fskd.cli import app
from fskd.methods import load_state
from fskd.store import FeatureStore
from tests.conftest import tinted_images

runner = CliRunner()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
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


def tree(path: Path) -> dict[str, str]:
    """relative path -> sha256 (files) or 'dir' / 'link->target', for everything under ``path``."""
    out = {}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_symlink():
            out[rel] = f"link->{os.readlink(p)}"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli(*args: str, ok: bool = True):
    res = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    return res


def user_error(res, *needles: str) -> str:
    """An error a user caused: exit 2, one 'error:' line, no traceback, naming what was wrong."""
    out = res.output
    assert res.exit_code == 2, (res.exit_code, out, res.exception)
    assert "Traceback" not in out and (res.exception is None or isinstance(res.exception, SystemExit)), out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def run_fskd(*args: str, fault: str | None = None, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(ENV)
    env.pop("FSKD_FAULT", None)
    if fault:
        env["FSKD_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "fskd", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """6 classes x 8 small PNGs (coloured noise: fast, deterministic)."""
    return tinted_images(tmp_path_factory.mktemp("fault-images"), 6, 8, 24)


EXTRACT = [
    "--encoder",
    "synthetic:8",
    "--workers",
    "0",
    "--chunk-rows",
    "4",
    "--class-ratio",
    "0.5,0.17,0.33",
    "--sample-split",
    "0.5,0.25,0.25",
]


def extract(root: Path, store: Path, *extra: str, ok: bool = True):
    return cli("extract", "folder", "--root", root, "--store", store, *EXTRACT, *extra, ok=ok)


@pytest.fixture
def store(images, tmp_path) -> Path:
    path = tmp_path / "s.zarr"
    extract(images, path)
    return path


def allway(store: Path) -> float:
    res = cli("eval", "--store", store, "--protocol", "allway", "--shot", "1", "--json", "--device", "cpu")
    return json.loads(res.stdout)["accuracy"]


def chunk_file(store: Path, split: str, array: str, chunk: int) -> Path:
    arr = FeatureStore.open(store).group[split][array]
    key = arr.metadata.encode_chunk_key((chunk, 0) if arr.ndim == 2 else (chunk,))
    return store / split / array / key


# -- 1. --out never deletes what is already there ------------------------------------------------
@pytest.mark.parametrize("verb", ["adapt", "align", "distill"])
def test_out_refuses_what_fskd_did_not_write(verb, store, images, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("my thesis")
    plain = tmp_path / "file.txt"
    plain.write_text("keep me")
    before = {p: tree(p) for p in (user, images, store, plain)}
    args = {
        "adapt": ["adapt", "--method", "prototype", "--shots", "1"],
        "align": ["align", "--shots", "1", "--set", "iters=2"],
        "distill": ["distill", *TINY_DISTILL],
    }[verb]
    for out, needle in (
        (user, "not an fskd output"),
        (images, "overlaps the dataset root"),
        (store, "overlaps --store"),
        (plain, "is not a directory"),
        (store / "train", "overlaps --store"),
        (tmp_path / "file.txt" / "x", "is a file"),
    ):
        for force in ([], ["--force"]):
            res = cli(*args, "--store", store, "--out", out, "--device", "cpu", *force, ok=False)
            user_error(res, str(out), needle)
    assert {p: tree(p) for p in before} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries, no .NAME.old-PID


def test_out_dot_and_dotdot_are_refused_cleanly(store, tmp_path, monkeypatch):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "a.txt").write_text("a")
    monkeypatch.chdir(work)
    before = tree(tmp_path / "work")
    for out in (".", ".."):
        res = cli("adapt", "--store", store, "--method", "prototype", "--shots", "1", "--out", out, ok=False)
        user_error(res, "not an fskd output")
    assert tree(tmp_path / "work") == before


def test_an_fskd_state_is_replaced_only_with_force_and_other_files_survive(store, tmp_path):
    out = tmp_path / "state"
    cli("adapt", "--store", store, "--method", "prototype", "--shots", "1", "--out", out)
    (out / "my-notes.md").write_text("kept")
    first = load_state(out)
    res = cli("adapt", "--store", store, "--method", "prototype", "--shots", "2", "--out", out, ok=False)
    user_error(res, "already holds an fskd output", "--force")
    assert load_state(out).config["shots"] == 1
    cli("adapt", "--store", store, "--method", "prototype", "--shots", "2", "--out", out, "--force")
    assert load_state(out).config["shots"] == 2 and first.config["shots"] == 1
    assert (out / "my-notes.md").read_text() == "kept"
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors").__len__() == 1


# -- 2. missing or damaged chunks fail loudly, and extract repairs them ----------------------------
def test_deleted_chunk_is_named_then_repaired(store, images):
    good = allway(store)
    f = chunk_file(store, "test", "features", 1)
    f.unlink()
    res = cli("eval", "--store", store, "--protocol", "allway", "--shot", "1", ok=False)
    user_error(res, "test/features chunk 1")
    res = cli("info", store, "--json", ok=False)
    assert "test/features chunk 1" in res.stdout and res.exit_code == 2
    res = extract(images, store)
    assert "repaired 1 damaged chunk(s) of test" in res.stdout
    assert f.exists() and allway(store) == good
    assert json.loads(cli("info", store, "--check", "--json").stdout)["check"]["ok"]


def test_truncated_chunk_is_named_then_repaired(store, images):
    good = allway(store)
    f = chunk_file(store, "train", "features", 0)
    f.write_bytes(f.read_bytes()[:10])
    res = cli("eval", "--store", store, "--protocol", "allway", "--shot", "1", ok=False)
    user_error(res, "cannot read train/features chunk 0")
    res = cli("info", store, "--check", "--json", ok=False)
    assert res.exit_code == 2 and json.loads(res.stdout)["check"]["damaged"]["train"]["0"]
    res = extract(images, store)
    assert "repaired 1 damaged chunk(s) of train" in res.stdout and allway(store) == good


def test_a_wrong_but_decodable_chunk_fails_its_checksum(store, images):
    good = allway(store)
    a, b = chunk_file(store, "test", "features", 0), chunk_file(store, "test", "features", 2)
    b.write_bytes(a.read_bytes())  # a valid chunk, the wrong data
    res = cli("info", store, "--check", "--json", ok=False)
    report = json.loads(res.stdout)["check"]
    assert res.exit_code == 2 and "checksum mismatch" in report["damaged"]["test"]["2"]
    res = extract(images, store)
    assert "chunk 2: checksum mismatch" in res.stdout and allway(store) == good


def test_deleted_labels_chunk_is_not_read_as_skipped_rows(store, images):
    chunk_file(store, "val", "labels", 0).unlink()
    user_error(cli("eval", "--store", store, "--protocol", "allway", "--shot", "1", ok=False), "val/labels chunk 0")
    extract(images, store)
    s = FeatureStore.open(store)
    assert (s.labels("val") >= 0).all() and s.is_complete()


# -- 3. nothing fskd reads can run code ------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_resume_pickle_never_runs(store, tmp_path):
    marker = tmp_path / "PWNED"
    out = tmp_path / "student"
    resume = tmp_path / ".student.distill-resume"
    resume.mkdir()
    (resume / "checkpoint.pt").write_bytes(pickle.dumps(_Payload(marker)))
    (resume / "checkpoint.json").write_text(json.dumps({"tree": {}, "tensors_file": "checkpoint-x.safetensors"}))
    (resume / "checkpoint-x.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    res = run_fskd("distill", "--store", store, "--out", out, *TINY_DISTILL)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not marker.exists()
    assert "starting from scratch" in res.stderr and load_state(out).kind == "distill"
    assert (resume / "checkpoint.pt").exists()  # a file fskd did not write is left where it was


def test_no_unpickling_in_the_package():
    pkg = Path(__file__).resolve().parents[1] / "fskd"
    for f in pkg.rglob("*.py"):
        text = f.read_text()
        assert "weights_only=False" not in text, f
        assert "pickle.load(" not in text and "pickle.loads(" not in text, f
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, (f, line)


def test_planted_cifar_pickle_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    base = tmp_path / "cifar" / "cifar-100-python"
    base.mkdir(parents=True)
    from fskd.datasets.torchvision_sets import CIFAR_FS_NOVEL, CIFAR_FS_VAL

    names = CIFAR_FS_VAL + CIFAR_FS_NOVEL + [f"base_{i}" for i in range(64)]
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": names}, protocol=2))
    data = {"data": np.zeros((200, 3072), np.uint8), "fine_labels": list(range(100)) * 2, "coarse_labels": [0] * 200}
    (base / "train").write_bytes(pickle.dumps(data, protocol=2))
    (base / "test").write_bytes(pickle.dumps(_Payload(marker)))
    res = cli(
        "extract",
        "cifar-fs",
        "--root",
        tmp_path / "cifar",
        "--store",
        tmp_path / "c.zarr",
        "--encoder",
        "synthetic:4",
        ok=False,
    )
    user_error(res, "refusing to load", "test")
    assert not marker.exists()
    (base / "test").write_bytes(pickle.dumps(data, protocol=2))  # the real layout reads fine
    extract_ok = cli(
        "extract",
        "cifar-fs",
        "--root",
        tmp_path / "cifar",
        "--store",
        tmp_path / "c.zarr",
        "--encoder",
        "synthetic:4",
        "--workers",
        "0",
    )
    assert "encoded 400 images" in extract_ok.stdout
    st = (base / "train").stat()
    os.utime(base / "train", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the split's pickle changed
    res = cli(
        "extract",
        "cifar-fs",
        "--root",
        tmp_path / "cifar",
        "--store",
        tmp_path / "c.zarr",
        "--encoder",
        "synthetic:4",
        "--workers",
        "0",
        ok=False,
    )
    user_error(res, "differs in: files")


# -- 4. atomic replacement, proven by killing at every step ----------------------------------------
STATE_POINTS = ["state:tensors-written", "state:tensors-named", "state:manifest-replaced"]


@pytest.mark.parametrize("point", STATE_POINTS)
def test_kill_while_replacing_a_state_leaves_old_or_new(point, store, tmp_path):
    out = tmp_path / "st"
    cli("adapt", "--store", store, "--method", "prototype", "--shots", "1", "--out", out)
    res = run_fskd(
        "adapt", "--store", store, "--method", "prototype", "--shots", "2", "--out", out, "--force", fault=point
    )
    assert res.returncode == -9, res.stderr[-2000:]
    st = load_state(out)  # complete, whichever it is
    assert st.config["shots"] == (2 if point == "state:manifest-replaced" else 1)
    cli("adapt", "--store", store, "--method", "prototype", "--shots", "4", "--out", out, "--force")
    assert load_state(out).config["shots"] == 4
    assert [p.name for p in out.iterdir() if p.name != "state.json"].__len__() == 1  # leftovers cleaned
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".st.")]


@pytest.mark.parametrize("point", ["state:tensors-written", "state:built"])
def test_kill_while_writing_a_new_state_leaves_nothing_half_made(point, store, tmp_path):
    out = tmp_path / "new"
    res = run_fskd("adapt", "--store", store, "--method", "prototype", "--shots", "1", "--out", out, fault=point)
    assert res.returncode == -9 and not out.exists()
    (tmp_path / ".new.old-4242").mkdir()  # named like fskd's, but fskd never wrote it: kept
    (tmp_path / ".new.old-4242" / "state.json").write_text("{}")
    (tmp_path / ".new.old-4243").mkdir()  # not fskd's: contains a user file, kept
    (tmp_path / ".new.old-4243" / "thesis.tex").write_text("x")
    cli("adapt", "--store", store, "--method", "prototype", "--shots", "1", "--out", out)
    assert load_state(out).config["shots"] == 1
    # the killed run's own building folder is gone; the user's look-alikes stay
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".new")) == [".new.old-4242", ".new.old-4243"]


@pytest.mark.parametrize("point", ["store:chunk-data", "store:chunk-checksum", "store:chunk-written"])
def test_kill_during_extract_then_resume_equals_one_run(point, images, store, tmp_path):
    killed = tmp_path / "k.zarr"
    res = run_fskd("extract", "folder", "--root", images, "--store", killed, *EXTRACT, fault=point)
    assert res.returncode == -9
    res = run_fskd("extract", "folder", "--root", images, "--store", killed, *EXTRACT)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = FeatureStore.open(store), FeatureStore.open(killed)
    for s in a.splits:
        np.testing.assert_array_equal(a.features(s), b.features(s))
        np.testing.assert_array_equal(a.labels(s), b.labels(s))
    assert json.loads(cli("info", killed, "--check", "--json").stdout)["check"]["ok"]


@pytest.fixture(scope="module")
def distill_reference(images, tmp_path_factory):
    """One uninterrupted distillation, shared by the kill-point runs: (store, state dir)."""
    d = tmp_path_factory.mktemp("distill-ref")
    extract(images, d / "s.zarr")
    assert run_fskd("distill", "--store", d / "s.zarr", "--out", d / "ref", *TINY_DISTILL).returncode == 0
    return d / "s.zarr", d / "ref"


@pytest.mark.parametrize("point", ["resume:tensors-written", "resume:manifest-replaced"])
def test_kill_while_saving_the_distill_checkpoint_then_resume(point, distill_reference, tmp_path):
    store, ref = distill_reference
    killed = tmp_path / "killed"
    res = run_fskd("distill", "--store", store, "--out", killed, *TINY_DISTILL, fault=point)
    assert res.returncode == -9 and not killed.exists()
    res = run_fskd("-v", "distill", "--store", store, "--out", killed, *TINY_DISTILL)
    assert res.returncode == 0, res.stderr[-2000:]
    assert ("resuming" in res.stderr) == (point == "resume:manifest-replaced")
    a, b = load_state(ref), load_state(killed)
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert (a.tensors[k] == b.tensors[k]).all(), k
    assert not (tmp_path / ".killed.distill-resume").exists()


# -- 5. inputs changed after extraction are noticed ------------------------------------------------
def test_replaced_image_is_noticed(images, tmp_path):
    root = tmp_path / "imgs"
    subprocess.run(["cp", "-a", str(images), str(root)], check=True)
    path = tmp_path / "s.zarr"
    extract(root, path)
    img = root / "class_0" / "0.png"
    Image.fromarray(np.full((24, 24, 3), 200, np.uint8)).save(img)
    before = tree(path)
    user_error(extract(root, path, ok=False), "differs in: files")
    assert tree(path) == before
    # same size and mtime, other bytes: only the opt-in content hash sees it
    path2 = tmp_path / "s2.zarr"
    extract(root, path2, "--content-hash")
    st = img.stat()
    data = bytearray(img.read_bytes())
    data[-20] ^= 0xFF
    img.write_bytes(bytes(data))
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "nothing re-encoded" in extract(root, path2).stdout  # size + mtime alone cannot tell
    user_error(extract(root, path2, "--content-hash", ok=False), "contents")


# -- 6. every user error is one line and exit 2 ------------------------------------------------------
def test_user_errors_are_one_line(store, images, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    user_error(cli("extract", "folder", "--root", afile, "--store", tmp_path / "x.zarr", ok=False), "is a file")
    user_error(extract(images, afile / "s.zarr", ok=False), "is a file")
    user_error(cli("adapt", "--store", store, "--out", afile / "st", ok=False), "is a file")
    user_error(cli("eval", "--store", store, "--report", afile / "rep", ok=False), "--report", "is a file")
    split = tmp_path / "split.json"
    for content, needle in (
        (json.dumps({"base": "class_0"}), "must be a list of class names"),
        (json.dumps({"base": [1, 2]}), "must be a list of class names"),
        (b"\xff\xfe{}", "not UTF-8"),
    ):
        split.write_bytes(content if isinstance(content, bytes) else content.encode())
        user_error(extract(images, tmp_path / "y.zarr", "--class-split", split, ok=False), str(split), needle)
    user_error(extract(images, tmp_path / "y.zarr", "--class-split", tmp_path, ok=False), "is a directory")
    user_error(
        cli(
            "extract",
            "folder",
            "--root",
            images,
            "--store",
            tmp_path / "y.zarr",
            "--class-ratio",
            "nan,0.5,0.5",
            ok=False,
        ),
        "--class-ratio",
    )
    for kv, needle in (
        ("steps=abc", "must be an integer"),
        ("steps=2.5", "must be an integer"),
        ("steps=-3", "must be >= 0"),
        ("lr=abc", "must be a finite number"),
    ):
        user_error(
            cli(
                "adapt",
                "--store",
                store,
                "--method",
                "linear-probe",
                "--set",
                "recipe=tuned",
                "--set",
                kv,
                "--out",
                tmp_path / "lp",
                ok=False,
            ),
            needle,
        )
    user_error(
        cli("distill", "--store", store, "--set", "lr=abc", "--out", tmp_path / "d", ok=False),
        "lr must be a finite number",
    )
    assert not (tmp_path / "lp").exists() and not (tmp_path / "d").exists()
    before = tree(images)
    user_error(extract(images, images / "inside.zarr", ok=False), "overlaps the dataset root")
    assert tree(images) == before
    user_error(cli("eval", "--store", store, "--report", store / "reports", ok=False), "inside a feature store")
    assert not (store / "reports").exists()


def test_edited_store_attributes_are_an_error_not_a_traceback(store):
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["dtype"] = "float8"
    (store / "zarr.json").write_text(json.dumps(meta))
    user_error(cli("info", store, ok=False), "damaged")
    user_error(cli("eval", "--store", store, ok=False), "damaged")


def test_concurrent_extracts_of_one_store_both_succeed(images, tmp_path):
    path = tmp_path / "same.zarr"
    cmd = [sys.executable, "-m", "fskd", "extract", "folder", "--root", str(images), "--store", str(path), *EXTRACT]
    procs = [
        subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("nothing re-encoded" in o for o, _ in outs) == 1
    assert json.loads(cli("info", path, "--check", "--json").stdout)["check"]["ok"]


def test_damaged_states_and_archives_are_named(store, tmp_path):
    out = tmp_path / "st"
    cli("adapt", "--store", store, "--method", "prototype", "--shots", "1", "--out", out)
    meta = json.loads((out / "state.json").read_text())
    tensors = out / meta["tensors_file"]
    blob = tensors.read_bytes()
    tensors.write_bytes(blob[: len(blob) // 2])
    user_error(cli("eval", "--store", store, "--state", out, ok=False), "does not match the SHA-256")
    tensors.unlink()
    user_error(cli("eval", "--store", store, "--state", out, ok=False), "is missing")
    tensors.write_bytes(blob)
    from fskd.fsutil import meta_digest

    for edit, needle in (
        (lambda m: m.pop("method"), "missing keys ['method']"),
        (lambda m: m.update(surprise=1), "unknown keys ['surprise']"),
    ):
        m = dict(meta)
        edit(m)
        (out / "state.json").write_text(json.dumps(m))  # edited: its hash no longer matches
        user_error(cli("eval", "--store", store, "--state", out, ok=False), "changed since fskd wrote it")
        m["meta_sha256"] = meta_digest(m)  # forged with a matching hash: the keys are still checked
        (out / "state.json").write_text(json.dumps(m))
        user_error(cli("eval", "--store", store, "--state", out, ok=False), needle)
    (out / "state.json").write_text("{not json")
    user_error(cli("eval", "--store", store, "--state", out, ok=False), "not valid JSON")
    omni = tmp_path / "omni"
    omni.mkdir()
    (omni / "images_background.zip").write_bytes(b"PK\x03\x04 truncated")
    user_error(
        cli("extract", "omniglot", "--root", omni, "--store", tmp_path / "o.zarr", ok=False),
        "images_background.zip is not a readable zip archive",
    )


def test_json_errors_are_one_json_object_on_stderr(store, tmp_path):
    res = cli("eval", "--store", tmp_path / "missing.zarr", "--json", ok=False)
    assert res.exit_code == 2 and res.stdout == ""
    err = json.loads(res.stderr)
    assert err["type"] == "StoreError" and "does not exist" in err["error"]


def test_report_write_failure_prints_the_result_first(store, tmp_path, monkeypatch):
    import errno

    import fskd.verbs.evaluate

    def full_disk(directory, name, *a, **k):  # the disk fills up after the check, while the eval ran
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(directory) / f"{name}.json"))

    monkeypatch.setattr(fskd.verbs.evaluate, "write_report", full_disk)
    res = cli(
        "eval",
        "--store",
        store,
        "--shots",
        "1",
        "--way",
        "2",
        "--query",
        "1",
        "--episodes",
        "5",
        "--report",
        tmp_path / "rep",
        "--json",
        ok=False,
    )
    assert res.exit_code == 2 and json.loads(res.stdout)["episodes"] == 5
    err = json.loads(res.stderr)["error"]
    assert "cannot write the report" in err and "No space left on device" in err


# -- 7. split files cannot reach outside the dataset root ------------------------------------------
def test_csv_rows_stay_inside_the_root(tmp_path):
    root = tmp_path / "mini"
    (root / "images").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / "images" / f"{i}.jpg")
    for bad, needle in (
        ("images/../../../../etc/passwd", "outside the dataset root"),
        ("/etc/passwd", "outside the dataset root"),
        ("0.jpg", "listed twice"),
    ):
        (root / "train.csv").write_text(f"filename,label\n0.jpg,a\n1.jpg,b\n{bad},a\n")
        res = cli(
            "extract", "csv", "--root", root, "--store", tmp_path / "c.zarr", "--encoder", "synthetic:4", ok=False
        )
        user_error(res, "train.csv line 4", needle)
    assert not (tmp_path / "c.zarr").exists()


# -- 8. what is left out is said -------------------------------------------------------------------
def test_skips_and_ignored_files_are_reported(images, tmp_path):
    root = tmp_path / "imgs"
    subprocess.run(["cp", "-a", str(images), str(root)], check=True)
    (root / "class_1" / "3.png").write_bytes(b"not a png")
    (root / ".hidden_class").mkdir()
    (root / ".hidden_class" / "x.png").write_bytes((root / "class_0" / "0.png").read_bytes())
    (root / "class_2" / "nested").mkdir()
    (root / "class_2" / "nested" / "y.png").write_bytes((root / "class_0" / "0.png").read_bytes())
    (root / "class_3" / "gone.png").symlink_to(root / "nowhere.png")
    path = tmp_path / "s.zarr"
    res = cli("extract", "folder", "--root", root, "--store", path, *EXTRACT, "--skip-bad")
    assert "encoded 47 images" in res.stdout
    assert "skipped 1 unreadable file(s)" in res.stderr
    info = json.loads(cli("info", path, "--json").stdout)
    assert sum(info["skipped"].values()) == 1
    assert info["ignored_files"] == {
        "hidden folders": 1,
        "images in nested sub-folders (only one level is read)": 1,
        "broken symlinks": 1,
    }


def test_allway_says_which_classes_it_left_out(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 8)).astype("f4")
    y = np.arange(40) % 4
    test_y = np.where(y == 3, 0, y)  # class 3 has no test rows
    s = FeatureStore.from_arrays(
        tmp_path / "a.zarr",
        {"train": (x, y), "test": (x, test_y)},
        ["a", "b", "c", "d"],
        {"base": [0, 1], "val": [], "novel": [2, 3]},
    )
    res = cli("eval", "--store", s.path, "--protocol", "allway", "--shot", "1", "--json")
    w = json.loads(res.stdout)["warnings"]
    assert len(w) == 1 and "'d'" in w[0] and "1 of 4 classes" in w[0]


def test_checksum_is_crc32_of_stored_bytes(store):
    s = FeatureStore.open(store)
    g = s.group["train"]
    f, lab = np.asarray(g["features"][0:4]), np.asarray(g["labels"][0:4], dtype=np.int32)
    assert int(g["checksums"][0]) == zlib.crc32(lab.tobytes(), zlib.crc32(f.tobytes()))


# -- augmented views (fskd extract --augment-views): same commit rule, same repair ----------------
VIEWS = ["--augment-views", "3"]


@pytest.fixture
def views_store(images, tmp_path) -> Path:
    path = tmp_path / "v.zarr"
    extract(images, path, *VIEWS)
    return path


def test_views_are_stored_deterministic_and_leave_the_splits_alone(views_store, store, images, tmp_path):
    v, s = FeatureStore.open(views_store), FeatureStore.open(store)
    for split in s.splits:  # adding views changes nothing else
        np.testing.assert_array_equal(v.features(split), s.features(split))
    assert v.fingerprint == s.fingerprint
    rows = v.view_rows()
    np.testing.assert_array_equal(rows, v.valid_rows("train"))
    views, why = v.take_views(rows)
    x = v.take("train", rows)
    assert views.shape == (len(rows), 3, v.dim) and np.isfinite(views).all() and "3 augmented views" in why
    assert not np.allclose(views[:, 0], x, atol=1e-3) and not np.allclose(views[:, 0], views[:, 1], atol=1e-3)
    # views added later to an existing store equal views made in the same run, chunk for chunk
    res = extract(images, store, *VIEWS)
    assert "augmented views" in res.stdout
    np.testing.assert_array_equal(FeatureStore.open(store).take_views(rows)[0], views)
    # asking again encodes nothing; asking for other views names what differs and changes nothing
    before = tree(views_store)
    assert "nothing re-encoded" in extract(images, views_store, *VIEWS).stdout
    user_error(extract(images, views_store, "--augment-views", "4", ok=False), "views", "differs in: views")
    user_error(extract(images, views_store, *VIEWS, "--augment-scale", "0.08,1", ok=False), "transform.scale")
    assert tree(views_store) == before
    info = cli("info", views_store).stdout
    assert "views     3 augmented views per shot" in info


def test_views_of_the_shots_only_cover_every_fewer_shot_draw(images, tmp_path):
    from fskd.store import sampling

    path = tmp_path / "shots.zarr"
    extract(images, path, *VIEWS, "--augment-shots", "2", "--augment-seeds", "1,2")
    st = FeatureStore.open(path)
    assert len(st.view_rows()) < len(st.valid_rows("train"))
    for k in (1, 2):
        for seed in (1, 2):
            assert sampling.allway_shot_views(st, k, seed)[0] is not None
    assert sampling.allway_shot_views(st, 3, 1)[0] is None or len(st.view_rows()) == len(st.valid_rows("train"))
    missing = [s for s in range(3, 40) if sampling.allway_shot_views(st, 1, s)[0] is None]
    assert missing and "have none" in sampling.allway_shot_views(st, 1, missing[0])[1]


@pytest.mark.parametrize("point", ["store:views-created", "store:views-data", "store:views-written"])
def test_kill_while_adding_views_then_resume_equals_one_run(point, views_store, images, tmp_path):
    killed = tmp_path / "k.zarr"
    res = run_fskd("extract", "folder", "--root", images, "--store", killed, *EXTRACT, *VIEWS, fault=point)
    assert res.returncode == -9
    st = FeatureStore.open(killed)  # the splits are complete; the views are absent or unfinished, never trusted
    assert st.is_complete()
    if point == "store:views-created":
        assert st.views_info is None and list(killed.glob(".views.tmp-*"))
    else:
        assert st.take_views(st.view_rows())[0] is None or point == "store:views-written"
    res = run_fskd("extract", "folder", "--root", images, "--store", killed, *EXTRACT, *VIEWS)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = FeatureStore.open(views_store), FeatureStore.open(killed)
    np.testing.assert_array_equal(a.take_views(a.view_rows())[0], b.take_views(b.view_rows())[0])
    assert not list(killed.glob(".views.tmp-*"))
    assert json.loads(cli("info", killed, "--check", "--json").stdout)["check"]["ok"]


def test_a_damaged_view_chunk_is_named_then_repaired(views_store, images):
    st = FeatureStore.open(views_store)
    good = st.take_views(st.view_rows())[0]
    arr = st.group["views"]["features"]
    f = views_store / "views" / "features" / arr.metadata.encode_chunk_key((0, 0, 0))
    f.write_bytes(f.read_bytes()[:10])
    res = cli("info", views_store, "--check", "--json", ok=False)
    assert res.exit_code == 2 and json.loads(res.stdout)["check"]["damaged"]["views"]["0"]
    extract(images, views_store, *VIEWS)
    st = FeatureStore.open(views_store)
    np.testing.assert_array_equal(st.take_views(st.view_rows())[0], good)
    assert json.loads(cli("info", views_store, "--check", "--json").stdout)["check"]["ok"]


# -- issue 29: fskd deletes only what it can prove it wrote ---------------------------------------
def test_look_alike_hidden_folders_and_tensor_files_are_never_deleted(store, tmp_path):
    out = tmp_path / "bert"
    mine = {".bert.old-v1": "model.safetensors", ".bert.tmp-1": "state.json", ".bert.tmp-99999999-ab": "x.safetensors"}
    for folder, name in mine.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(b"a user's file")
    cli("adapt", "--store", store, "--method", "prototype", "--shots", "1", "--out", out)
    (out / "state-0123456789abcdef.safetensors").write_bytes(b"mine")  # fskd's name pattern, the user's file
    before = {f: tree(tmp_path / f) for f in mine}
    cli("adapt", "--store", store, "--method", "prototype", "--shots", "2", "--out", out, "--force")
    cli("adapt", "--store", store, "--method", "prototype", "--shots", "1", "--out", out, "--force")
    assert {f: tree(tmp_path / f) for f in mine} == before
    assert (out / "state-0123456789abcdef.safetensors").read_bytes() == b"mine"
    st = load_state(out)
    assert st.config["shots"] == 1
    # exactly the committed tensor file and the user's file: the replaced ones were removed
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "state.json",
            "state-0123456789abcdef.safetensors",
            json.loads((out / "state.json").read_text())["tensors_file"],
        ]
    )


def test_two_force_runs_into_one_state_take_turns(store, tmp_path):
    out = tmp_path / "st"
    cli("adapt", "--store", store, "--method", "prototype", "--shots", "1", "--out", out)
    args = [
        sys.executable,
        "-m",
        "fskd",
        "adapt",
        "--store",
        str(store),
        "--method",
        "linear-probe",
        "--shots",
        "2",
        "--out",
        str(out),
        "--force",
        "--device",
        "cpu",
    ]
    for _ in range(3):
        procs = [
            subprocess.Popen([*args, "--seed", str(seed)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for seed in (1, 2)
        ]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err.decode()[-2000:]
        st = load_state(out)  # state.json names a tensor file that exists and matches
        assert st.config["seed"] in (1, 2)
        assert len([p for p in out.iterdir() if p.suffix == ".safetensors"]) == 1
        assert not [p for p in out.iterdir() if p.name.startswith(".")]


# -- issue 29: never a number from data fskd has not verified -------------------------------------
def test_a_flipped_byte_in_a_chunk_is_refused_on_every_read(store, images):
    good = allway(store)
    f = chunk_file(store, "test", "features", 1)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the compressed payload
    f.write_bytes(bytes(data))
    res = cli("eval", "--store", store, "--protocol", "allway", "--shot", "1", ok=False)
    user_error(res, "test/features chunk 1")
    res = extract(images, store)  # the same extract repairs it
    assert "repaired 1 damaged chunk(s) of test" in res.stdout and allway(store) == good


def test_a_chunk_of_nan_features_is_refused_not_scored(store):
    import zarr

    arr = zarr.open_array(store / "test" / "features", mode="r+")
    arr[4:8] = np.nan  # a valid chunk (zarr writes its CRC), holding NaN
    res = cli("eval", "--store", store, "--protocol", "allway", "--shot", "1", ok=False)
    err = user_error(res, "test/features chunk 1", "non-finite")
    assert "row 4" in err
    res = cli("eval", "--store", store, "--protocol", "episodic", "--shot", "1", "--episodes", "5", ok=False)
    assert res.exit_code == 2 and "non-finite" in res.output or res.exit_code == 0  # episodes read novel rows only


def test_non_finite_features_are_never_written(tmp_path):
    from fskd.errors import StoreError

    x = np.zeros((8, 4), np.float32)
    x[3, 1] = np.inf
    with pytest.raises(StoreError, match="non-finite"):
        FeatureStore.from_arrays(
            tmp_path / "a.zarr", {"train": (x, np.arange(8) % 2)}, ["a", "b"], {"base": [0], "val": [], "novel": [1]}
        )


def test_a_state_with_nan_tensors_or_an_edited_state_json_is_refused(store, tmp_path):
    from fskd.fsutil import read_bundle, write_bundle

    out = tmp_path / "st"
    cli("adapt", "--store", store, "--method", "linear-probe", "--shots", "1", "--out", out, "--device", "cpu")
    ev = ["eval", "--store", store, "--state", out, "--protocol", "allway", "--shot", "1", "--device", "cpu"]
    good = cli(*ev, "--json").stdout
    # an edit that keeps the JSON valid: a hyper-parameter changed by hand
    meta = json.loads((out / "state.json").read_text())
    meta["hparams"]["forged"] = 1
    (out / "state.json").write_text(json.dumps(meta))
    user_error(cli(*ev, ok=False), "state.json", "changed since fskd wrote it")
    # a state whose tensors are NaN, committed with correct hashes
    cli(
        "adapt",
        "--store",
        store,
        "--method",
        "linear-probe",
        "--shots",
        "1",
        "--out",
        out,
        "--force",
        "--device",
        "cpu",
    )
    assert json.loads(cli(*ev, "--json").stdout)["accuracy"] == json.loads(good)["accuracy"]
    info, tensors = read_bundle(out, "state.json")
    name = next(k for k, t in tensors.items() if t.is_floating_point())
    tensors[name] = tensors[name] * float("nan")
    write_bundle(out, "state.json", "state", info, tensors)
    user_error(cli(*ev, ok=False), "non-finite", name)


def test_dataset_root_is_absolute_so_no_cwd_can_write_into_the_dataset(images, tmp_path, monkeypatch):
    import shutil

    work, other = tmp_path / "work", tmp_path / "elsewhere" / "deep"
    (work / "data").mkdir(parents=True)
    other.mkdir(parents=True)
    shutil.copytree(images, work / "data" / "imgs")
    monkeypatch.chdir(work)
    cli("extract", "folder", "--root", "data/imgs", "--store", tmp_path / "s.zarr", *EXTRACT)
    assert FeatureStore.open(tmp_path / "s.zarr").attrs["dataset"]["root"] == str(work / "data" / "imgs")
    monkeypatch.chdir(other)
    before = tree(work / "data")
    res = cli(
        "adapt",
        "--store",
        tmp_path / "s.zarr",
        "--method",
        "prototype",
        "--shots",
        "1",
        "--out",
        "../../work/data/imgs/newclass",
        ok=False,
    )
    user_error(res, "dataset root")
    res = cli(
        "bench",
        "--stores",
        tmp_path / "s.zarr",
        "--methods",
        "prototype",
        "--shots",
        "1",
        "--seeds",
        "1",
        "--out",
        "../../work/data/imgs/bench",
        ok=False,
    )
    user_error(res, "dataset root")
    assert tree(work / "data") == before


def test_report_keeps_a_finished_last_row_without_its_newline(store, tmp_path):
    out = tmp_path / "b"
    cli("bench", "--stores", store, "--methods", "prototype", "--shots", "1,2", "--seeds", "1", "--out", out)
    res_file = out / "results.jsonl"
    text = res_file.read_text()
    res_file.write_text(text.rstrip("\n"))  # an editor dropped the final newline
    before = (out / "table.md").read_text()
    cli("bench", "--report", out)
    assert res_file.read_text() == text.rstrip("\n")  # --report reads, never rewrites
    assert (out / "table.md").read_text() == before
    res = cli(
        "bench",
        "--stores",
        store,
        "--methods",
        "prototype",
        "--shots",
        "1,2,4",
        "--seeds",
        "1",
        "--out",
        out,
        "--extend",
    )
    rows = [json.loads(line) for line in res_file.read_text().splitlines()]
    assert len(rows) == 3 and "(2 already done, 1 run" in res.output


# -- issue 29: what a newcomer tripped on ---------------------------------------------------------
def test_a_different_grid_in_an_existing_bench_folder_is_refused(store, tmp_path):
    out = tmp_path / "b"
    cli("bench", "--stores", store, "--methods", "prototype", "--shots", "1,2", "--seeds", "1", "--out", out)
    assert (out / "accuracy_vs_shots.png").exists()
    before = tree(out)
    res = cli(
        "bench", "--stores", store, "--methods", "prototype", "--shots", "1", "--seeds", "1", "--out", out, ok=False
    )
    user_error(res, "holds another grid", "new --out")
    res = cli(
        "bench",
        "--stores",
        store,
        "--methods",
        "prototype",
        "--shots",
        "1",
        "--seeds",
        "1",
        "--out",
        out,
        "--extend",
        ok=False,
    )
    user_error(res, "cannot extend")
    assert tree(out) == before
    # a grid that contains the folder's grows it with --extend; tables and plot come from that one run
    cli(
        "bench",
        "--stores",
        store,
        "--methods",
        "prototype,linear-probe",
        "--shots",
        "1,2",
        "--seeds",
        "1",
        "--out",
        out,
        "--extend",
    )
    meta = json.loads((out / "bench.json").read_text())
    assert len(meta["cells"]) == 4 and "accuracy_vs_shots.png" in meta["outputs"]
    assert "linear-probe" in (out / "table.md").read_text()


def test_long_jobs_log_a_line_per_cell_and_per_chunk_off_a_terminal(images, tmp_path):
    res = run_fskd("extract", "folder", "--root", images, "--store", tmp_path / "s.zarr", *EXTRACT)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "fskd.progress" in ln]
    assert any("extract train:" in ln and "img/s" in ln and "ETA" in ln for ln in lines), res.stderr
    res = run_fskd(
        "bench",
        "--stores",
        tmp_path / "s.zarr",
        "--methods",
        "prototype",
        "--shots",
        "1,2",
        "--seeds",
        "1,2",
        "--out",
        tmp_path / "b",
    )
    assert res.returncode == 0, res.stderr
    cells = [ln for ln in res.stderr.splitlines() if "bench cell" in ln]
    assert len(cells) == 4 and "4/4" in cells[-1] and "ETA" in cells[-1] and "%" in cells[0], res.stderr


def test_ctrl_c_during_extract_says_where_it_stopped_and_a_rerun_resumes(images, store, tmp_path):
    path = tmp_path / "c.zarr"
    res = run_fskd("extract", "folder", "--root", images, "--store", path, *EXTRACT, fault="store:chunk-written@sigint")
    assert res.returncode == 130, res.stderr
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "interrupted" in err[0] and "1/" in err[0] and "resume" in err[0], res.stderr
    assert "Traceback" not in res.stderr
    cli("extract", "folder", "--root", images, "--store", path, *EXTRACT)
    assert allway(path) == allway(store)


def test_a_missing_store_lists_the_stores_nearby(store, tmp_path):
    res = cli("eval", "--store", store.with_name("s.zar"), ok=False)
    user_error(res, "does not exist", "stores nearby", str(store))


def test_a_state_of_another_store_points_to_the_transfer_protocols(store, images, tmp_path):
    other = tmp_path / "o.zarr"
    extract(images, other, "--split-seed", "7")
    cli("adapt", "--store", store, "--method", "prototype", "--shots", "1", "--out", tmp_path / "st")
    res = cli("eval", "--store", other, "--state", tmp_path / "st", "--protocol", "allway", "--shots", "1", ok=False)
    user_error(res, "was fitted on store", "--protocol cross-dataset", "--protocol domain-shift")


def test_bench_says_why_a_cell_is_not_applicable_on_the_console(store, tmp_path):
    res = run_fskd(
        "bench", "--stores", store, "--methods", "prototype", "--shots", "1,64", "--seeds", "1", "--out", tmp_path / "b"
    )
    assert res.returncode == 0, res.stderr
    na = [ln for ln in res.stderr.splitlines() if "is n/a" in ln]
    assert len(na) == 1 and "64-shot" in na[0] and "smallest class" in na[0], res.stderr


def test_a_far_below_line_does_not_squeeze_the_plot(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fskd.reports.plots import _fit_y_range

    fig, ax = plt.subplots()
    lines = {f"m{i}": np.array([60.0 + i, 70.0 + i, 77.0]) for i in range(6)}
    lines["zero-shot"] = np.array([8.0, 8.0, 8.0])
    for y in lines.values():
        ax.plot([1, 4, 16], y)
    _fit_y_range(ax, lines)
    lo, hi = ax.get_ylim()
    assert 55 < lo < 60 and 77 < hi < 80
    assert any("zero-shot: 8.0-8.0%" in t.get_text() for t in ax.texts)
    plt.close(fig)


def test_each_warning_is_said_once(store, tmp_path):
    out = tmp_path / "st"
    for args, needle in (
        (
            ["adapt", "--store", store, "--method", "linear-probe", "--shots", "1", "--out", out, "--device", "cpu"],
            "val classes (fewer than 5)",
        ),
        (
            ["eval", "--store", store, "--state", out, "--protocol", "allway", "--shots", "1", "--device", "cpu"],
            "were chosen for 1 shots and seed 1",
        ),
    ):
        res = run_fskd(*args)
        assert res.returncode == 0, res.stderr
        assert [needle in ln for ln in res.stderr.splitlines()].count(True) == 1, res.stderr


def test_manifests_that_are_fifos_are_never_waited_on(store, tmp_path):
    """fskd's own manifest and journal are read with a bound, regular files only: a FIFO in their
    place (which a plain read would wait on forever) is refused or treated as unreadable."""
    out = tmp_path / "st"
    cli("adapt", "--store", store, "--method", "prototype", "--shots", "1", "--out", out)
    os.mkfifo(out / ".state.json.pending")  # where an interrupted write's journal would be
    res = run_fskd(
        "adapt", "--store", store, "--method", "prototype", "--shots", "2", "--out", out, "--force", timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert load_state(out).config["shots"] == 2
    from fskd.errors import StateError
    from fskd.fsutil import read_bundle

    (out / "state.json").unlink()
    os.mkfifo(out / "state.json")
    with pytest.raises(StateError, match="not a regular file"):
        read_bundle(out, "state.json")
