"""Peak memory while writing an ImageNet-sized store: 1,281,167 x 512 through the real extract
pipeline (DataLoader, encoder, chunked Zarr writes) with the synthetic encoder (a fixed random
projection of 8x8 pixels) and an in-memory dataset of tiny generated images.

    python benchmarks/store_memory.py [--rows 1281167] [--dim 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, peak_rss_mb, table  # noqa: E402

from fskd import api  # noqa: E402
from fskd.config import ExtractConfig  # noqa: E402
from fskd.datasets.base import DatasetListing, ImageDataset, SampleList  # noqa: E402
from fskd.store import FeatureStore  # noqa: E402


class TinyImages(ImageDataset):
    """``rows`` generated 8x8 images in 1,000 classes (ImageNet-like labels, no disk)."""

    name = "tiny-generated"

    def __init__(self, rows: int) -> None:
        super().__init__(None)
        self.rows = rows

    def listing(self) -> DatasetListing:
        labels = np.arange(self.rows, dtype=np.int32) % 1000
        refs = [f"n{i % 1000:08d}/{i}.JPEG" for i in range(self.rows)]
        keys = [f"n{c:08d}" for c in range(1000)]
        return DatasetListing(self.name, "", keys, keys, {"train": SampleList(refs, labels)})

    def open(self, ref: str) -> Image.Image:
        i = int(ref.rsplit("/", 1)[1].split(".")[0])
        return Image.new("RGB", (8, 8), (i % 251, (i // 251) % 251, (i // 63001) % 251))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_281_167)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rows = 100_000 if args.quick else args.rows
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.zarr"
        cfg = ExtractConfig(
            dataset="folder",
            encoder=f"synthetic:{args.dim}",
            store=str(path),
            batch_size=2048,
            chunk_rows=8192,
            workers=args.workers,
            sample_split=(1.0, 0.0, 0.0),
        )
        r = api.extract(cfg, source=TinyImages(rows))
        st = FeatureStore.open(path)
        n = sum(st.n_rows(s) for s in st.splits)
        disk = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        complete = st.is_complete()
    own, kids = peak_rss_mb()
    out = [
        {
            "rows": f"{n:,}",
            "dim": args.dim,
            "complete": complete,
            "seconds": f"{time.perf_counter() - t0:.0f}",
            "images/s": f"{r.images_per_s:,.0f}",
            "peak RSS main (MiB)": f"{own:,.0f}",
            "peak RSS loader worker (MiB)": f"{kids:,.0f}",
            "store on disk (MiB)": f"{disk / 2**20:,.0f}",
        }
    ]
    print(f"## Writing a {n:,} x {args.dim} store (synthetic encoder)\n")
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d')}\n")
    print(table(out, list(out[0])))
    print(f"\nPeak RSS of the main process {'<' if own < 2048 else '>='} 2 GiB.")


if __name__ == "__main__":
    main()
