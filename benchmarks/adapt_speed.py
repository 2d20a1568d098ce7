"""Fit time of every ``fskd adapt`` method on cub35 cached features (1,994 photos, 1280-d image
features, 384-d text): both regimes (base-class learning + val-class episodes, and the all-way
shots + val split). Limits from the issue: under 30 s each, under 1 s for training-free methods.
Best of ``--repeat`` wall times (the least disturbed by other load on a shared machine), the
process CPU time of that run, and the ratio to ``prototype`` measured in the same run.

``--allway-part`` also times each fit with ``--set regime=allway`` (the all-way regime alone, what
the authors' code of these methods fits and what ``fskd bench`` asks for in all-way cells).

    python benchmarks/adapt_speed.py [--quick] [--store PATH] [--shots 16] [--repeat 3]
    python benchmarks/adapt_speed.py --shots 16 --repeat 1 --allway-part --methods tip-adapter,tip-adapter-f
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TRAINING_FREE = {"prototype", "zero-shot", "tip-adapter"}


def main() -> None:
    from _common import ROOT, cub35_store, machine, parse_variant, table, with_recipes

    from fskd import api
    from fskd.config import AdaptConfig
    from fskd.methods import methods_of_kind

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one repeat, 4 shots")
    ap.add_argument("--store", default=None)
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--methods", default=None, help="comma list (default: every adapt method and recipe)")
    ap.add_argument("--allway-part", action="store_true", help="also time each fit with --set regime=allway")
    args = ap.parse_args()
    store = cub35_store(args.store, Path(args.data_root))
    shots, repeat = (4, 1) if args.quick else (args.shots, args.repeat)
    chosen = args.methods.split(",") if args.methods else with_recipes(methods_of_kind("adapt"))
    methods = ["prototype"] + [m for m in chosen if m != "prototype"]
    load0 = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        api.adapt(AdaptConfig(store=store, method="prototype", shots=shots, out=f"{d}/warm"))  # imports, store cache
        for m in methods:
            name, options = parse_variant(m)

            def fit(i: int, tag: str, m=m, name=name, options=options) -> tuple[float, float]:
                w, c = time.perf_counter(), time.process_time()
                api.adapt(
                    AdaptConfig(store=store, method=name, shots=shots, seed=1, out=f"{d}/{m}-{tag}{i}", options=options)
                )
                return time.perf_counter() - w, time.process_time() - c

            best = min((fit(i, "") for i in range(repeat)), key=lambda r: r[0])
            limit = 1.0 if m in TRAINING_FREE else 30.0
            row = {
                "method": m,
                "training-free": "yes" if m in TRAINING_FREE else "no",
                "fit s (best)": f"{best[0]:.2f}",
                "CPU s": f"{best[1]:.2f}",
                "_wall": best[0],
                "limit s": f"{limit:g}",
                "within": "yes" if best[0] < limit else "NO",
            }
            if args.allway_part:
                aw = {**options, "regime": "allway"}
                part = min((fit(i, "allway-", options=aw) for i in range(repeat)), key=lambda r: r[0])
                row["all-way part s"] = f"{part[0]:.2f}"
                row["share"] = f"{part[0] / best[0]:.0%}"
            rows.append(row)
    base = rows[0]["_wall"]
    for r in rows:
        r["x prototype"] = f"{r['_wall'] / base:.0f}"
    print(
        f"## fskd adapt fit time on cub35 ({shots} shots)\n\n{machine()}; load average {load0:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end (a shared machine: best of {repeat}); store `{store}`.\n"
    )
    columns = ["method", "training-free", "fit s (best)", "CPU s", "x prototype", "limit s", "within"]
    print(table(rows, columns + (["all-way part s", "share"] if args.allway_part else [])))


if __name__ == "__main__":
    main()
