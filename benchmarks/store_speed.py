"""Reading features back: FeatureStore (Zarr, float16, chunked, LZ4) vs np.load of the same
array (.npy float16 and float32), in the same run. Float32 out in every case.

A second table reads one store from a local folder and from object storage: an S3-API server
(moto, started here on 127.0.0.1; needs `pip install -e '.[dev]'`) holding the same store, with
1 and with N chunk requests in flight (`fskd_max_requests`). moto is a Python server on the same
2 cores, so the absolute S3 numbers are a floor, not AWS's; the ratio between 1 and N requests
is what the bound buys.

    python benchmarks/store_speed.py [--rows 200000] [--dim 512] [--remote-rows 50000] [--no-remote]
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
    ap.add_argument("--remote-rows", type=int, default=50_000)
    ap.add_argument("--requests", type=int, default=8, help="chunk requests in flight for the bounded S3 reads")
    ap.add_argument("--no-remote", action="store_true")
    args = ap.parse_args()
    n = 20_000 if args.quick else args.rows
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, args.dim)).astype(np.float16)
    y = rng.integers(0, 100, n)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        st = FeatureStore.from_arrays(
            tmp / "s.zarr",
            {"train": (x, y)},
            [f"c{i}" for i in range(100)],
            {"base": list(range(50)), "val": [], "novel": list(range(50, 100))},
            dtype="float16",
            chunk_rows=4096,
        )
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
        {
            "read": "np.load float16 .npy -> float32",
            "seconds": f"{t_npy16:.3f}",
            "MiB/s (float32 out)": f"{mb / t_npy16:,.0f}",
            "ratio": "1.00",
        },
        {
            "read": "np.load float32 .npy",
            "seconds": f"{t_npy32:.3f}",
            "MiB/s (float32 out)": f"{mb / t_npy32:,.0f}",
            "ratio": f"{t_npy16 / t_npy32:.2f}",
        },
        {
            "read": "FeatureStore.features (whole split)",
            "seconds": f"{t_store:.3f}",
            "MiB/s (float32 out)": f"{mb / t_store:,.0f}",
            "ratio": f"{t_npy16 / t_store:.2f}",
        },
        {
            "read": "FeatureStore.iter_chunks (streaming)",
            "seconds": f"{t_chunks:.3f}",
            "MiB/s (float32 out)": f"{mb / t_chunks:,.0f}",
            "ratio": f"{t_npy16 / t_chunks:.2f}",
        },
        {
            "read": "FeatureStore.gather (half the classes)",
            "seconds": f"{t_gather:.3f}",
            "MiB/s (float32 out)": f"{mb / 2 / t_gather:,.0f}",
            "ratio": f"{t_npy16 / t_gather:.2f}",
        },
    ]
    print(f"## Store read speed: {n:,} x {args.dim} float16 features\n")
    print(f"machine: {machine()}; best of 3; page cache warm; {time.strftime('%Y-%m-%d')}\n")
    print(table(rows, ["read", "seconds", "MiB/s (float32 out)", "ratio"]))
    print(
        f"\nOn disk: store {disk / 2**20:.1f} MiB vs .npy float16 {np16 / 2**20:.1f} MiB. "
        "ratio = np.load(float16) time / this time (higher is faster)."
    )

    if not args.no_remote:
        remote(2_000 if args.quick else args.remote_rows, args.dim, args.requests)


def _moto():
    """Start a moto S3 server on a free 127.0.0.1 port; returns (process, endpoint)."""
    import socket
    import subprocess

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto S3 server did not start")


def remote(n: int, dim: int, requests: int) -> None:
    import os

    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError:
        print("\n(object-storage table skipped: pip install -e '.[dev]' for s3fs and moto[server])")
        return
    from fskd.store.location import configure

    proc, endpoint = _moto()
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    try:
        import fsspec

        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("fskd-bench")
        rng = np.random.default_rng(0)
        x = rng.normal(size=(n, dim)).astype(np.float16)
        y = rng.integers(0, 100, n)
        split = {"base": list(range(50)), "val": [], "novel": list(range(50, 100))}
        shots = np.sort(rng.choice(n, size=min(n, 1600), replace=False))  # 16 shots x 100 classes
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            local = str(Path(tmp) / "s.zarr")
            url = "s3://fskd-bench/s.zarr"
            t0 = time.perf_counter()
            FeatureStore.from_arrays(
                local, {"train": (x, y)}, [f"c{i}" for i in range(100)], split, dtype="float16", chunk_rows=1024
            )
            t_write_local = time.perf_counter() - t0
            t0 = time.perf_counter()
            FeatureStore.from_arrays(
                url, {"train": (x, y)}, [f"c{i}" for i in range(100)], split, dtype="float16", chunk_rows=1024
            )
            t_write_s3 = time.perf_counter() - t0
            cases = [
                ("local folder", local, 1),
                ("s3 (moto), 1 request in flight", url, 1),
                (f"s3 (moto), {requests} requests in flight", url, requests),
            ]
            base = {}
            for name, where, k in cases:
                configure({"fskd_max_requests": k})
                st = FeatureStore.open(where)
                t_iter = best_of(lambda st=st: sum(len(f) for _, f, _ in st.iter_chunks("train")))
                t_gather = best_of(lambda st=st: st.gather(list(range(50, 100))))
                t_take = best_of(lambda st=st: st.take("train", shots))
                assert np.array_equal(st.take("train", shots), x[shots].astype(np.float32))
                base = base or {"iter": t_iter, "gather": t_gather, "take": t_take}
                rows.append(
                    {
                        "store": name,
                        "iter_chunks s": f"{t_iter:.2f}",
                        "gather half s": f"{t_gather:.2f}",
                        "take 1,600 rows s": f"{t_take:.2f}",
                        "iter ratio vs local": f"{base['iter'] / t_iter:.2f}",
                        "take ratio vs local": f"{base['take'] / t_take:.2f}",
                    }
                )
        configure(None)
        print(f"\n## Local folder vs object storage: {n:,} x {dim} float16, 1,024 rows per chunk\n")
        print(
            f"S3-API server: moto on 127.0.0.1 (same machine); best of 3; written in {t_write_local:.1f} s locally, "
            f"{t_write_s3:.1f} s to s3\n"
        )
        print(
            table(
                rows,
                [
                    "store",
                    "iter_chunks s",
                    "gather half s",
                    "take 1,600 rows s",
                    "iter ratio vs local",
                    "take ratio vs local",
                ],
            )
        )
        print("\nratio = local time / this time (below 1: slower than the local folder).")
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
