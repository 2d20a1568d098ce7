"""How much TransCLIP's result depends on the inductive predictions it is given (its KL term).

    python benchmarks/transclip_yhat.py [--store runs/demo/cub-lite0-minilm.zarr] [--shots 1,4,16] [--seeds 1,2,3]

For each K and seed: the all-way shots of that seed, the store's test rows, and TransCLIP
(``fskd/evaluation/transductive.py`` with its defaults) run on the same features with different
inductive predictions y-hat: uniform (no information), the softmax of the prototypes' cosine at
scale 1, 16 and 100, and a near-oracle (0.9 on the true class); its shot weight chosen on CoOp's
few-shot val rows (min(K, 4) per class, seeded), as ``fskd eval --transductive`` does. A plug-in
on top of a method should follow its predictions: the last column far above the first. Prints a
markdown table: inductive top-1 / TransCLIP top-1 per y-hat, mean over seeds.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from fskd.evaluation.transductive import transclip
from fskd.methods.adapt.regimes import allway_rows
from fskd.store import FeatureStore, sampling


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="runs/demo/cub-lite0-minilm.zarr")
    ap.add_argument("--shots", default="1,4,16")
    ap.add_argument("--seeds", default="1,2,3")
    args = ap.parse_args()
    store = FeatureStore.open(args.store)
    tx = torch.as_tensor(np.asarray(store.features("test"))).float()
    ty = torch.as_tensor(np.asarray(store.labels("test"))).long()
    n = int(ty.max()) + 1
    q = F.normalize(tx, dim=-1)
    names = ["uniform", "prototypes, scale 1", "prototypes, scale 16", "prototypes, scale 100", "near-oracle (0.9)"]
    print(f"{args.store}: {tx.shape[0]} test rows, {tx.shape[1]}-d, {n} classes; inductive / TransCLIP top-1 (%)\n")
    print("| K | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for k in (int(s) for s in args.shots.split(",")):
        acc: dict[str, list[tuple[float, float]]] = {m: [] for m in names}
        for seed in (int(s) for s in args.seeds.split(",")):
            x, y, classes = allway_rows(store, k, seed)
            x, y = torch.as_tensor(np.asarray(x)).float(), torch.as_tensor(np.asarray(y)).long()
            vx, vy = sampling.allway_val(store, classes, k, seed, "few-shot-val")
            vx, vy = torch.as_tensor(np.asarray(vx)).float(), torch.as_tensor(np.asarray(vy)).long()
            protos = F.normalize(torch.stack([x[y == c].mean(0) for c in range(n)]), dim=-1)
            cos = q @ protos.T
            yhats = [
                torch.full((len(q), n), 1.0 / n),
                cos.softmax(-1),
                (16 * cos).softmax(-1),
                (100 * cos).softmax(-1),
                F.one_hot(ty, n).float() * (0.9 - 0.1 / (n - 1)) + 0.1 / (n - 1),
            ]
            for m, yh in zip(names, yhats, strict=True):
                out = transclip(tx, yh, x, y, vx, vy)
                acc[m].append(
                    (100 * float((yh.argmax(1) == ty).float().mean()), 100 * float((out.pred == ty).float().mean()))
                )
        cells = [f"{np.mean([a for a, _ in v]):.1f} / {np.mean([b for _, b in v]):.1f}" for v in acc.values()]
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
