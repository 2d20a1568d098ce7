"""Export fskd's exact TransCLIP inputs and outputs, so that the TransCLIP authors' own solver
(MaxZanella/transduction-for-vlms, AGPL-3.0) can be run on them in a scratch folder outside this
repository by a session that has not read fskd's code (their code is never read for, nor
committed to, fskd), per K and seed.

    python benchmarks/authors_inputs_transclip.py --shots 1,4,16 --seeds 1,2,3 --out /tmp/authors_transclip

On cub35 (the tests' cached ``lite0-minilm`` store): the all-way shots of each seed, every test
row, and a classifier the authors' solver can compute its inductive predictions from: class
prototypes P (the L2-normalised mean of each class's L2-normalised shots), standing in for CLIP's
text prototypes, with ``yhat = softmax(100 * normalise(test) @ P^T)``, and the val rows that
choose TransCLIP's shot weight (CoOp's few-shot rule, fskd's default: min(K, 4) per class, seeded;
the authors' val set is the same count). fskd's TransCLIP
(``fskd.evaluation.transductive.transclip``, its defaults) runs on exactly these arrays with that
``yhat`` and, to see how much the result depends on it, with a near-oracle ``yhat_oracle`` (0.9 on
the true class, the rest spread evenly).

Writes OUT/inputs_K{K}_s{seed}.npz:
  support_x (S, D), support_y (S,)  the shots (raw store features; labels 0..N-1, class-major)
  test_x (M, D), test_y (M,)        every test row (raw) and its label
  val_x (V, D), val_y (V,)          the val rows (raw) and their labels
  prototypes (N, D)                 P above
  logit_scale                       100
  yhat (M, N), yhat_oracle (M, N)   the inductive predictions fskd was given
  fskd_pred (M,), fskd_pred_oracle (M,)   fskd's transductive predictions with each (at the
                                    shot weight the val rows chose)
  fskd_pred_last (M,)               fskd's with yhat after the last shot weight (no val rows)
  fskd_shot_weight, fskd_val_accuracy   the chosen shot weight and the val accuracy after each
plus OUT/fskd_results.json (accuracies, fskd's TransCLIP defaults) and OUT/README.txt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import cub35_store  # noqa: E402

from fskd.evaluation import transductive as T  # noqa: E402
from fskd.methods.adapt.regimes import allway_rows  # noqa: E402
from fskd.store import FeatureStore, sampling  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shots", default="1,4,16")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--out", required=True)
    ap.add_argument("--store", default=None, help="the cub35 lite0-minilm store (default: the tests' cached one)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = FeatureStore.open(cub35_store(args.store))
    tx = torch.as_tensor(np.asarray(store.features("test"))).float()
    ty_store = np.asarray(store.labels("test"))
    results = {
        "defaults": {
            "knn": T.KNN,
            "lambda_few_shot": T.LAMBDA_FEW_SHOT,
            "likelihood_weight": T.LIKELIHOOD_WEIGHT,
            "shot_mass": T.SHOT_MASS,
            "shot_weights": list(T.SHOT_WEIGHTS),
            "z_steps": T.Z_STEPS,
            "z_iters": T.Z_ITERS,
        }
    }
    for k in map(int, args.shots.split(",")):
        for seed in map(int, args.seeds.split(",")):
            x, y_store, classes = allway_rows(store, k, seed)
            pos = np.full(int(max(classes.max(), ty_store.max())) + 1, -1)
            pos[classes] = np.arange(len(classes))
            sx = torch.as_tensor(np.asarray(x)).float()
            sy = torch.as_tensor(pos[np.asarray(y_store)]).long()
            ty = torch.as_tensor(pos[ty_store]).long()
            n = len(classes)
            protos = F.normalize(torch.stack([F.normalize(sx[sy == c], dim=-1).mean(0) for c in range(n)]), dim=-1)
            yhat = (100 * F.normalize(tx, dim=-1) @ protos.T).softmax(-1)
            oracle = F.one_hot(ty, n).float() * (0.9 - 0.1 / (n - 1)) + 0.1 / (n - 1)
            vx_np, vy_store = sampling.allway_val(store, classes, k, seed, "few-shot-val")
            vx = torch.as_tensor(np.asarray(vx_np)).float()
            vy = torch.as_tensor(pos[np.asarray(vy_store)]).long()
            t0 = time.perf_counter()
            res = T.transclip(tx, yhat, sx, sy, vx, vy)
            secs = time.perf_counter() - t0
            pred = res.pred
            pred_last = T.transclip(tx, yhat, sx, sy).pred
            pred_oracle = T.transclip(tx, oracle, sx, sy, vx, vy).pred
            np.savez(
                out / f"inputs_K{k}_s{seed}.npz",
                support_x=sx.numpy(),
                support_y=sy.numpy(),
                test_x=tx.numpy(),
                test_y=ty.numpy(),
                val_x=vx.numpy(),
                val_y=vy.numpy(),
                prototypes=protos.numpy(),
                logit_scale=100.0,
                yhat=yhat.numpy(),
                yhat_oracle=oracle.numpy(),
                fskd_pred=pred.numpy(),
                fskd_pred_oracle=pred_oracle.numpy(),
                fskd_pred_last=pred_last.numpy(),
                fskd_shot_weight=res.shot_weight,
                fskd_val_accuracy=np.asarray(res.val_accuracy),
            )
            acc = {
                "inductive": round(100 * float((yhat.argmax(1) == ty).float().mean()), 3),
                "transclip": round(100 * float((pred == ty).float().mean()), 3),
                "transclip_oracle_yhat": round(100 * float((pred_oracle == ty).float().mean()), 3),
                "transclip_last_shot_weight": round(100 * float((pred_last == ty).float().mean()), 3),
                "shot_weight": res.shot_weight,
                "val_accuracy": [round(100 * a, 2) for a in res.val_accuracy],
                "seconds": round(secs, 3),
            }
            results[f"K{k}_s{seed}"] = acc
            print(f"K={k} seed={seed}: {acc}", flush=True)
    (out / "fskd_results.json").write_text(json.dumps(results, indent=1))
    (out / "README.txt").write_text(README)


README = """fskd's TransCLIP inputs (few-shot setting) on cub35 lite0-minilm (not a CLIP store: its image
features are 1280-d, its 'text' here is the shots' class prototypes).

support_x (S, D), support_y (S,): the labelled shots (raw features, labels 0..N-1, class-major)
val_x (V, D), val_y (V,): the val rows that choose the shot weight (min(K, 4) per class, seeded)
test_x (M, D), test_y (M,): the unlabelled query set (every test row) and its labels (for scoring only)
prototypes (N, D): L2-normalised class prototypes; the inductive (zero-shot-like) predictions are
  yhat = softmax(logit_scale * normalise(test_x) @ prototypes.T), logit_scale = 100: give the
  authors' solver `prototypes` where it takes CLIP's text prototypes (clip_prototypes)
yhat_oracle (M, N): a near-oracle inductive prediction (0.9 on the true class): run the solver a
  second time with it in place of its own y_hat, to see how much the result follows y_hat
fskd_pred, fskd_pred_oracle (M,): fskd's transductive predictions with yhat and with yhat_oracle,
  each at the shot weight its val accuracy chose (the earliest on ties)
fskd_pred_last (M,): fskd's with yhat after the last shot weight (what the solver's z is at the end)
fskd_shot_weight, fskd_val_accuracy: the chosen shot weight and the val accuracy after each
fskd_results.json: fskd's accuracies (inductive, TransCLIP with yhat, with yhat_oracle) and defaults
"""

if __name__ == "__main__":
    main()
