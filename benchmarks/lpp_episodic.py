"""Why published LP++ loses to prototypes in cub35's novel-class episodes: a diagnosis.

Fits `lp++` at K shots (seed 1: the base-class bridge and the val-chosen epoch count), then, on
the same 600 5-way K-shot 15-query episodes of the novel classes, prints in one table:

- prototypes in the same embedded space (centred on the bridge mean, L2-normalised), and the
  text classifier alone (zero-shot through the bridge);
- LP++ at its initialisation (W = the class sums of the shots, alpha0 = 250 x the mean text
  affinity), after the epoch count validation chose, and at 300 epochs;
- the same with alpha0 scaled by 0 (no text term at the start) and 0.1, to see whether the
  size of the initial text weight drives the loss.

Test accuracies at several epoch counts are printed for the diagnosis only; nothing here
chooses a hyper-parameter on them.

    python benchmarks/lpp_episodic.py [--store PATH] [--shots 1] [--episodes 600]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import cub35_store, machine, table  # noqa: E402

from fskd import api  # noqa: E402
from fskd.classifiers.lpp import lpp_start, train_lpp  # noqa: E402
from fskd.config import AdaptConfig  # noqa: E402
from fskd.methods import load_state  # noqa: E402
from fskd.methods.adapt.lp_pp import flat  # noqa: E402
from fskd.methods.adapt.regimes import EPISODIC, sample_episode_rows
from fskd.methods.adapt.text_space import episodic_text_space
from fskd.methods.adapt.validation import hp
from fskd.methods.bridge import Bridge  # noqa: E402
from fskd.store import FeatureStore  # noqa: E402


def ci(acc: torch.Tensor) -> str:
    a = 100 * acc.double()
    return f"{float(a.mean()):.2f} ± {1.96 * float(a.std()) / len(a) ** 0.5:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store")
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--episodes", type=int, default=600)
    args = ap.parse_args()
    t0 = time.perf_counter()
    path = cub35_store(args.store)
    store = FeatureStore.open(path)
    with tempfile.TemporaryDirectory() as tmp:
        api.adapt(
            AdaptConfig(store=path, method="lp++", shots=args.shots, seed=1, out=f"{tmp}/s", device="cpu"),
            progress=None,
        )
        state = load_state(f"{tmp}/s")
    chosen = int(hp(state, EPISODIC, "epochs"))
    text = state.tensors["text"]
    bridge = Bridge.from_tensors(state.tensors)
    novel = store.class_split("novel")
    x, y = store.gather(novel)
    sup, qry, cls = sample_episode_rows(y, novel, 5, args.shots, 15, args.episodes, 0)
    xt = torch.from_numpy(x)
    E = len(cls)
    ts = episodic_text_space(bridge, text, xt[torch.from_numpy(sup)], torch.from_numpy(cls))
    q = ts.embed(xt[torch.from_numpy(qry.reshape(E, -1))])
    truth = torch.arange(5).repeat_interleave(15)[None].expand(E, -1)

    def acc(logits: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(-1) == truth).float().mean(1)

    protos = torch.nn.functional.normalize(ts.support.mean(2), dim=-1)
    rows = [
        {"classifier": "prototypes (same embedding)", "accuracy": ci(acc(q @ protos.transpose(1, 2)))},
        {
            "classifier": "text alone (zero-shot through the bridge)",
            "accuracy": ci(acc(q @ ts.weights.transpose(1, 2))),
        },
    ]
    sx, sy = flat(ts)
    qt = q @ ts.weights.transpose(1, 2)
    info = {}
    for scale in (1.0, 0.1, 0.0):
        start = lpp_start(sx, sy, ts.weights)
        start.alpha = start.alpha * scale
        if scale == 1.0:
            info = {
                "alpha0": float(start.alpha.mean()),
                "affinity": float(start.alpha.mean()) / 250,
                "wx": float((q @ start.weights.transpose(1, 2)).abs().mean()),
                "tx": float(qt.abs().mean()),
            }
        init = q @ start.weights.transpose(1, 2) + start.alpha[:, None, :] * qt
        r = train_lpp(sx, sy, ts.weights, epochs=300, val=(q, truth), start=start)
        curve = r.curve  # (E, 300): test accuracy after each epoch (diagnosis only)
        tag = "LP++" if scale == 1.0 else f"LP++, alpha0 x {scale:g}"
        rows.append({"classifier": f"{tag}: initialisation (0 epochs)", "accuracy": ci(acc(init))})
        for e in sorted({1, 10, chosen, 300}):
            note = " (val-chosen)" if e == chosen else ""
            rows.append({"classifier": f"{tag}: {e} epochs{note}", "accuracy": ci(curve[:, e - 1])})
    print(f"## LP++ in cub35 novel-class episodes ({args.shots}-shot 5-way, 15 queries, {E} episodes)\n")
    print(f"machine: {machine()}; store {path}; {time.strftime('%Y-%m-%d')}; {time.perf_counter() - t0:.0f} s\n")
    print(table(rows, ["classifier", "accuracy"]))
    print(
        f"\nalpha0 = {info['alpha0']:.1f} (250 x mean text affinity {info['affinity']:.3f}); mean |x.w_c| at "
        f"initialisation {info['wx']:.3f} (W = class sums), mean |x.t_c| {info['tx']:.3f}; validation (300 val-class "
        f"episodes, seed 1) chose {chosen} epochs. Accuracy: mean ± 95% CI over episodes."
    )


if __name__ == "__main__":
    main()
