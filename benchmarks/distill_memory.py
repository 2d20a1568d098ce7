"""Distillation memory does not grow with the dataset: peak RSS of ``fskd distill`` at 20k and 200k
images, and the images/s of its epoch, each run in its own process.

The images are the memory benchmark's generated 8x8 pictures (benchmarks/store_memory.py), written
here as PNG files of a ``folder`` dataset (100 classes) and extracted with the synthetic encoder;
then one semi-regime epoch (4 labelled shots per class, the rest unlabelled) of a timm resnet10t
student at 32 px. The decoded images go once into a cache file on disk and every batch reads its
rows from there, so resident memory is the model, the teacher features (one row per image, in
the store's precision) and a batch. The table also says what holding the decoded images in RAM
would have cost (the earlier design).

    python benchmarks/distill_memory.py [--sizes 20000,200000] [--keep DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _common import table  # noqa: E402

GIB, MIB = 2**30, 2**20
CLASSES = 100
IMAGE_SIZE = 32


def write_images(root: Path, n: int) -> float:
    """``n`` generated 8x8 PNG images in ``CLASSES`` class folders (the store_memory pictures)."""
    t0 = time.perf_counter()
    for c in range(CLASSES):
        (root / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i % 251, (i // 251) % 251, (i // 63001) % 251)).save(
            root / f"class{i % CLASSES:03d}" / f"{i}.png"
        )
    return time.perf_counter() - t0


def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """Wall s, peak RSS (GiB) of the command's own process, its stdout."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024 / GIB, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20000,200000")
    ap.add_argument("--keep", default="", help="keep the images, stores, caches and states here")
    ap.add_argument("--quick", action="store_true", help="2,000 and 20,000 images")
    args = ap.parse_args()
    if args.quick:
        args.sizes = "2000,20000"
    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = None if args.keep else tempfile.TemporaryDirectory()
    root = Path(args.keep or tmp.name)
    env = {**os.environ, "FSKD_CACHE_DIR": str(root / "cache")}
    fskd = [sys.executable, "-m", "fskd"]
    rows = []
    from fskd.encoders.student import stored_size

    side = stored_size(IMAGE_SIZE)
    for n in sizes:
        images = root / f"images-{n}"
        write_s = write_images(images, n) if not images.exists() else 0.0
        store = root / f"store-{n}.zarr"
        ext_s, ext_rss, _ = timed(
            [
                *fskd,
                "extract",
                "folder",
                "--root",
                str(images),
                "--encoder",
                "synthetic:64",
                "--store",
                str(store),
                "--batch-size",
                "1024",
                "--workers",
                "1",
            ],
            env,
        )
        fit_s, fit_rss, out = timed(
            [
                *fskd,
                "distill",
                "--store",
                str(store),
                "--shots",
                "4",
                "--student",
                "timm:resnet10t",
                "--epochs",
                "1",
                "--set",
                f"image_size={IMAGE_SIZE}",
                "--set",
                "val_every=1",
                "--out",
                str(root / f"student-{n}"),
                "--json",
            ],
            env,
        )
        m = json.loads(out)["metrics"]
        train = m["rows"]["train"]
        rows.append(
            {
                "images": f"{n:,}",
                "train rows": f"{train:,}",
                "decode s (once)": f"{m['decode_seconds']:.0f}",
                "epoch images/s": f"{m['train_images_per_s']:,.0f}",
                "distill wall s": f"{fit_s:.0f}",
                "peak RSS distill GiB": f"{fit_rss:.2f}",
                "peak RSS extract GiB": f"{ext_rss:.2f}",
                "decoded images in RAM would be GiB": f"{m['rows']['decoded'] * 3 * side * side / GIB:.2f}",
                "cache file GiB": f"{max((root / 'cache' / 'images').glob('*.u8'), key=os.path.getmtime).stat().st_size / GIB:.2f}",
            }
        )
        print(table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)
        print(f"(images written in {write_s:.0f} s, extracted in {ext_s:.0f} s)", flush=True)
    print(
        f"\n## fskd distill memory: semi regime, 4 shots x {CLASSES} classes, 1 epoch, resnet10t at {IMAGE_SIZE} px "
        f"({side} px stored), {time.strftime('%Y-%m-%d')}\n"
    )
    print(table(rows, list(rows[0])))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
