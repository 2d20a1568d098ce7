"""FMA on synthetic features with known structure: accuracy vs number of solver steps.

The data (ground truth known): C classes with text features ``t_c`` (unit vectors) in a joint
space. Each class's images form a mixture of several modes scattered around its text direction
(``t_c + spread * u_cj``), so the modes of different classes interleave (entangled classes), all
shifted by one shared vector ``g`` (the modality gap), plus isotropic noise. The Bayes classifier
of that mixture gives the best accuracy any method can reach.

FMA (all-way regime, K shots per class, pure transport: prototype weight 0) is fitted once per
seed; its field is then integrated with M Euler steps (M = 1, 2, 4, 8, 16) and the test accuracy
read after every step. The table shows full-transport accuracy per M, the one-step baseline,
the early-stopping choice made on the val split (solver, M, stop) and its test accuracy, next
to zero-shot (cosine to the text features, 0 steps), the prototype classifier and Bayes.

    python benchmarks/align_synthetic.py [--quick] [--seeds 3] [--shots 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table  # noqa: E402

from fskd import api  # noqa: E402
from fskd.config import AlignConfig, EvalConfig  # noqa: E402
from fskd.methods.align.flow import trajectory  # noqa: E402
from fskd.methods.align.fma import FMA, cpu_threads  # noqa: E402
from fskd.methods.base import load_state  # noqa: E402
from fskd.store import FeatureStore  # noqa: E402


def entangled(n_classes: int, modes: int, dim: int, spread: float, noise: float, gap: float, per_split: dict[str, int],
              seed: int, groups: int = 0, text_spread: float = 0.3):
    """Features of the generative model above: ({split: (x, y)}, text (C, dim), bayes(x) -> predictions).
    With ``groups`` > 0 the class texts come in groups of near neighbours (group centre +
    ``text_spread`` * a random direction): classes entangled in the text space too."""
    rng = np.random.default_rng(seed)
    if groups:
        centre = rng.normal(size=(groups, dim))
        centre /= np.linalg.norm(centre, axis=1, keepdims=True)
        r = rng.normal(size=(n_classes, dim))
        text = centre[np.arange(n_classes) % groups] + text_spread * r / np.linalg.norm(r, axis=1, keepdims=True)
    else:
        text = rng.normal(size=(n_classes, dim))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    u = rng.normal(size=(n_classes, modes, dim))
    u /= np.linalg.norm(u, axis=2, keepdims=True)
    g = rng.normal(size=dim)
    g *= gap / np.linalg.norm(g)
    centres = text[:, None, :] + spread * u + g  # (C, modes, dim)
    sigma = noise / np.sqrt(dim)  # noise norm ~ noise
    splits = {}
    for name, n in per_split.items():
        y = np.repeat(np.arange(n_classes), n)
        m = rng.integers(modes, size=len(y))
        x = centres[y, m] + sigma * rng.normal(size=(len(y), dim))
        splits[name] = (x.astype(np.float32), y)

    def bayes(x: np.ndarray) -> np.ndarray:
        d2 = ((x[:, None, None, :] - centres[None]) ** 2).sum(-1)  # (n, C, modes)
        logp = -d2 / (2 * sigma**2)
        mx = logp.max(-1, keepdims=True)
        return (mx[..., 0] + np.log(np.exp(logp - mx).sum(-1))).argmax(1)

    return splits, text.astype(np.float32), bayes


def make_store(seed: int, args, work: Path):
    per = {"train": args.shots, "val": args.val, "test": args.test}
    splits, text, bayes = entangled(args.classes, args.modes, args.dim, args.spread, args.noise, args.gap, per, seed,
                                    args.groups, args.text_spread)
    n = args.classes
    store = FeatureStore.from_arrays(work / f"entangled-{seed}.zarr", splits, [f"class {i}" for i in range(n)],
                                     {"base": list(range(n // 2)), "val": list(range(n // 2, 3 * n // 4)),
                                      "novel": list(range(3 * n // 4, n))},
                                     text_embeddings=text, encoder={"spec": "synthetic:entangled", "joint": True},
                                     dataset="entangled")
    xt, yt = splits["test"]
    return store, xt, yt, 100 * float((bayes(xt) == yt).mean())


def run(store, xt: np.ndarray, yt: np.ndarray, seed: int, gamma: float, args, work: Path) -> dict:
    """Fit fma with noise ``gamma``; test accuracy after every Euler step for each M."""
    steps = tuple(args.steps)
    t0 = time.perf_counter()
    fit = api.align(AlignConfig(store=str(store.path), shots=args.shots, seed=seed, steps=steps, gamma=gamma,
                                out=str(work / f"fma-{seed}-{gamma}"),
                                options={"proto_weights": [0.0], "solver": "euler", "iters": args.iters,
                                         "width": args.width, "depth": args.depth}))
    fit_s = time.perf_counter() - t0
    state = load_state(fit.out)
    part = FMA().parts(state, store, torch.device("cpu"))["allway"]
    e = part.space.to_flow(part.space.embed(torch.from_numpy(xt)))
    truth = torch.from_numpy(yt)
    curves = {}
    with cpu_threads(1):
        for m in steps:
            curves[m] = [100 * float(((F.normalize(z, dim=-1) @ part.targets.T).argmax(1) == truth).float().mean())
                         for z in trajectory(part.field, e, m)]
    hp = state.hparams
    ev = api.evaluate(EvalConfig(store=str(store.path), state=fit.out, protocol="allway", shot=args.shots, seeds=(seed,)))
    return {"curves": curves, "chosen": (hp["allway.steps"], hp["allway.stop"]), "fit_s": fit_s,
            "chosen_test": ev.accuracy}  # the val-chosen (steps, stop) through fskd eval


def fmt(values: list[float]) -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():.1f} ± {a.std(ddof=1):.1f}" if len(a) > 1 else f"{a.mean():.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, gammas 0 and 1, fewer training steps")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--classes", type=int, default=12)
    ap.add_argument("--modes", type=int, default=2, help="modes (sub-clusters) per class")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--spread", type=float, default=1.0, help="distance of each mode from its class's text direction")
    ap.add_argument("--noise", type=float, default=1.0, help="norm of the isotropic image noise")
    ap.add_argument("--gap", type=float, default=2.0, help="norm of the shared image-side offset (modality gap)")
    ap.add_argument("--groups", type=int, default=0, help="class texts in this many groups of near neighbours (0: none)")
    ap.add_argument("--text-spread", type=float, default=0.3, help="distance of a class text from its group centre")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--val", type=int, default=20, help="val-split rows per class")
    ap.add_argument("--test", type=int, default=200, help="test-split rows per class")
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--width", type=int, default=512, help="velocity network width (fma default 512)")
    ap.add_argument("--depth", type=int, default=2, help="residual blocks (fma default 2)")
    ap.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="noise augmentation strengths")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.iters, args.gammas = 1, 300, [0.0, 1.0]
    t0 = time.perf_counter()
    seeds = range(1, args.seeds + 1)
    runs: dict[float, list[dict]] = {g: [] for g in args.gammas}
    base = {"bayes": [], "zero": [], "proto": []}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        for seed in seeds:
            store, xt, yt, bayes = make_store(seed, args, work)
            base["bayes"].append(bayes)
            base["proto"].append(api.evaluate(EvalConfig(store=str(store.path), protocol="allway", shot=args.shots,
                                                         seeds=(seed,))).accuracy)
            for g in args.gammas:
                runs[g].append(run(store, xt, yt, seed, g, args, work))
            base["zero"].append(runs[args.gammas[0]][-1]["curves"][args.steps[0]][0])
    steps = args.steps
    print(f"## FMA on entangled synthetic classes (ground truth known)\n\n{args.classes} classes, each a mixture of "
          f"{args.modes} modes at distance {args.spread} from its text direction in {args.dim}-d (modes of different classes "
          f"interleave), image noise {args.noise}, modality gap {args.gap} (a shared offset on the image side); joint "
          f"space (identity bridge). All-way regime: {args.shots} shots per class, {args.val} val and {args.test} test rows "
          f"per class; seeds 1-{args.seeds} (mean ± std over seeds). FMA: width {args.width}, depth {args.depth}, "
          f"{args.iters} iterations, pure transport (prototype weight 0), Euler with step size 1/M; early stopping = "
          f"(M, stop) with the best val-split accuracy. {machine()}.\n")
    print(f"Bayes classifier (ground truth): {fmt(base['bayes'])}; zero-shot (cosine to text, 0 steps): "
          f"{fmt(base['zero'])}; prototype ({args.shots}-shot): {fmt(base['proto'])}.\n")
    cols = ["gamma"] + [f"{m} step{'s' if m > 1 else ''}" for m in steps] + ["early stop (val)", "chosen stop/M per seed",
                                                                             "fit s"]
    rows = []
    for g in args.gammas:
        r = runs[g]
        row = {"gamma": g, "early stop (val)": fmt([x["chosen_test"] for x in r]),
               "chosen stop/M per seed": ", ".join(f"{x['chosen'][1]}/{x['chosen'][0]}" for x in r),
               "fit s": f"{np.mean([x['fit_s'] for x in r]):.1f}"}
        for m in steps:
            row[f"{m} step{'s' if m > 1 else ''}"] = fmt([x["curves"][m][-1] for x in r])
        rows.append(row)
    print("Test accuracy (%) after full transport with M Euler steps, and with the early-stopping choice:\n")
    print(table(rows, cols))
    for g in args.gammas:
        print(f"\nTest accuracy after each Euler step k = 0..M (mean over seeds), gamma {g}:\n")
        curve_rows = [{"M": m, "k = 0..M": " ".join(f"{a:.1f}" for a in np.mean([x["curves"][m] for x in runs[g]], axis=0))}
                      for m in steps]
        print(table(curve_rows, ["M", "k = 0..M"]))
    print(f"\nCommand: `python benchmarks/align_synthetic.py{' --quick' if args.quick else ''}`; "
          f"total {time.perf_counter() - t0:.0f} s.")


if __name__ == "__main__":
    main()
