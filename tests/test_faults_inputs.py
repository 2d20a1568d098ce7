"""Issue 29, inputs: images are decoded as a viewer shows them (EXIF orientation, 16-bit, frames,
transparency), small input files are read with a bound, an encoder spec that is not a path never
looks at the file system, and non-ASCII class names work under an ASCII locale."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fskd.datasets.base import FRAMES_INFO, open_rgb, to_rgb
from fskd.encoders.base import spec_paths, weights_identity
from fskd.encoders.student import decode_square
from fskd.store import FeatureStore
from tests.conftest import tinted_images
from tests.test_faults import ENV, EXTRACT, cli, user_error


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """6 classes x 4 tiny PNGs."""
    return tinted_images(tmp_path_factory.mktemp("input-images"), 6, 4, 12)


def extract(root: Path, store: Path, *extra: str, ok: bool = True):
    return cli("extract", "folder", "--root", root, "--store", store, *EXTRACT, *extra, ok=ok)


# -- images as a viewer shows them ------------------------------------------------------------------
def upright() -> Image.Image:
    """A smooth, asymmetric 32x16 picture: a rotation or a flip of it is far from it."""
    y, x = np.mgrid[0:16, 0:32]
    return Image.fromarray(np.stack([x * 8, y * 16, 255 - x * 4], -1).astype("uint8"))


def test_exif_rotated_jpeg_decodes_like_the_upright_image(tmp_path):
    up = upright()
    up.save(tmp_path / "up.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: stored turned left, shown turned right (a phone held upright)
    up.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    a, b = np.asarray(open_rgb(tmp_path / "up.jpg"), float), np.asarray(open_rgb(tmp_path / "phone.jpg"), float)
    assert a.shape == b.shape == (16, 32, 3)
    assert np.abs(a - b).mean() < 3  # JPEG noise only
    with Image.open(tmp_path / "phone.jpg") as im:  # what a plain convert("RGB") gives: sideways
        assert im.convert("RGB").size == (16, 32)
        assert tuple(decode_square(im, 8).shape) == (3, 8, 8)
        assert np.abs(decode_square(im, 8).numpy().astype(int) - decode_square(up, 8).numpy().astype(int)).mean() < 3


def test_16bit_png_matches_the_8bit_image(tmp_path):
    ramp = np.tile(np.arange(256), (4, 1))
    Image.fromarray((ramp * 257).astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(ramp.astype(np.uint8)).save(tmp_path / "flat.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")  # Pillow keeps the 16 bits
    deep, flat = np.asarray(open_rgb(tmp_path / "deep.png"), int), np.asarray(open_rgb(tmp_path / "flat.png"), int)
    assert deep.min() == 0 and deep.max() == 255 and len(np.unique(deep)) == 256  # not all white
    assert np.abs(deep - flat).max() <= 1
    # the other deep modes: 32-bit integers holding 16-bit values, floats in [0, 1]
    assert np.abs(np.asarray(to_rgb(Image.fromarray((ramp * 257).astype(np.int32))), int) - flat).max() <= 1
    assert np.abs(np.asarray(to_rgb(Image.fromarray((ramp / 255).astype(np.float32))), int) - flat).max() <= 1
    assert (
        np.abs(
            decode_square(Image.open(tmp_path / "deep.png"), 4).numpy().astype(int)
            - decode_square(Image.open(tmp_path / "flat.png"), 4).numpy().astype(int)
        ).max()
        <= 1
    )


def test_transparency_is_shown_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)  # transparent black...
    rgba[0, 0] = (255, 0, 0, 255)  # ...but one opaque red pixel
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(open_rgb(tmp_path / "a.png"))
    assert tuple(out[0, 0]) == (255, 0, 0) and (out[1:] == 255).all()
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(open_rgb(tmp_path / "p.png"))
    assert tuple(out[0, 0]) == (0, 0, 255) and tuple(out[3, 3]) == (255, 255, 255)


def test_animated_gif_uses_frame_0_and_says_so(images, tmp_path, caplog):
    frames = [Image.new("RGB", (12, 12), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    im = open_rgb(gif)
    assert (np.asarray(im) == (255, 0, 0)).all() and im.info[FRAMES_INFO] == 3
    assert FRAMES_INFO not in open_rgb(images / "class_0" / "0.png").info
    root = tmp_path / "imgs"
    subprocess.run(["cp", "-a", str(images), str(root)], check=True)
    for c in (1, 4):
        (root / f"class_{c}" / "anim.gif").write_bytes(gif.read_bytes())
    extract(root, tmp_path / "s.zarr")  # (the CLI logs to stderr; under pytest the log goes to caplog)
    warned = [r.getMessage() for r in caplog.records if "multi-frame" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("2 multi-frame image file(s)"), warned  # once, counted
    assert "only the first frame" in warned[0] and "anim.gif (3 frames)" in warned[0]


# -- small input files are read with a bound --------------------------------------------------------
def _limited():
    resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))  # a regression reading /dev/zero dies here


@pytest.mark.parametrize("option", ["--class-split", "--descriptions"])
def test_dev_zero_is_refused_at_once(option, images, tmp_path):
    t0 = time.perf_counter()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "fskd",
            "extract",
            "folder",
            "--root",
            str(images),
            "--store",
            str(tmp_path / "s.zarr"),
            *EXTRACT,
            option,
            "/dev/zero",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limited,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(f"error: {option} /dev/zero: is a device, not a regular file"), res.stderr
    assert "64 MiB" in res.stderr and time.perf_counter() - t0 < 60
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("option", ["--class-split", "--descriptions"])
def test_fifo_directory_and_oversize_file_are_refused(option, images, tmp_path):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)

    def unblock():  # a regression that opens the FIFO and waits: give it EOF instead of hanging
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    watchdog = threading.Timer(20, unblock)
    watchdog.start()
    try:
        t0 = time.perf_counter()
        user_error(extract(images, tmp_path / "s.zarr", option, fifo, ok=False), option, str(fifo), "FIFO")
        assert time.perf_counter() - t0 < 15
    finally:
        watchdog.cancel()
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(65 << 20)  # sparse: no disk used
    line = user_error(extract(images, tmp_path / "s.zarr", option, big, ok=False), option, str(big), "64 MiB")
    assert "65.0 MiB" in line
    user_error(extract(images, tmp_path / "s.zarr", option, tmp_path, ok=False), option, "is a directory")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    user_error(extract(images, tmp_path / "s.zarr", option, deep, ok=False), option, "nested too deeply")
    assert not (tmp_path / "s.zarr").exists()


def test_a_dataset_split_file_that_is_a_device_is_refused(tmp_path):
    root = tmp_path / "mini"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "images" / "a.png")
    (root / "train.csv").symlink_to("/dev/zero")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "fskd",
            "extract",
            "csv",
            "--root",
            str(root),
            "--store",
            str(tmp_path / "s.zarr"),
            "--encoder",
            "synthetic:8",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limited,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "train.csv" in res.stderr and "is a device" in res.stderr, res.stderr


# -- an encoder spec that is not a path never looks at the file system ------------------------------
def test_a_file_named_like_the_synthetic_dimension_changes_nothing(images, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    store = tmp_path / "s.zarr"
    args = ["--encoder", "synthetic:64"]
    cli("extract", "folder", "--root", images, "--store", store, *EXTRACT, *args)
    before = FeatureStore.open(store).fingerprint
    (work / "64").write_bytes(b"not weights")
    (work / "synthetic").mkdir()
    (work / "synthetic" / "w.pth").write_bytes(b"x")
    assert spec_paths("synthetic:64") == [] and weights_identity("synthetic:64") == {}
    res = cli("extract", "folder", "--root", images, "--store", store, *EXTRACT, *args)
    assert "nothing re-encoded" in res.stdout and FeatureStore.open(store).fingerprint == before
    assert spec_paths("timm:resnet18") == [] and spec_paths("timm:resnet18:pretrained") == []
    assert spec_paths("timm:resnet18:w.pth") == ["w.pth"] and spec_paths("student:runs/s") == ["runs/s"]


# -- non-ASCII class names under an ASCII locale ----------------------------------------------------
def test_unicode_class_names_under_the_c_locale(images, tmp_path):
    env = {
        k: v for k, v in ENV.items() if not k.startswith("LC_") and k not in ("LANG", "LANGUAGE", "PYTHONIOENCODING")
    }
    env.update(LC_ALL="C", PYTHONUTF8="0")
    fsenc = subprocess.run(
        [sys.executable, "-c", "import sys; print(sys.getfilesystemencoding())"],
        env=env,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if fsenc.lower() not in ("ascii", "ansi_x3.4-1968"):
        pytest.skip(f"LC_ALL=C gives the file-system encoding {fsenc} here, not ASCII")
    root = tmp_path / "données"
    subprocess.run(["cp", "-a", str(images), str(root)], check=True)
    (root / "class_0").rename(root / "é")
    (root / "class_1").rename(root / "日本")
    split = tmp_path / "split.json"
    split.write_text(
        json.dumps({"base": ["é", "class_2", "class_3"], "val": ["class_4"], "novel": ["日本", "class_5"]}),
        encoding="utf-8",
    )

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "fskd", *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=300,
            cwd=tmp_path,
        )

    store = tmp_path / "s.zarr"
    res = run(
        "extract",
        "folder",
        "--root",
        root,
        "--store",
        store,
        "--encoder",
        "synthetic:8",
        "--workers",
        "0",
        "--class-split",
        split,
        "--sample-split",
        "0.5,0.25,0.25",
    )
    assert res.returncode == 0, res.stderr
    for args in (
        ["eval", "--store", store, "--protocol", "allway", "--shot", "1", "--report", tmp_path / "rep"],
        ["info", store],
    ):
        res = run(*args)
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    s = FeatureStore.open(store)
    assert "é" in s.class_keys and "日本" in s.class_keys  # stored as the text, not as escaped bytes
    assert any(i.startswith("é/") for i in s.sample_ids("train"))
    assert any("é" in p.read_text(encoding="utf-8") for p in (tmp_path / "rep").glob("*.md"))
