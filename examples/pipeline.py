"""The same pipeline from Python: encode once, evaluate prototypes, fit and evaluate methods.

    python examples/pipeline.py [--data ../shared/data/cub35] [--out runs/example-py] [--shots 4]
"""

from __future__ import annotations

import argparse

from fskd import api
from fskd.config import AdaptConfig, EvalConfig, ExtractConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/cub35")
    ap.add_argument("--out", default="runs/example-py")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--episodes", type=int, default=600)
    args = ap.parse_args()

    store = f"{args.out}/cub35-lite0-minilm.zarr"
    r = api.extract(ExtractConfig(dataset="cub", root=args.data, encoder="lite0-minilm", store=store))
    print(f"store {r.store}: {'reused' if r.reused else f'encoded {r.encoded} images'}")

    for shot in (1, 5):
        e = api.evaluate(EvalConfig(store=store, way=5, shot=shot, episodes=args.episodes))
        print(f"prototype 5-way {shot}-shot novel: {e.accuracy:.2f} ± {e.ci95:.2f}")

    for method in ("zero-shot", "tip-adapter", "syntrans"):
        fit = api.adapt(AdaptConfig(store=store, method=method, shots=args.shots, out=f"{args.out}/{method}",
                                    force=True))  # this script owns its output folder: rerunnable
        one = api.evaluate(EvalConfig(store=store, state=fit.out, way=5, shot=1, episodes=args.episodes))
        allway = api.evaluate(EvalConfig(store=store, state=fit.out, protocol="allway", shot=args.shots))
        print(f"{method:12s} 5-way 1-shot {one.accuracy:.2f} ± {one.ci95:.2f} | "
              f"all-way {args.shots}-shot {allway.accuracy:.2f} ± {allway.std:.2f}  ({fit.seconds:.1f} s to fit)")


if __name__ == "__main__":
    main()
