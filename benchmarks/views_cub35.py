"""What augmented views in the store change: tip-adapter, tip-adapter-f and fma-lite (fma's lite
recipe) on cub35 (lite0-minilm) with and without ``fskd extract --augment-views``, all-way, per seed.

The plain store is extracted into the work folder (or given). The views store is a copy of it to which
``fskd extract cub --augment-views V --augment-shots K --augment-seeds 1,2,3`` adds V random
resized crop + flip views of every train row that is one of those seeds' all-way K-shot draws,
so the split features are byte for byte the same and only the views differ. Each method is fitted
per K and seed on both (hyper-parameters on CoOp's few-shot val rows), evaluated on the test
split for its own seed; the table gives both accuracies and the paired difference (views -
plain), mean +- 95% CI over seeds (Student t).

    python benchmarks/views_cub35.py [--shots 1 4] [--views 10] [--methods tip-adapter,...]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import DATA_ROOT, machine, table  # noqa: E402

from fskd import api  # noqa: E402
from fskd.config import AdaptConfig, AlignConfig, EvalConfig, ExtractConfig  # noqa: E402
from fskd.evaluation.metrics import seed_summary  # noqa: E402
from fskd.methods import METHODS  # noqa: E402

METHODS_DEFAULT = ("tip-adapter", "tip-adapter-f", "fma-lite")
#: row label -> (method, options): a method's recipe under the label of the earlier tables
ROWS = {"fma-lite": ("fma", {"recipe": "lite"})}
SEEDS = (1, 2, 3)


def ci(values) -> str:
    s = seed_summary(np.asarray(values, dtype=float) / 100)
    return f"{s.mean:+.2f}" if s.ci95 is None else f"{s.mean:+.2f} ± {s.ci95:.2f}"


def mean(values) -> str:
    s = seed_summary(np.asarray(values, dtype=float) / 100)
    return f"{s.mean:.2f}" if s.ci95 is None else f"{s.mean:.2f} ± {s.ci95:.2f}"


def fit_eval(method: str, store: str, shots: int, seed: int, out: str) -> tuple[float, int]:
    """Test accuracy (percent) of a state fitted on ``store`` for (shots, seed), and its views count."""
    method, options = ROWS.get(method, (method, {}))
    kind = METHODS.get(method).kind
    Cfg, run = (AlignConfig, api.align) if kind == "align" else (AdaptConfig, api.adapt)
    r = run(Cfg(store=store, method=method, shots=shots, seed=seed, out=out, force=True, options=options))
    from fskd.methods import load_state

    hp = load_state(r.out).hparams
    views = int(hp.get("allway.views", 0))
    e = api.evaluate(EvalConfig(store=store, state=r.out, protocol="allway", shots=shots, seeds=(seed,)))
    return e.accuracy, views


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--store",
        default=None,
        help="a plain cub35 lite0-minilm store extracted from --data (default: extracted into the work folder)",
    )
    ap.add_argument("--data", default=str(Path(DATA_ROOT) / "cub35"), help="the cub35 images")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--views", type=int, default=10, help="views per row (Tip-Adapter's cache: 10 augmented epochs)")
    ap.add_argument("--methods", default=",".join(METHODS_DEFAULT))
    ap.add_argument("--workdir", default=None, help="where the views store is built (default: a temporary folder)")
    args = ap.parse_args()
    methods = args.methods.split(",")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        plain = args.store or str(work / "cub35-plain.zarr")
        base = dict(dataset="cub", root=args.data, encoder="lite0-minilm")
        api.extract(ExtractConfig(**base, store=plain))
        views = work / "cub35-views.zarr"
        if not views.exists():
            shutil.copytree(plain, views)
        t1 = time.perf_counter()
        r = api.extract(
            ExtractConfig(
                **base,
                store=str(views),
                augment_views=args.views,
                augment_shots=max(args.shots),
                augment_seeds=tuple(args.seeds),
            )
        )
        extract_s = time.perf_counter() - t1
        acc: dict[tuple[str, int, str], list[float]] = {}
        used: dict[tuple[str, int], set] = {}
        for k in args.shots:
            for s in args.seeds:
                for m in methods:
                    for name, store in (("plain", plain), ("views", str(views))):
                        a, v = fit_eval(m, store, k, s, str(work / f"{m}-{k}-{s}-{name}"))
                        acc.setdefault((m, k, name), []).append(a)
                        if name == "views":
                            used.setdefault((m, k), set()).add(v)
    rows = []
    for m in methods:
        for k in args.shots:
            p, v = acc[(m, k, "plain")], acc[(m, k, "views")]
            rows.append(
                {
                    "method": m,
                    "shots": k,
                    "views used": ",".join(map(str, sorted(used[(m, k)]))),
                    "one feature per shot": mean(p),
                    "with views": mean(v),
                    "views - plain": ci(np.subtract(v, p)),
                    "per seed (views - plain)": " / ".join(f"{d:+.2f}" for d in np.subtract(v, p)),
                }
            )
    cols = [
        "method",
        "shots",
        "views used",
        "one feature per shot",
        "with views",
        "views - plain",
        "per seed (views - plain)",
    ]
    print(f"## Augmented views on cub35 (lite0-minilm), all-way test accuracy, seeds {args.seeds}\n")
    print(table(rows, cols))
    print(
        f"\nviews: {r.views_encoded} encoded for {r.views_rows} train rows in {extract_s:.0f} s "
        f"(--augment-views {args.views} --augment-shots {max(args.shots)} --augment-seeds "
        f"{','.join(map(str, args.seeds))}, crop scale 0.5-1); total {time.perf_counter() - t0:.0f} s; {machine()}"
    )


if __name__ == "__main__":
    main()
