"""One CoOp epoch from the store's cached image features against the same epoch with the image
encoder run on the images (what CoOp's own code does every step), measured in one run on cub35
(lite0-minilm), all-way 4 shots of seed 1 (140 photos, 4 steps of 32). Both sides run the same
text-tower steps (through the base classes' bridge) on the same batches; the second also reads, decodes, preprocesses and encodes
the batch's photos (no gradient: the image tower is frozen in CoOp too).

    python benchmarks/coop_speed.py [--store PATH] [--shots 4] [--repeat 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from _common import ROOT, cub35_store, machine, table
    from PIL import Image

    from fskd.encoders import build_encoder
    from fskd.methods.adapt.coop import CoOpOptions, PromptLearner, lr_at
    from fskd.methods.bridge import bridge_for_store
    from fskd.store import FeatureStore, sampling

    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=None)
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    store = FeatureStore.open(cub35_store(args.store, Path(args.data_root)))
    enc = build_encoder(store.encoder_spec)
    tower = enc.prompt_tower()
    lab = store.labels("train")
    valid = np.flatnonzero(lab >= 0)
    classes = np.unique(lab[valid])
    rows = valid[sampling.sample_shots(lab[valid], classes, args.shots, 1).reshape(-1)]
    y = torch.from_numpy(np.searchsorted(classes, lab[rows]))
    bridge = bridge_for_store(store)  # the offline pair's text reaches image space through it (identity for CLIP)
    x = bridge.embed_images(torch.from_numpy(store.gather(None, ["train"])[0][np.searchsorted(valid, rows)]))
    root = Path(store.attrs["dataset"]["root"])
    paths = [root / p for p in store.sample_ids("train")[rows]]
    opts = CoOpOptions()
    idx = torch.arange(len(classes))

    def epoch(from_images: bool) -> float:
        learner = PromptLearner(tower, store.class_names, None, "", False, "end", seed=1)
        opt = torch.optim.SGD([learner.ctx], lr=lr_at(1, opts, 100), momentum=0.9, weight_decay=5e-4)
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(1))
        t0 = time.perf_counter()
        for i in range(0, (len(rows) // 32) * 32, 32):
            b = perm[i : i + 32]
            if from_images:
                with torch.no_grad():
                    imgs = torch.stack([enc.preprocess(Image.open(paths[j]).convert("RGB")) for j in b.tolist()])
                    xb = bridge.embed_images(enc.encode_images(imgs).float())
            else:
                xb = x[b]
            loss = F.cross_entropy(100.0 * xb @ bridge.text_to_image(learner.text(idx)).T, y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    res = {}
    for name, flag in (("cached features (fskd)", False), ("image encoder every step", True)):
        res[name] = min(epoch(flag) for _ in range(args.repeat))
    base = res["cached features (fskd)"]
    out = [{"epoch": k, "seconds": f"{v:.2f}", "x cached": f"{v / base:.2f}"} for k, v in res.items()]
    print(
        f"CoOp, one epoch: cub35 lite0-minilm, {len(classes)} classes x {args.shots} shots, "
        f"{(len(rows) // 32)} steps of 32; best of {args.repeat}; {machine()}"
    )
    print(table(out, ["epoch", "seconds", "x cached"]))


if __name__ == "__main__":
    main()
