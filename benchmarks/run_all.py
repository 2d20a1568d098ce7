"""Run every benchmark script in this folder (one after another: timings need a quiet machine)
and collect their Markdown tables into benchmarks/out/results.md.

    python benchmarks/run_all.py [--quick] [--only eval_speed,store_speed]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="pass --quick to every script")
    ap.add_argument("--only", default="", help="comma-separated script names (without .py)")
    args = ap.parse_args()
    only = {s for s in args.only.split(",") if s}
    scripts = [p for p in sorted(HERE.glob("*.py")) if not p.name.startswith("_") and p.name != "run_all.py"]
    scripts = [p for p in scripts if not only or p.stem in only]
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    parts = []
    for script in scripts:
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        status = "ok" if res.returncode == 0 else f"FAILED ({res.returncode})"
        print(f"{script.name}: {status} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        body = res.stdout if res.returncode == 0 else res.stdout + "\n```\n" + res.stderr[-3000:] + "\n```\n"
        parts.append(f"<!-- {' '.join(cmd[1:])} -->\n{body}")
        (out / f"{script.stem}.md").write_text(parts[-1])
        (out / "results.md").write_text("\n\n".join(parts))  # rewritten after each script
    print(f"wrote {out / 'results.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
