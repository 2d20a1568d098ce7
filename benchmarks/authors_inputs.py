"""Export fskd's exact all-way inputs of a method, so that its authors' own code can be run on
them in a scratch folder outside this repository (their code is never committed here), and
fskd's own result on the same inputs, per K and seed.

    python benchmarks/authors_inputs.py --method lp++ --shots 1,4,16 --seeds 1,2,3 --out /tmp/lpp_parity

Writes OUT/inputs_K{K}_s{seed}.npz (x (S, D) support rows in the state's text space, y (S,),
text (N, D), val / val_truth (CoOp's few-shot val rows), test / test_truth, bias (N,): the
nn.Linear(D, N) bias drawn after torch.manual_seed(seed)) and OUT/fskd_results.json (fskd's
test accuracy, fit seconds and hyper-parameters of each). The store is cub35 with lite0-minilm
(the tests' cached store, made by `make demo` or the tests).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import cub35_store  # noqa: E402
from parity import inputs  # noqa: E402 - the inputs parity.py's re-derivations use

from fskd import api  # noqa: E402
from fskd.config import AdaptConfig, EvalConfig  # noqa: E402
from fskd.methods import load_state  # noqa: E402
from fskd.store import FeatureStore  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="lp++")
    ap.add_argument("--shots", default="1,4,16")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = cub35_store()
    store = FeatureStore.open(path)
    results = {}
    for k in map(int, args.shots.split(",")):
        for seed in map(int, args.seeds.split(",")):
            state_dir = out / f"state_K{k}_s{seed}"
            t0 = time.perf_counter()
            api.adapt(AdaptConfig(store=path, method=args.method, shots=k, seed=seed, out=str(state_dir), force=True,
                                  device="cpu"), progress=None)
            fit_s = time.perf_counter() - t0
            ev = api.evaluate(EvalConfig(store=path, state=str(state_dir), protocol="allway", shots=k, seeds=(seed,),
                                         device="cpu"))
            state = load_state(state_dir)
            inp = inputs(store, k, seed, state)
            ts = inp["space"]
            _, n, kk, d = ts.support.shape
            torch.manual_seed(seed)
            bias = torch.nn.Linear(d, n).bias.detach()
            np.savez(out / f"inputs_K{k}_s{seed}.npz", x=ts.support.reshape(n * kk, d).numpy(),
                     y=torch.arange(n).repeat_interleave(kk).numpy(), text=ts.weights[0].numpy(),
                     val=ts.embed(inp["val"][None])[0].numpy(), val_truth=inp["val_truth"].numpy(),
                     test=ts.embed(inp["test"][None])[0].numpy(), test_truth=inp["test_truth"].numpy(),
                     bias=bias.numpy())
            results[f"K{k}_s{seed}"] = {"accuracy": ev.accuracy, "fit_seconds": round(fit_s, 2),
                                        "hparams": {h: v for h, v in state.hparams.items() if h != "class_split"}}
            print(f"K={k} seed={seed}: fskd {args.method} {ev.accuracy:.3f}% (fit {fit_s:.1f} s)", flush=True)
    (out / "fskd_results.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
