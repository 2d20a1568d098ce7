"""Episodic evaluation speed: fskd's batched episodes vs a plain per-episode loop, same run.

600 episodes, 5-way 1-shot 15-query, over a 10,000 x 512 store (100 classes x 100 rows).
The baseline samples and scores one episode at a time in numpy (the easyfsl-style loop).

    python benchmarks/eval_speed.py [--episodes 600]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_of, machine, table  # noqa: E402

from fskd import api  # noqa: E402
from fskd.classifiers.prototype import PrototypeHead  # noqa: E402
from fskd.config import EvalConfig  # noqa: E402
from fskd.protocols.episodic import run_episodes, sample_episodes  # noqa: E402
from fskd.store import FeatureStore  # noqa: E402


def per_episode_loop(feats: np.ndarray, labels: np.ndarray, classes: np.ndarray, episodes: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    by_class = {c: np.flatnonzero(labels == c) for c in classes}
    accs = []
    for _ in range(episodes):
        chosen = rng.choice(classes, 5, replace=False)
        protos, queries = [], []
        for c in chosen:
            rows = rng.choice(by_class[c], 16, replace=False)
            protos.append(feats[rows[:1]].mean(0))
            queries.append(feats[rows[1:]])
        p = np.stack(protos)
        p /= np.linalg.norm(p, axis=1, keepdims=True)
        q = np.concatenate(queries)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        accs.append(((q @ p.T).argmax(1) == np.repeat(np.arange(5), 15)).mean())
    return float(np.mean(accs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    n_cls, per = 100, 100
    labels = np.repeat(np.arange(n_cls), per)
    feats = (rng.normal(size=(n_cls, 512))[labels] * 0.6 + rng.normal(size=(len(labels), 512))).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.zarr"
        FeatureStore.from_arrays(
            path,
            {"test": (feats, labels)},
            [f"c{i}" for i in range(n_cls)],
            {"base": [], "val": [], "novel": list(range(n_cls))},
            dtype="float16",
            chunk_rows=2048,
        )
        cfg = EvalConfig(store=str(path), way=5, shots=1, query=15, episodes=args.episodes, center="none")
        api.evaluate(cfg)  # warm-up (imports, first torch calls)
        results = [api.evaluate(cfg) for _ in range(3)]
        fskd_eval = min(r.eval_seconds for r in results)
        fskd_total = min(r.seconds for r in results)
        x = torch.from_numpy(FeatureStore.open(path).gather()[0])
        classes = np.arange(n_cls)
        head = PrototypeHead(None, prepare_rows=True)  # what `fskd eval --classifier prototype` uses

        def batched():
            eps = sample_episodes(labels, classes, 5, 1, 15, args.episodes, 0)
            run_episodes(x, eps, head)

        t_batched = best_of(batched)
        t_loop = best_of(lambda: per_episode_loop(feats, labels, classes, args.episodes, 0))
    rows = [
        {
            "path": "plain per-episode loop (numpy)",
            "seconds": f"{t_loop:.3f}",
            "episodes/s": f"{args.episodes / t_loop:,.0f}",
            "ratio": "1.0x",
        },
        {
            "path": "fskd batched episodes (sample + score)",
            "seconds": f"{t_batched:.3f}",
            "episodes/s": f"{args.episodes / t_batched:,.0f}",
            "ratio": f"{t_loop / t_batched:.1f}x",
        },
        {
            "path": "fskd eval, evaluation time (api.evaluate eval_seconds)",
            "seconds": f"{fskd_eval:.3f}",
            "episodes/s": f"{args.episodes / fskd_eval:,.0f}",
            "ratio": f"{t_loop / fskd_eval:.1f}x",
        },
        {
            "path": "fskd eval incl. opening + reading the store",
            "seconds": f"{fskd_total:.3f}",
            "episodes/s": f"{args.episodes / fskd_total:,.0f}",
            "ratio": f"{t_loop / fskd_total:.1f}x",
        },
    ]
    print(f"## Episodic eval speed: {args.episodes} episodes, 5-way 1-shot 15-query, 10,000 x 512 store\n")
    print(f"machine: {machine()}; best of 3; {time.strftime('%Y-%m-%d')}\n")
    print(table(rows, ["path", "seconds", "episodes/s", "ratio"]))


if __name__ == "__main__":
    main()
