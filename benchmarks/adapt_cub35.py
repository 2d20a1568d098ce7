"""Every ``fskd adapt`` method on cub35 (lite0-minilm: EfficientNet-Lite0 + MiniLM, text through
the bridge), next to ``prototype``:

- all-way K-shot (K = 1, 2, 4, 8, 16): K train shots per class, all 35 classes, the test split,
  seeds 1-3, one state per seed (``fskd adapt --shots K --seed S``, evaluated on seed S alone, as
  the reference codes fit per seed); mean +- 95% CI over the seeds (Student t, 2 degrees of
  freedom);
- episodic 5-way 1-shot and 5-shot on the 8 novel classes: the seed-1 state, 600 episodes, 15
  queries, seed 0 (mean +- 95% CI over episodes).

Hyper-parameters are chosen on the val split with CoOp's rule (min(K, 4) rows per class, the
``fskd bench`` default) for the all-way states and on val-class episodes for the episodic
ones, never on test rows or novel classes.

    python benchmarks/adapt_cub35.py [--quick] [--store PATH] [--methods a,b:key=value] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

#: the all-way validation rows: CoOp's few-shot rule, as `fskd bench` and `fskd adapt` default to
HP_SELECTION = "few-shot-val"
#: all-way states are fitted and evaluated per seed
SEEDS = (1, 2, 3)

#: option variants reported beside the defaults ("method:key=value,..."; the row says which)
VARIANTS = ("tip-adapter-f:form=span",)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def syntrans_ablation(store: str, state_dir: str, episodes: int) -> list[dict]:
    """5-way 1-shot novel accuracy of the fitted syntrans weights with parts switched off (same
    episodes as fskd eval, seed 0): which part carries the gain."""
    import torch

    from fskd.evaluation.metrics import mean_ci95
    from fskd.methods import load_state
    from fskd.methods.adapt.syntrans import Base, combine
    from fskd.methods.bridge import Bridge
    from fskd.protocols.episodic import sample_episodes
    from fskd.store import FeatureStore

    st, fs = load_state(state_dir), FeatureStore.open(store)
    t = st.tensors
    h = lambda k: st.hparams[f"episodic.{k}"]  # noqa: E731
    base = Base(
        h("power"),
        t["base.mean"],
        t["base.protos"],
        t["text"][t["base.classes"]],
        t["generator"],
        Bridge.from_tensors(t),
    )
    novel = fs.class_split("novel")
    x, y = fs.gather(novel)
    eps = sample_episodes(y, novel, 5, 1, 15, episodes, 0)
    xt = torch.from_numpy(x)
    sup, cls = xt[torch.from_numpy(eps.support)], torch.from_numpy(eps.classes)
    q = base.embed(xt[torch.from_numpy(eps.query.reshape(episodes, -1))])
    truth = torch.arange(5).repeat_interleave(15)
    v, gen, sem, tw = base.parts(sup, cls, t["text"], h("tau"))
    g, a, b = (h("rho") * h(k) for k in ("g", "a", "b"))
    rows = []
    for name, w in (
        ("prototype (power-transformed features)", combine(v, None, sem, tw, 0, 0, 0)),
        ("+ visual weight generator", combine(v, gen, sem, tw, g, 0, 0)),
        ("+ semantic reconstructor", combine(v, None, sem, tw, 0, a, 0)),
        ("+ bridge text weight", combine(v, None, sem, tw, 0, 0, b)),
        ("generator + semantic", combine(v, gen, sem, tw, g, a, 0)),
        ("syntrans (all parts)", combine(v, gen, sem, tw, g, a, b)),
        ("semantic reconstructor alone (no shot)", combine(0 * v, None, sem, tw, 0, 1, 0)),
        ("bridge text weight alone (zero-shot)", combine(0 * v, None, sem, tw, 0, 0, 1)),
    ):
        m, ci = mean_ci95((torch.bmm(q, w.transpose(1, 2)).argmax(-1) == truth).float().mean(1).numpy())
        rows.append({"weights": name, "5-way 1-shot": f"{m:.2f} ± {ci:.2f}"})
    return rows


def main() -> None:
    from _common import cub35_store, machine, parse_variant, table, with_recipes

    from fskd import api
    from fskd.config import AdaptConfig, EvalConfig
    from fskd.evaluation.metrics import seed_summary
    from fskd.methods import methods_of_kind

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="all-way 1 and 4 shots, 5-way 1-shot, 200 episodes")
    ap.add_argument(
        "--store", default=None, help="cub35 lite0-minilm store (default: the test cache, built if missing)"
    )
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--methods", default="", help="comma-separated (default: every adapt method)")
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    store = cub35_store(args.store, Path(args.data_root))
    methods = [m for m in args.methods.split(",") if m] or with_recipes(methods_of_kind("adapt")) + list(VARIANTS)
    methods = ["prototype"] + [m for m in methods if m != "prototype"]
    allway = (1, 4) if args.quick else (1, 2, 4, 8, 16)
    episodic = (1,) if args.quick else (1, 5)
    episodes = 200 if args.quick else args.episodes
    rows, t0, ablation = [], time.perf_counter(), None
    with tempfile.TemporaryDirectory() as d:
        for spec in methods:
            m, options = parse_variant(spec)
            row = {"method": spec.replace(":", " (", 1) + ")" if options else spec}
            fit_s = {}
            for k in sorted(set(allway) | set(episodic)):
                per_seed = []
                for seed in SEEDS if k in allway else SEEDS[:1]:
                    t = time.perf_counter()
                    r = api.adapt(
                        AdaptConfig(
                            store=store,
                            method=m,
                            shots=k,
                            seed=seed,
                            out=f"{d}/{len(rows)}-{k}-{seed}",
                            force=True,
                            hp_selection=HP_SELECTION,
                            options=options,
                        )
                    )
                    fit_s[k] = max(fit_s.get(k, 0.0), time.perf_counter() - t)
                    if m == "syntrans" and k == 1 and seed == SEEDS[0]:
                        ablation = syntrans_ablation(store, r.out, episodes)
                    if k in episodic and seed == SEEDS[0]:
                        e = api.evaluate(
                            EvalConfig(store=store, state=r.out, way=5, shots=k, query=15, episodes=episodes, seed=0)
                        )
                        row[f"5-way {k}-shot"] = f"{e.accuracy:.2f} ± {e.ci95:.2f}"
                        row[f"_ep{k}"] = (e.accuracy, e.ci95)
                    if k in allway:
                        per_seed.append(
                            api.evaluate(
                                EvalConfig(store=store, state=r.out, protocol="allway", shots=k, seeds=(seed,))
                            ).accuracy
                            / 100
                        )
                if per_seed:
                    s = seed_summary(per_seed)
                    row[f"all-way {k}"] = f"{s.mean:.2f} ± {s.ci95:.2f}"
                    row[f"_aw{k}"] = (s.mean, s.ci95)
                print(f"{m} K={k}: fit {fit_s[k]:.1f} s (max over seeds)", file=sys.stderr, flush=True)
            row["fit s (max)"] = f"{max(fit_s.values()):.1f}"
            rows.append(row)
    base = rows[0]
    for row in rows[1:]:  # beyond both CIs of prototype at 5-way 1-shot?
        (a, ca), (b, cb) = row["_ep1"], base["_ep1"]
        row["5-way 1-shot"] += " **" if a - ca > b + cb else (" (below)" if a + ca < b - cb else "")
    cols = ["method"] + [f"5-way {k}-shot" for k in episodic] + [f"all-way {k}" for k in allway] + ["fit s (max)"]
    print(
        f"## fskd adapt on cub35 (lite0-minilm)\n\n{machine()}; store `{store}`; total {time.perf_counter() - t0:.0f} s.\n"
    )
    print(
        f"5-way K-shot: 8 novel classes, {episodes} episodes, 15 queries, seed 0, mean ± 95% CI; "
        f"`**` = above prototype beyond both CIs (the seed-1 state). All-way K: 35 classes, K train shots per class, "
        f"the 797 test rows, one state per seed (`fskd adapt --shots K --seed S`, seeds 1-3), mean ± 95% CI over the "
        f"seeds (Student t). Hyper-parameters chosen on the val split (CoOp rule: min(K, 4) rows per class) / "
        f"val-class episodes only.\n"
    )
    print(table(rows, cols))
    if ablation:
        print(f"\n### SynTrans ablation (5-way 1-shot novel, the K=1 state, {episodes} episodes, seed 0)\n")
        print(table(ablation, ["weights", "5-way 1-shot"]))
    if args.json:
        Path(args.json).write_text(
            json.dumps([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], indent=2)
        )


if __name__ == "__main__":
    main()
