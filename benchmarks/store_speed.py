"""Reading features back: FeatureStore (Zarr, float16, chunked, LZ4) vs np.load of the same
array (.npy float16 and float32), in the same run. Float32 out in every case.

    python benchmarks/store_speed.py [--rows 200000] [--dim 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_of, machine, table  # noqa: E402

from fskd.store import FeatureStore  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 20_000 if args.quick else args.rows
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, args.dim)).astype(np.float16)
    y = rng.integers(0, 100, n)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        st = FeatureStore.from_arrays(tmp / "s.zarr", {"train": (x, y)}, [f"c{i}" for i in range(100)],
                                      {"base": list(range(50)), "val": [], "novel": list(range(50, 100))},
                                      dtype="float16", chunk_rows=4096)
        np.save(tmp / "x16.npy", x)
        np.save(tmp / "x32.npy", x.astype(np.float32))
        t_npy16 = best_of(lambda: np.load(tmp / "x16.npy").astype(np.float32))
        t_npy32 = best_of(lambda: np.load(tmp / "x32.npy"))
        t_store = best_of(lambda: FeatureStore.open(tmp / "s.zarr").features("train"))
        t_chunks = best_of(lambda: sum(len(f) for _, f, _ in FeatureStore.open(tmp / "s.zarr").iter_chunks("train")))
        t_gather = best_of(lambda: FeatureStore.open(tmp / "s.zarr").gather(list(range(50, 100))))
        disk = sum(p.stat().st_size for p in (tmp / "s.zarr").rglob("*") if p.is_file())
        np16 = (tmp / "x16.npy").stat().st_size
        assert np.array_equal(st.features("train"), x.astype(np.float32))
    mb = n * args.dim * 4 / 2**20
    rows = [
        {"read": "np.load float16 .npy -> float32", "seconds": f"{t_npy16:.3f}", "MiB/s (float32 out)": f"{mb / t_npy16:,.0f}", "ratio": "1.00"},
        {"read": "np.load float32 .npy", "seconds": f"{t_npy32:.3f}", "MiB/s (float32 out)": f"{mb / t_npy32:,.0f}", "ratio": f"{t_npy16 / t_npy32:.2f}"},
        {"read": "FeatureStore.features (whole split)", "seconds": f"{t_store:.3f}", "MiB/s (float32 out)": f"{mb / t_store:,.0f}", "ratio": f"{t_npy16 / t_store:.2f}"},
        {"read": "FeatureStore.iter_chunks (streaming)", "seconds": f"{t_chunks:.3f}", "MiB/s (float32 out)": f"{mb / t_chunks:,.0f}", "ratio": f"{t_npy16 / t_chunks:.2f}"},
        {"read": "FeatureStore.gather (half the classes)", "seconds": f"{t_gather:.3f}", "MiB/s (float32 out)": f"{mb / 2 / t_gather:,.0f}", "ratio": f"{t_npy16 / t_gather:.2f}"},
    ]
    print(f"## Store read speed: {n:,} x {args.dim} float16 features\n")
    print(f"machine: {machine()}; best of 3; page cache warm; {time.strftime('%Y-%m-%d')}\n")
    print(table(rows, ["read", "seconds", "MiB/s (float32 out)", "ratio"]))
    print(f"\nOn disk: store {disk / 2**20:.1f} MiB vs .npy float16 {np16 / 2**20:.1f} MiB. "
          "ratio = np.load(float16) time / this time (higher is faster).")


if __name__ == "__main__":
    main()
