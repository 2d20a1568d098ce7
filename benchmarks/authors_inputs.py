"""Export fskd's exact all-way inputs of a method, so that its authors' own code can be run on
them in a scratch folder outside this repository (their code is never committed here), and
fskd's own result on the same inputs, per K and seed.

    python benchmarks/authors_inputs.py --method lp++ --shots 1,4,16 --seeds 1,2,3 --out /tmp/lpp_parity
    python benchmarks/authors_inputs.py --method gda --shots 1,4,16 --seeds 1,2,3 --out /tmp/authors_gda
    python benchmarks/authors_inputs.py --method clap --shots 1,4,16 --seeds 1,2,3 --out /tmp/authors_clap

Writes OUT/inputs_K{K}_s{seed}.npz (x (S, D) support rows in the state's text space, class-major,
y (S,), text (N, D), val / val_truth (the val rows the state's rule chose: CoOp's few-shot rows by
default), test / test_truth, and per method:

- lp++: bias (N,), the nn.Linear(D, N) bias drawn after torch.manual_seed(seed);
- gda: val_full / val_full_truth (the whole val split, as the authors' main_few_shots.py
  validates on it), alpha_grid (their 7 values);
- zs-lp, clap: epochs, lr, batch_size, momentum, warmup_lr, logit_scale (the authors'
  SGD_lr1e-1_B256_ep300 config) and constraint (0 for ZS-LP, 1 for CLAP's l2);
- every method, when the store has augmented views: x_views (V, S, D), each view embedded as x)

plus OUT/fskd_results.json (fskd's test accuracy, fit seconds and hyper-parameters of each) and
OUT/README.txt (what each array is and where the authors' code takes it). The store is cub35
with lite0-minilm (the tests' cached store, made by `make demo` or the tests).
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
    ap.add_argument("--val-rule", default="few-shot", choices=("few-shot", "full"))
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
                                  device="cpu", val_rule=args.val_rule), progress=None)
            fit_s = time.perf_counter() - t0
            ev = api.evaluate(EvalConfig(store=path, state=str(state_dir), protocol="allway", shots=k, seeds=(seed,),
                                         device="cpu"))
            state = load_state(state_dir)
            inp = inputs(store, k, seed, state, args.val_rule)
            ts = inp["space"]
            _, n, kk, d = ts.support.shape
            np.savez(out / f"inputs_K{k}_s{seed}.npz", x=ts.support.reshape(n * kk, d).numpy(),
                     y=torch.arange(n).repeat_interleave(kk).numpy(), text=ts.weights[0].numpy(),
                     val=ts.embed(inp["val"][None])[0].numpy(), val_truth=inp["val_truth"].numpy(),
                     test=ts.embed(inp["test"][None])[0].numpy(), test_truth=inp["test_truth"].numpy(),
                     **method_inputs(args.method, store, k, seed, inp, d, n))
            results[f"K{k}_s{seed}"] = {"accuracy": ev.accuracy, "fit_seconds": round(fit_s, 2),
                                        "hparams": {h: v for h, v in state.hparams.items() if h != "class_split"}}
            print(f"K={k} seed={seed}: fskd {args.method} {ev.accuracy:.3f}% (fit {fit_s:.1f} s)", flush=True)
    (out / "fskd_results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "README.txt").write_text(README.get(args.method, README["lp++"]).format(val_rule=args.val_rule))


def method_inputs(method: str, store, k: int, seed: int, inp: dict, d: int, n: int) -> dict:
    """What the method's authors' code takes beyond the common arrays (see the module docstring)."""
    from fskd.methods.adapt import _common as C
    from fskd.store import sampling

    ts = inp["space"]
    extra = {}
    views, _ = sampling.allway_shot_views(store, k, seed)
    if views is not None:  # (S, V, D) raw -> (V, S, D), each view embedded as the support
        v = torch.from_numpy(views).transpose(0, 1)[None]
        extra["x_views"] = C.embed_views(ts, v)[0].numpy()
    if method in ("lp++", "lp++-tuned"):
        torch.manual_seed(seed)
        extra["bias"] = torch.nn.Linear(d, n).bias.detach().numpy()
    elif method == "gda":
        from fskd.methods.adapt.gda import ALPHA

        xv, yv = C.allway_val_rows(store, inp["classes"][0].numpy(), k, seed, "full")
        pos = np.full(int(inp["classes"].max()) + 1, -1)
        pos[inp["classes"][0].numpy()] = np.arange(n)
        extra.update(val_full=ts.embed(torch.from_numpy(xv)[None])[0].numpy(), val_full_truth=pos[yv],
                     alpha_grid=np.array(ALPHA))
    elif method in ("zs-lp", "clap"):
        from fskd.methods.adapt import clap

        extra.update(epochs=clap.EPOCHS, lr=clap.LR, batch_size=clap.BATCH, momentum=clap.MOMENTUM,
                     warmup_lr=clap.WARMUP_LR, logit_scale=100.0, constraint=int(method == "clap"))
    elif method == "proker":
        from fskd.methods.adapt import proker

        wide = not store.joint
        extra.update(beta_grid=np.array(proker.BETA),
                     lambda_grid=np.array(proker.LAMBDA + (proker.LAMBDA_WIDE if wide else ())))
    elif method == "ape":
        from fskd.methods.adapt import ape

        wide = not store.joint
        extra.update(beta_grid=np.array(ape.BETA), alpha_grid=np.array(ape.ALPHA + (ape.ALPHA_WIDE if wide else ())),
                     gamma_grid=np.array(ape.GAMMA), w_sim=ape.W_SIM,
                     feat_num=ape.n_channels(d, ape.FEAT_FRAC))
    elif method == "taskres":
        from fskd.methods.adapt import taskres

        extra.update(alpha=taskres.ALPHA, lr=taskres.LR, batch_size=taskres.BATCH, weight_decay=taskres.WEIGHT_DECAY,
                     epochs=taskres.FEW_SHOT_EPOCHS if k <= 4 else taskres.MANY_SHOT_EPOCHS, logit_scale=100.0)
    return extra


_COMMON = """x (S, D), y (S,): the support rows (class-major, K per class), L2-normalised in fskd's space
  for this store (lite0-minilm is not a joint store: rows centred on the support mean, then L2;
  text: the class text mapped into image space by fskd's leave-one-class-out bridge, L2-normalised)
text (N, D): the class weights (CLIP's clip_weights.T)
val, val_truth: the val rows the fit chose its hyper-parameters on ({val_rule} rule)
test, test_truth: every test row
x_views (V, S, D), when present: every stored augmented view of the shots, embedded as x
fskd_results.json: fskd's test accuracy (%), fit seconds and hyper-parameters per K and seed
"""
_PROKER = _COMMON + """beta_grid, lambda_grid: the (beta, lambda) candidates fskd searched (beta outer, the first best kept;
  lambda: the authors' linspace(0.001, 1, 10), then 3 ... 10000 on a non-joint store)
"""
_APE = _COMMON + """beta_grid, alpha_grid, gamma_grid: the candidates fskd searched (the authors' loop order beta, alpha,
  gamma; alpha: theirs, then 8 ... 65536 on a non-joint store); w_sim (training_free w), feat_num (channels kept)
"""
_TASKRES = _COMMON + """alpha, lr, batch_size, weight_decay, epochs, logit_scale: the recipe fskd ran (the authors'
  train_regular.sh: Adam, 1-epoch warm-up at 1e-5 then cosine, residual initialised at zeros)
"""
README = {
    "proker": _PROKER, "ape": _APE, "taskres": _TASKRES,
    "lp++": _COMMON + "bias (N,): the nn.Linear(D, N) bias after torch.manual_seed(seed)\n",
    "gda": _COMMON + """val_full, val_full_truth: the whole val split (the authors' main_few_shots.py validates on it)
alpha_grid: the authors' 7 blend weights
Authors' code (mrflogs/ICLR24 main_few_shots.py, run()): vecs = x (or x_views flattened, labels
repeated), labels = y, clip_weights = text.T, val_features = val (or val_full), test_features = test.
""",
    "zs-lp": _COMMON + """epochs, lr, batch_size, momentum, warmup_lr, logit_scale: the authors' SGD_lr1e-1_B256_ep300
constraint: 0 (ZS-LP: INIT ZS, CONSTRAINT none); 1 (CLAP: INIT ZS, CONSTRAINT l2)
Authors' code (jusiro/CLAP trainers/adapters.py): features_train = x (or x_views rows), labels_train
= y, base_text_features = text; no validation data is used; the last epoch's weights score test.
""",
}
README["clap"] = README["zs-lp"]


if __name__ == "__main__":
    main()
