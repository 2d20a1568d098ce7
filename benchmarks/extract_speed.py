"""Extraction throughput: images/s end to end (decode + preprocess in DataLoader workers +
forward + store writes) vs the model forward alone on the very same batches, same run.

    python benchmarks/extract_speed.py [--images 512] [--workers 1] [--encoder lite0-minilm]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, table  # noqa: E402

from fskd import api  # noqa: E402
from fskd.config import ExtractConfig  # noqa: E402
from fskd.datasets import build_dataset  # noqa: E402
from fskd.datasets.base import DatasetListing, ImageDataset, SampleList  # noqa: E402
from fskd.encoders import build_encoder  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cub35"


class Subset(ImageDataset):
    """The first ``n`` cub35 images as one folder-like dataset."""

    name = "cub35-subset"

    def __init__(self, n: int) -> None:
        super().__init__(str(DATA))
        self.inner = build_dataset("cub", str(DATA))
        full = self.inner.listing()
        rows = full.splits["all"]
        self._listing = DatasetListing(self.name, str(DATA), full.class_keys, full.class_names,
                                       {"all": SampleList(rows.refs[:n], rows.labels[:n])}, full.standard_class_split)

    def listing(self) -> DatasetListing:
        return self._listing

    def open(self, ref: str):
        return self.inner.open(ref)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--encoder", default="lite0-minilm")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 128 if args.quick else args.images
    source = Subset(n)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ExtractConfig(dataset="folder", encoder=args.encoder, store=str(Path(tmp) / "s.zarr"),
                            batch_size=args.batch_size, workers=args.workers, chunk_rows=args.batch_size * 4,
                            sample_split=(1.0, 0.0, 0.0))
        r = api.extract(cfg, source=source)
        e2e = r.images_per_s
    # the model alone, on the same images already decoded and preprocessed, same batch size
    enc = build_encoder(args.encoder, "cpu")
    refs = source.listing().splits["all"].refs
    x = torch.stack([enc.preprocess(source.open(ref)) for ref in refs])
    with torch.inference_mode():
        enc.encode_images(x[: args.batch_size])  # warm-up
        t0 = time.perf_counter()
        for s in range(0, len(x), args.batch_size):
            enc.encode_images(x[s : s + args.batch_size])
        fwd = len(x) / (time.perf_counter() - t0)
    rows.append({"path": "model forward alone (pre-decoded batches)", "images/s": f"{fwd:.1f}", "ratio": "1.00"})
    rows.append({"path": f"fskd extract end to end ({args.workers} loader worker(s))", "images/s": f"{e2e:.1f}",
                 "ratio": f"{e2e / fwd:.2f}"})
    print(f"## Extraction throughput: {n} cub35 images, {args.encoder}, batch {args.batch_size}\n")
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}; {time.strftime('%Y-%m-%d')}\n")
    print(table(rows, ["path", "images/s", "ratio"]))
    print(f"\nThe loader keeps the model busy when the ratio is >= 0.85 (it is {e2e / fwd:.2f}).")


if __name__ == "__main__":
    main()
