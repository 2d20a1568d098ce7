"""FMA on cub35 (lite0-minilm, through the bridge) against zero-shot, linear-probe-tuned (the
linear probe's tuned recipe) and residual-adapter, at 1/4/16 shots, through ``fskd.api`` (adapt / align / evaluate).

All-way protocol (35 classes, the full test split): for each seed s every method is fitted with
``--seed s`` (so its K shots are the ones evaluation seed s draws) and evaluated with seed s
alone: one state never sees another seed's shots. Mean over seeds with a 95% CI (Student t).
Episodic protocol (5-way K-shot on the 8 novel classes, 600 episodes, 95% CI): fma in its
episodic regime (field on the base classes, steps chosen on val-class episodes).

Also: fma on the residual adapter's features (``--base-state``), and the fit time of fma at
16 shots x 35 classes as a ratio to the linear probe's, measured in the same run.

    python benchmarks/align_cub35.py [--quick] [--store PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cub35_store, machine, table  # noqa: E402

from fskd import api  # noqa: E402
from fskd.config import AdaptConfig, AlignConfig, EvalConfig  # noqa: E402
from fskd.evaluation.metrics import seed_summary  # noqa: E402
from fskd.methods import METHODS  # noqa: E402

#: the all-way validation rows of the README tables made with this script: the full val split (the
#: default before CoOp's min(K, 4) rule); `fskd bench` uses the CoOp rule. Issue 15 regenerates them.
HP_SELECTION = "full-val"

ROOT = Path(__file__).resolve().parents[1]
ADAPT = ("zero-shot", "linear-probe-tuned", "residual-adapter")
#: row label -> (method, options): a method's recipe under the label of the earlier tables
ROWS = {"linear-probe-tuned": ("linear-probe", {"recipe": "tuned"}), "fma-lite": ("fma", {"recipe": "lite"})}


def ci(values: list[float]) -> str:
    """Mean ± 95% CI by Student t over seeds, computed by fskd (percent values in)."""
    s = seed_summary(np.asarray(values, dtype=float) / 100)
    return f"{s.mean:.1f}" if s.ci95 is None else f"{s.mean:.1f} ± {s.ci95:.1f}"


def fit(row: str, store: str, shots: int, seed: int, out: str, **extra) -> tuple[str, float]:
    t0 = time.perf_counter()
    method, options = ROWS.get(row, (row, {}))
    extra["options"] = {**options, **extra.get("options", {})}
    if METHODS.get(method).kind == "align":
        r = api.align(
            AlignConfig(
                store=store,
                method=method,
                shots=shots,
                seed=seed,
                out=out,
                force=True,
                hp_selection=HP_SELECTION,
                **extra,
            )
        )
    else:
        r = api.adapt(
            AdaptConfig(
                store=store,
                method=method,
                shots=shots,
                seed=seed,
                out=out,
                force=True,
                hp_selection=HP_SELECTION,
                **extra,
            )
        )
    return r.out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 shots, seed 1, 100 episodes, no fma on adapter features")
    ap.add_argument(
        "--store", default=None, help="cub35 lite0-minilm store (default: the test cache, built if missing)"
    )
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument(
        "--align",
        default="fma-lite",
        help="the fma row: fma-lite (fma --set recipe=lite) or fma (the "
        "published recipe, about 6 / 15 / 60 min per fit at 1 / 4 / 16 shots on 2 CPU cores)",
    )
    args = ap.parse_args()
    if args.quick:
        args.shots, args.seeds, args.episodes = [4], [1], 100
    store = cub35_store(args.store)
    t_start = time.perf_counter()
    missing = [m for m in ADAPT if ROWS.get(m, (m,))[0] not in METHODS]
    for m in missing:
        print(f"note: adapt method {m!r} is not registered in this checkout; its rows are skipped", file=sys.stderr)
    fma = args.align
    methods = [m for m in ADAPT if m not in missing] + [fma]
    on_adapter = "residual-adapter" in METHODS and not args.quick
    allway: dict[tuple[str, int], list[float]] = {}
    episodic: dict[tuple[str, int], tuple[float, float]] = {}
    fit_s: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as d:
        for k in args.shots:
            for s in args.seeds:
                states = {}
                for m in methods:
                    states[m], sec = fit(m, store, k, s, f"{d}/{m}-{k}-{s}")
                    fit_s.setdefault((m, k), []).append(sec)
                if on_adapter:
                    states[f"{fma} on residual-adapter"], sec = fit(
                        fma, store, k, s, f"{d}/fma-ra-{k}-{s}", base_state=states["residual-adapter"]
                    )
                    fit_s.setdefault((f"{fma} on residual-adapter", k), []).append(sec)
                for m, out in states.items():
                    r = api.evaluate(EvalConfig(store=store, state=out, protocol="allway", shots=k, seeds=(s,)))
                    allway.setdefault((m, k), []).append(r.accuracy)
            # episodic: adapt states serve both protocols; fma needs its episodic regime
            for m in methods:
                extra = {"options": {"regime": "episodic"}} if m == fma else {}
                out, _ = fit(m, store, k, args.seeds[0], f"{d}/{m}-{k}-episodic", **extra)
                r = api.evaluate(
                    EvalConfig(store=store, state=out, way=5, shots=k, query=15, episodes=args.episodes, seed=0)
                )  # the episode seed of the README tables
                episodic[(m, k)] = (r.accuracy, r.ci95)
    names = list(dict.fromkeys(m for m, _ in allway))
    rows = []
    for m in names:
        row = {"method": m}
        for k in args.shots:
            row[f"all-way {k}-shot"] = ci(allway[(m, k)])
            if (m, k) in episodic:
                a, c = episodic[(m, k)]
                row[f"5-way {k}-shot novel"] = f"{a:.1f} ± {c:.1f}"
        rows.append(row)
    cols = ["method"] + [f"all-way {k}-shot" for k in args.shots] + [f"5-way {k}-shot novel" for k in args.shots]
    print(
        f"## {fma} on cub35 (lite0-minilm, not a joint space: text through the bridge)\n\n"
        f"All-way: 35 classes, K train shots per class, the 797 test rows; each method fitted per seed (seeds "
        f"{args.seeds}) and evaluated on that seed; mean ± 95% CI (Student t over seeds). Episodic: 5-way K-shot "
        f"15-query, {args.episodes} episodes on the 8 novel classes (seed 0), mean ± 95% CI; {fma} in its episodic "
        f"regime (field on the 18 base classes), adapt methods from their own states (fit seed {args.seeds[0]}). "
        f"Hyper-parameters of every method chosen on the val split (all-way) or val-class episodes (episodic). "
        f"{machine()}.\n"
    )
    print(table(rows, cols))
    k_max = max(args.shots)
    base = "linear-probe-tuned" if ("linear-probe-tuned", k_max) in fit_s else methods[0]
    speed = [
        {
            "method": m,
            f"fit s at {k_max} shots x 35 classes": f"{np.mean(fit_s[(m, k_max)]):.1f}",
            f"ratio to {base}": f"{np.mean(fit_s[(m, k_max)]) / np.mean(fit_s[(base, k_max)]):.1f}x",
        }
        for m in list(dict.fromkeys(m for m, _ in fit_s))
        if (m, k_max) in fit_s
    ]
    print("\nFit time (mean over seeds, all-way states, this machine under its current load):\n")
    print(table(speed, ["method", f"fit s at {k_max} shots x 35 classes", f"ratio to {base}"]))
    print(
        f"\nCommand: `python benchmarks/align_cub35.py{' --quick' if args.quick else ''}"
        f"{'' if fma == 'fma-lite' else ' --align ' + fma}`; "
        f"total {time.perf_counter() - t_start:.0f} s."
    )


if __name__ == "__main__":
    main()
