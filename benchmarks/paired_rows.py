"""Paired differences between two rows of a bench's results (each cell paired by dataset, shots
and seed), with the 95% CI over seeds (Student t), per cell and per shot count.

    python benchmarks/paired_rows.py runs/bench/seed-allway mtkd-2stage mtkd [--field accuracy]

A bench table pairs every row with its one ``baseline``; this prints any other pair of rows of the
same grid, e.g. stage 2 against stage 1, or a fitted teacher against the cosine-head teacher.
Extra columns: each cell's chosen hyper-parameters named with ``--show KEY`` (``hparams.KEY``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fskd.evaluation.metrics import paired_difference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", help="a bench folder (its results.jsonl) or a results.jsonl file")
    ap.add_argument("a", help="the row (method label) whose gain is measured")
    ap.add_argument("b", help="the row it is paired with")
    ap.add_argument("--field", default="accuracy", help="the metric of the rows [accuracy]")
    ap.add_argument("--show", action="append", default=[], help="an hparams key to print per cell")
    args = ap.parse_args()
    path = Path(args.bench)
    path = path / "results.jsonl" if path.is_dir() else path
    last: dict[str, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            last[row["key"]] = row
    cells: dict[tuple[str, str, int, int], dict] = {
        (r["method"], r["dataset"], r["shots"], r["seed"]): r for r in last.values() if r["status"] == "ok"
    }
    groups = sorted({(d, k) for (m, d, k, _) in cells if m == args.a})
    if not groups:
        raise SystemExit(f"{path}: no finished row named {args.a!r}")
    print(f"| dataset | shots | {args.a} | {args.b} | per seed ({args.a} - {args.b}) | difference, 95% CI (seeds) |")
    print("|---|---|---|---|---|---|")
    for d, k in groups:
        seeds = sorted(s for (m, dd, kk, s) in cells if m == args.a and dd == d and kk == k)
        seeds = [s for s in seeds if (args.b, d, k, s) in cells]
        a = [cells[(args.a, d, k, s)][args.field] for s in seeds]
        b = [cells[(args.b, d, k, s)][args.field] for s in seeds]
        diff = paired_difference([x / 100 for x in a], [x / 100 for x in b], "seeds")
        ci = f" ± {diff['ci95']:.2f}" + (" *" if diff["excludes_zero"] else "") if diff["ci95"] is not None else ""
        per = ", ".join(f"{x - y:+.2f}" for x, y in zip(a, b, strict=True))
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        print(f"| {d} | {k} | {mean(a):.2f} | {mean(b):.2f} | {per} | {diff['difference']:+.2f}{ci} (n={len(seeds)}) |")
        for key in args.show:
            vals = [cells[(m, d, k, s)].get("hparams", {}).get(key) for m in (args.a, args.b) for s in seeds]
            print(f"|  | {key} | {vals[: len(seeds)]} | {vals[len(seeds) :]} |  |  |")


if __name__ == "__main__":
    main()
