"""Start-up time of the command line: each command's wall time next to ``python -c pass`` and
``python -c "import torch"``, all measured in this run (best of ``--repeat`` fresh interpreters).

The listings, ``--help`` and ``fskd info`` import no torch; ``fskd eval`` imports torch but no
image-model library (tests/test_cli_startup.py asserts which modules each command loads).

    python benchmarks/cli_startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table  # noqa: E402

PY = [sys.executable]
FSKD = [sys.executable, "-m", "fskd"]


def wall(cmd: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        best = min(best, time.perf_counter() - t0)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="best of 2")
    args = ap.parse_args()
    if args.quick:
        args.repeat = 2
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [*PY, "-c", f"from fskd.store.synthetic import make_synthetic_store as m; m({tmp!r} + '/s.zarr')"],
            check=True,
        )
        store = f"{tmp}/s.zarr"
        cases = [
            ("python -c pass", [*PY, "-c", "pass"]),
            ('python -c "import torch"', [*PY, "-c", "import torch"]),
            ("fskd --help", [*FSKD, "--help"]),
            ("fskd --version", [*FSKD, "--version"]),
            ("fskd datasets", [*FSKD, "datasets"]),
            ("fskd encoders", [*FSKD, "encoders"]),
            ("fskd classifiers", [*FSKD, "classifiers"]),
            ("fskd methods", [*FSKD, "methods"]),
            ("fskd eval --help", [*FSKD, "eval", "--help"]),
            ("fskd info STORE", [*FSKD, "info", store]),
            ("fskd eval STORE (20 episodes)", [*FSKD, "eval", "--store", store, "--shots", "1", "--episodes", "20"]),
        ]
        rows, base = [], None
        for name, cmd in cases:
            t = wall(cmd, args.repeat)
            base = base or t
            rows.append({"command": name, "wall s": f"{t:.2f}", "x python -c pass": f"{t / base:.1f}"})
    print(f"best of {args.repeat} fresh interpreters each, {sys.executable}")
    print(table(rows, ["command", "wall s", "x python -c pass"]))


if __name__ == "__main__":
    main()
