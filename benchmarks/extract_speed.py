"""Extraction throughput: images/s end to end (decode + preprocess in DataLoader workers +
forward + store writes) vs the model forward alone on the very same batches, same run.

    python benchmarks/extract_speed.py [--images 512] [--workers 0,1,2] [--rounds 3] [--encoder lite0-minilm]
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
        self._listing = DatasetListing(
            self.name,
            str(DATA),
            full.class_keys,
            full.class_names,
            {"all": SampleList(rows.refs[:n], rows.labels[:n])},
            full.standard_class_split,
        )

    def listing(self) -> DatasetListing:
        return self._listing

    def open(self, ref: str):
        return self.inner.open(ref)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", default="0,1,2", help="loader worker counts to compare, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (a shared machine drifts: best of each)")
    ap.add_argument("--encoder", default="lite0-minilm")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 128 if args.quick else args.images
    rounds = 1 if args.quick else args.rounds
    workers = [int(w) for w in args.workers.split(",")]
    source = Subset(n)
    # the model alone, on the same images already decoded and preprocessed, same batch size
    enc = build_encoder(args.encoder, "cpu")
    refs = source.listing().splits["all"].refs
    x = torch.stack([enc.preprocess(source.open(ref)) for ref in refs])

    def forward() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            for s in range(0, len(x), args.batch_size):
                enc.encode_images(x[s : s + args.batch_size])
            return len(x) / (time.perf_counter() - t0)

    def end_to_end(w: int) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = ExtractConfig(
                dataset="folder",
                encoder=args.encoder,
                store=str(Path(tmp) / "s.zarr"),
                batch_size=args.batch_size,
                workers=w,
                chunk_rows=args.batch_size * 4,
                sample_split=(1.0, 0.0, 0.0),
            )
            return api.extract(cfg, source=source).images_per_s

    forward()  # warm-up
    fwd: list[float] = []
    e2e: dict[int, list[float]] = {w: [] for w in workers}
    for _ in range(rounds):  # interleaved, so drift on a shared machine hits both paths alike
        for w in workers:
            fwd.append(forward())
            e2e[w].append(end_to_end(w))
    best = max(fwd)
    rows = [
        {
            "path": "model forward alone (pre-decoded batches)",
            "images/s (best)": f"{best:.1f}",
            "images/s (all runs)": " ".join(f"{v:.0f}" for v in fwd),
            "ratio": "1.00",
        }
    ]
    for w in workers:
        rows.append(
            {
                "path": f"fskd extract end to end, {w} loader worker(s)",
                "images/s (best)": f"{max(e2e[w]):.1f}",
                "images/s (all runs)": " ".join(f"{v:.0f}" for v in e2e[w]),
                "ratio": f"{max(e2e[w]) / best:.2f}",
            }
        )
    print(f"## Extraction throughput: {n} cub35 images, {args.encoder}, batch {args.batch_size}\n")
    print(
        f"machine: {machine()}; torch threads {torch.get_num_threads()}; {rounds} interleaved rounds; "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print(table(rows, ["path", "images/s (best)", "images/s (all runs)", "ratio"]))
    worst = min(max(e2e[w]) / best for w in workers)
    print(
        f"\nEnd to end includes decoding, preprocessing, the forward pass and the store writes; ratio = best end-to-end "
        f"/ best forward alone. The loader keeps the model busy when the ratio is >= 0.85 (lowest here: {worst:.2f})."
    )


if __name__ == "__main__":
    main()
