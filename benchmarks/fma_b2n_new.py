"""Where `fma-lite` (`fma --set recipe=lite`) loses new-class accuracy in base-to-new on cub35: a diagnosis.

The base-to-new grid (README) gives `fma-lite` 11.7 ± 4.4 on cub35's new half at 16 shots, below
the 15.5 of every other text method (they reach the new classes through the same kind of ridge
bridge). This fits `fma --set recipe=lite` base-to-new (CoCoOp halves; K shots of the 18 base classes, seeds
1-3, exactly as `fskd bench --protocol base-to-new` does) and scores each state three ways on the
same test rows:

- as fitted (the flow run for the validation-chosen number of steps);
- the same state with the transport switched off (stop = 0): the new classes' text targets through
  fma's own bridge, the ridge fma chose, and no flow;
- `zero-shot` base-to-new with the same K and seed: the adapt methods' bridge.

If the stop-0 column matches zero-shot, the bridge is not the cause and the learned flow is what
costs the new classes; if it is already low, the ridge fma chose is. Test accuracies are printed
for the diagnosis only; nothing here chooses a hyper-parameter on them.

    python benchmarks/fma_b2n_new.py [--store PATH] [--shots 16] [--seeds 1,2,3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cub35_store, machine, table  # noqa: E402

from fskd import api  # noqa: E402
from fskd.config import AdaptConfig, AlignConfig, EvalConfig  # noqa: E402
from fskd.evaluation.metrics import seed_summary  # noqa: E402
from fskd.methods import load_state  # noqa: E402
from fskd.methods.base import save_state  # noqa: E402


def b2n(store: str, state: str, shots: int, seed: int) -> tuple[float, float]:
    r = api.evaluate(
        EvalConfig(store=store, state=state, protocol="base-to-new", shots=shots, seeds=(seed,), device="cpu")
    )
    return r.base, r.new


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--seeds", default="1,2,3")
    args = ap.parse_args()
    t0 = time.perf_counter()
    path = cub35_store(args.store)
    seeds = [int(s) for s in args.seeds.split(",")]
    cols: dict[str, list[float]] = {
        k: [] for k in ("fitted base", "fitted new", "stop 0 base", "stop 0 new", "zero-shot new")
    }
    chosen = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            out = f"{tmp}/fma-{seed}"
            api.align(
                AlignConfig(
                    store=path,
                    method="fma",
                    shots=args.shots,
                    seed=seed,
                    out=out,
                    device="cpu",
                    force=True,
                    base_to_new=True,
                    options={"recipe": "lite", "regime": "allway"},
                ),
                progress=None,
            )
            state = load_state(out)
            hp = state.hparams
            chosen.append(
                f"seed {seed}: {hp['allway.steps']} {hp['allway.solver']} steps, stop {hp['allway.stop']}, "
                f"prototype weight {hp['allway.proto_weight']}, gamma {hp['allway.gamma']}, "
                f"bridge {hp['allway.bridge']}"
            )
            base, new = b2n(path, out, args.shots, seed)
            cols["fitted base"].append(base)
            cols["fitted new"].append(new)
            state.hparams["allway.stop"] = 0  # the same bridge and targets, no transport
            save_state(f"{tmp}/stop0-{seed}", state)
            base, new = b2n(path, f"{tmp}/stop0-{seed}", args.shots, seed)
            cols["stop 0 base"].append(base)
            cols["stop 0 new"].append(new)
            zs = f"{tmp}/zs-{seed}"
            api.adapt(
                AdaptConfig(
                    store=path,
                    method="zero-shot",
                    shots=args.shots,
                    seed=seed,
                    out=zs,
                    device="cpu",
                    force=True,
                    base_to_new=True,
                ),
                progress=None,
            )
            cols["zero-shot new"].append(b2n(path, zs, args.shots, seed)[1])
    rows = []
    for name, vals in cols.items():
        s = seed_summary([v / 100 for v in vals])
        rows.append(
            {
                "cub35 base-to-new": name,
                f"{args.shots}-shot (mean ± std)": f"{s.mean:.2f} ± {s.std:.2f}",
                "per seed": " / ".join(f"{v:.2f}" for v in vals),
            }
        )
    print(table(rows, list(rows[0])))
    print()
    for c in chosen:
        print(f"- {c}")
    print(f"\n{time.perf_counter() - t0:.0f} s; {machine()}")


if __name__ == "__main__":
    main()
