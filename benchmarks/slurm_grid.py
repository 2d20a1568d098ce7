"""One grid through a one-node Slurm cluster against the same grid run locally, in one run: the
tables must be equal byte for byte; the wall times, and the scheduling overhead per cell.

    python benchmarks/slurm_grid.py                      # the grid of benchmarks/grid_slurm.toml
    python benchmarks/slurm_grid.py --cells-per-job 1,10

Starts the tests' one-node cluster (tests/slurm_cluster.py: slurmctld, slurmd and munge on
127.0.0.1 in a temporary folder; needs root and `bash .ci/install-slurm`). The Slurm runs ask for
every CPU of the node per job (--slurm cpus=N), so one job runs at a time, as the local run runs
one cell at a time with the same torch threads: the difference of the wall times is what Slurm
and a job's start (a fresh Python importing torch and fskd, opening the stores) cost. Overhead per
cell = (Slurm wall - local wall) / cells.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, machine, table  # noqa: E402

sys.path.insert(0, str(ROOT))
from fskd import api  # noqa: E402
from fskd.config import BenchConfig  # noqa: E402
from tests.slurm_cluster import SlurmCluster, slurm_available  # noqa: E402

OUTPUTS = ("table.md", "table.csv", "table.tex")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", default=str(ROOT / "benchmarks" / "grid_slurm.toml"))
    ap.add_argument("--cells-per-job", default="1,10", help="comma-separated: one Slurm run per value")
    ap.add_argument("--out", default=str(ROOT / "runs" / "slurm-grid"))
    args = ap.parse_args()
    why = slurm_available()
    if why:
        raise SystemExit(f"Slurm cannot start here: {why} (bash .ci/install-slurm, as root)")
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    grid = api.load_grid(args.grid)
    grid.pop("out", None)
    t0 = time.perf_counter()
    local = api.bench(BenchConfig.from_dict({**grid, "out": str(out / "local")}), progress=None)
    rows = [
        {
            "executor": "local",
            "cells per job": "-",
            "jobs": "-",
            "cells": local.cells,
            "wall s": f"{local.seconds:.1f}",
            "overhead per cell s": "-",
            "tables equal": "-",
        }
    ]
    cpus = os.cpu_count()
    with SlurmCluster(out / "cluster") as cluster:
        os.environ.update(cluster.env)
        os.environ["FSKD_SLURM_POLL"] = "0.5"
        cpus = cluster.cores
        for n in (int(x) for x in args.cells_per_job.split(",")):
            d = out / f"slurm-{n}"
            r = api.bench(
                BenchConfig.from_dict(
                    {
                        **grid,
                        "out": str(d),
                        "executor": "slurm",
                        "cells_per_job": n,
                        "slurm": {"cpus": cpus, "time": 60},
                    }
                ),
                progress=None,
            )
            same = all((d / f).read_bytes() == (out / "local" / f).read_bytes() for f in OUTPUTS)
            rows.append(
                {
                    "executor": "slurm",
                    "cells per job": n,
                    "jobs": r.counts["jobs"],
                    "cells": r.cells,
                    "wall s": f"{r.seconds:.1f}",
                    "overhead per cell s": f"{(r.seconds - local.seconds) / r.cells:.2f}",
                    "tables equal": "yes" if same else "NO",
                }
            )
            if r.failed:
                raise SystemExit(f"failed cells: {r.failed[:3]}")
    res = [json.loads(x) for x in (out / "local" / "results.jsonl").read_text().splitlines()]
    fit = sum(x.get("fit_seconds", 0) + x.get("eval_seconds", 0) for x in res if x["status"] == "ok")
    print(
        f"# fskd bench: {args.grid} ({local.cells} cells: {', '.join(grid['methods'])} on "
        f"{len(grid['stores'])} stores x shots {grid['shots']} x seeds {grid['seeds']}), locally and through a "
        f"one-node Slurm cluster (Slurm 22.05, every job asks for all {cpus} CPUs, so one job at a time); "
        f"{machine()}; {time.perf_counter() - t0:.0f} s in all\n"
    )
    print(table(rows, ["executor", "cells per job", "jobs", "cells", "wall s", "overhead per cell s", "tables equal"]))
    print(
        f"\nfit + eval seconds summed over the local run's cells: {fit:.1f} s (the rest of its wall time opens "
        f"stores, writes rows and builds the tables)"
    )
    if not all(r["tables equal"] in ("yes", "-") for r in rows):
        raise SystemExit("the tables differ")


if __name__ == "__main__":
    main()
