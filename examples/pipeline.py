"""The same pipeline from Python: encode once, evaluate prototypes, fit and evaluate methods.

    python examples/pipeline.py [--data ../shared/data/cub35] [--out runs/example-py] [--shots 4]

The store defaults to the one `make demo` writes (same inputs: it is reused, not re-encoded).
Each method is fitted once per seed and evaluated with that seed (the all-way protocol).
"""

from __future__ import annotations

import argparse

from fskd import api
from fskd.config import AdaptConfig, EvalConfig, ExtractConfig
from fskd.evaluation.metrics import seed_summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/cub35")
    ap.add_argument("--out", default="runs/example-py")
    ap.add_argument("--store", default="runs/demo/cub-lite0-minilm.zarr")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--episodes", type=int, default=600)
    args = ap.parse_args()

    store = args.store
    r = api.extract(ExtractConfig(dataset="cub", root=args.data, encoder="lite0-minilm", store=store))
    print(f"store {r.store}: {'reused' if r.reused else f'encoded {r.encoded} images'}")

    for shot in (1, 5):
        e = api.evaluate(EvalConfig(store=store, way=5, shots=shot, episodes=args.episodes))
        print(f"prototype 5-way {shot}-shot novel: {e.accuracy:.2f} ± {e.ci95:.2f}")

    for method in ("zero-shot", "tip-adapter", "syntrans"):
        per_seed, fit = [], None
        for seed in (1, 2, 3):  # one state per seed, each evaluated with its own seed
            fit = api.adapt(
                AdaptConfig(
                    store=store,
                    method=method,
                    shots=args.shots,
                    seed=seed,
                    out=f"{args.out}/{method}-seed{seed}",
                    force=True,
                )
            )  # rerunnable
            per_seed.append(
                api.evaluate(
                    EvalConfig(store=store, state=fit.out, protocol="allway", shots=args.shots, seeds=(seed,))
                ).accuracy
                / 100
            )
        one = api.evaluate(EvalConfig(store=store, state=fit.out, way=5, shots=1, episodes=args.episodes))
        s = seed_summary(per_seed)
        print(
            f"{method:12s} 5-way 1-shot {one.accuracy:.2f} ± {one.ci95:.2f} | all-way {args.shots}-shot "
            f"{s.mean:.2f} ± {s.ci95:.2f} (95% CI, Student t over 3 seeds)  ({fit.seconds:.1f} s to fit)"
        )


if __name__ == "__main__":
    main()
