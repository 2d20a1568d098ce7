"""Distillation on cub35 (lite0-minilm teacher -> small timm student): accuracy, ablation, cost.

For each regime (semi: MTKD stage 1, K=4 labels per class + the unlabelled train split;
base-novel: SynTrans proxy task on the base classes) and each loss set (all, none = labels only,
and each level alone: instance, batch, class) the script runs the user's pipeline:

    fskd distill --store TEACHER --regime R --losses L --student S --epochs E --out DIR
    fskd extract cub --root ROOT --encoder student:DIR --store DIR.zarr
    fskd eval --store DIR.zarr --state DIR --protocol allway --shots 4 --seeds S   (semi: one student per seed S)
    fskd eval --store DIR.zarr --state DIR --shots 1 / --shots 5 --seed 0          (base-novel: novel 5-way, 600 episodes)

and prints Markdown tables: full losses vs labels only in both regimes with 95% CIs, the loss
ablation, teacher vs student (parameters, forward FLOPs, images/s measured in this run) and one
training epoch from cached teacher features vs with the online teacher, as a ratio.

    .venv/bin/python benchmarks/distill_cub35.py            # ~40 min on 2 shared CPU cores
    .venv/bin/python benchmarks/distill_cub35.py --quick    # a few minutes, low resolution

Hyper-parameters: the mtkd defaults (chosen on the val split / val classes); the epoch and the
head's beta are chosen per run on validation data. No test row or novel class chooses anything.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: idle OpenMP threads must not spin

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table  # noqa: E402

from fskd import api  # noqa: E402
from fskd.config import DistillConfig, EvalConfig, ExtractConfig  # noqa: E402
from fskd.encoders import build_encoder  # noqa: E402
from fskd.evaluation.metrics import seed_summary  # noqa: E402
from fskd.methods import load_state  # noqa: E402
from fskd.store import FeatureStore  # noqa: E402

#: the all-way validation rows of the README tables made with this script: the full val split (the
#: default before CoOp's min(K, 4) rule); `fskd bench` uses the CoOp rule. Issue 15 regenerates them.
HP_SELECTION = "full-val"

ROOT = Path(__file__).resolve().parents[1]


def teacher_store(path: Path, root: Path) -> str:
    api.extract(ExtractConfig(dataset="cub", root=str(root), encoder="lite0-minilm", store=str(path)))
    return str(path)


def fit_and_extract(store: str, root: Path, out: Path, regime: str, losses: str, seed: int, args, reuse: bool):
    """distill -> extract with the student (a fresh store); returns (state, student store)."""
    cfg = DistillConfig(
        store=store,
        student=args.student,
        regime=regime,
        losses=losses,
        epochs=args.epochs,
        shots=4 if regime == "semi" else 5,
        seed=seed,
        out=str(out),
        options=args.options,
        force=True,
        hp_selection=HP_SELECTION,
    )
    if not (reuse and (out / "state.json").exists() and load_state(out).config == {**cfg.to_dict(), "out": str(out)}):
        api.distill(cfg)
    s_store = out.with_suffix(".zarr")
    # a store extracted with an earlier student of the same DIR would be reused by extract (same
    # spec string); fskd eval --state would then refuse it: start from a fresh store
    shutil.rmtree(s_store, ignore_errors=True)
    api.extract(ExtractConfig(dataset="cub", root=str(root), encoder=f"student:{out}", store=str(s_store)))
    return load_state(out), s_store


def run_one(store: str, root: Path, out: Path, regime: str, losses: str, args, reuse: bool) -> dict:
    """semi: one student per seed (its own 4 shots), each scored all-way with its own seed, 95% CI
    by Student t over the seeds (fskd.evaluation.metrics). base-novel: one student (seed 1) scored
    on novel 5-way episodes (episode seed 0), 95% CI over episodes."""
    t0 = time.perf_counter()
    row = {"regime": regime, "losses": losses}
    if regime == "semi":
        per, states = [], []
        for seed in args.seeds:
            state, s_store = fit_and_extract(store, root, Path(f"{out}-seed{seed}"), regime, losses, seed, args, reuse)
            states.append(state)
            per.append(
                api.evaluate(
                    EvalConfig(store=str(s_store), state=f"{out}-seed{seed}", protocol="allway", shots=4, seeds=(seed,))
                ).accuracy
                / 100
            )
        summ = seed_summary(per)
        state = states[0]
        row.update(
            {
                "allway4": round(summ.mean, 2),
                "allway4_ci": round(summ.ci95 or 0.0, 2),
                "allway4_std": summ.std,
                "allway4_seeds": [round(100 * a, 2) for a in per],
                "w1": float("nan"),
                "w1_ci": float("nan"),
                "w5": float("nan"),
                "w5_ci": float("nan"),
            }
        )
    else:
        state, s_store = fit_and_extract(store, root, out, regime, losses, 1, args, reuse)
        ep = {
            k: api.evaluate(EvalConfig(store=str(s_store), state=str(out), shots=k, episodes=args.episodes, seed=0))
            for k in (1, 5)
        }
        row.update(
            {
                "allway4": float("nan"),
                "allway4_ci": float("nan"),
                "w1": ep[1].accuracy,
                "w1_ci": ep[1].ci95,
                "w5": ep[5].accuracy,
                "w5_ci": ep[5].ci95,
            }
        )
    row.update(
        {
            "val": state.metrics["val_accuracy"],
            "best_epoch": f"{state.hparams['best_epoch']}/{state.hparams['epochs']}",
            "teacher_val": state.metrics.get("teacher_val_accuracy"),
            "fit_s": round(time.perf_counter() - t0, 1),
            "epoch_s": round(state.metrics["train_seconds"] / max(1, len(state.metrics["log"])), 1),
        }
    )
    return row


def fmt(m: float, ci: float) -> str:
    return "—" if m != m else f"{m:.2f} ± {ci:.2f}"  # NaN: not measured in this regime


def beyond(a: float, ca: float, b: float, cb: float) -> str:
    return "yes" if a - ca > b + cb else "no"


def cost_rows(store: str, student_dir: Path, reps: int) -> list[dict]:
    """Parameters, forward FLOPs per image and images/s (batch 64, no grad) of teacher and student."""
    from torch.utils.flop_counter import FlopCounterMode

    st = FeatureStore.open(store)
    rows = []
    for who, spec in (("teacher", st.encoder_spec), ("student", f"student:{student_dir}")):
        enc = build_encoder(spec, "cpu")
        from PIL import Image

        x1 = enc.preprocess(Image.new("RGB", (500, 375), (120, 90, 60)))[None]
        model = enc.modules()[0]
        params = sum(p.numel() for p in model.parameters())
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            enc.encode_images(x1)
        flops = fc.get_total_flops()
        x = x1.repeat(64, 1, 1, 1)
        with torch.no_grad():
            enc.encode_images(x)  # warm-up
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                enc.encode_images(x)
                times.append(time.perf_counter() - t0)
        rows.append(
            {
                "model": f"{who}: {spec.split(':')[0] if who == 'teacher' else load_state(student_dir).hparams['student']}",
                "input": f"{x1.shape[-1]} px",
                "params (M)": round(params / 1e6, 2),
                "GFLOPs/img": round(flops / 1e9, 3),
                "img/s": round(64 / min(times), 1),
            }
        )
    t, s = rows
    s["vs teacher"] = (
        f"{t['params (M)'] / s['params (M)']:.1f}x fewer params, {t['GFLOPs/img'] / s['GFLOPs/img']:.0f}x fewer FLOPs, {s['img/s'] / t['img/s']:.1f}x faster"
    )
    return rows


def epoch_speed(store: str, out: Path, args) -> dict:
    """One semi-regime training epoch from cached teacher features vs with the online teacher."""
    secs = {}
    for online in (False, True):
        d = out / f"speed-{'online' if online else 'cached'}"
        r = api.distill(
            DistillConfig(
                store=store,
                student=args.student,
                regime="semi",
                epochs=1,
                out=str(d),
                online_teacher=online,
                options=args.options,
                force=True,
                hp_selection=HP_SELECTION,
            )
        )
        secs[online] = r.metrics["train_seconds"]
    return {
        "cached teacher features (s/epoch)": secs[False],
        "online teacher (s/epoch)": secs[True],
        "online / cached": f"{secs[True] / secs[False]:.1f}x",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=str(ROOT / ".pytest_cache" / "fskd-stores" / "cub-lite0-minilm.zarr"))
    p.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "cub35"))
    p.add_argument("--student", default="timm:resnet10t")
    p.add_argument(
        "--student-kwargs",
        default='{"channels": [32, 64, 128, 256]}',
        help="timm keyword arguments of the student (JSON); default: a half-width ResNet-10-T",
    )
    p.add_argument("--options", default="{}", help="more mtkd options (JSON), e.g. '{\"lr\": 5e-4}' for a ViT student")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-distill"))
    p.add_argument("--no-ablation", action="store_true", help="only full losses vs labels only")
    p.add_argument(
        "--reuse", action="store_true", help="reuse student directories already trained with the same config"
    )
    p.add_argument("--seeds", default="1,2,3", help="semi regime: one student per seed (comma-separated)")
    p.add_argument("--quick", action="store_true", help="2 epochs at 32 px, 200 episodes (a smoke run)")
    args = p.parse_args()
    args.seeds = [int(x) for x in args.seeds.split(",")]
    if args.quick:
        args.epochs, args.image_size, args.episodes = 2, 32, 200
    args.options = {
        "image_size": args.image_size,
        "student_kwargs": json.loads(args.student_kwargs),
        **json.loads(args.options),
    }
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store = teacher_store(Path(args.store), Path(args.root))
    loss_sets = ["all", "none"] + ([] if args.no_ablation else ["instance", "batch", "class"])
    results = []
    for regime in ("semi", "base-novel"):
        for losses in loss_sets:
            r = run_one(store, Path(args.root), out / f"{regime}-{losses}", regime, losses, args, args.reuse)
            results.append(r)
            print(
                f"[{time.perf_counter() - t0:6.0f} s] {regime:10s} {losses:8s} val {r['val']}  all-way4 "
                f"{fmt(r['allway4'], r['allway4_ci'])}  5w1s {fmt(r['w1'], r['w1_ci'])}  5w5s {fmt(r['w5'], r['w5_ci'])}",
                file=sys.stderr,
                flush=True,
            )
    by = {(r["regime"], r["losses"]): r for r in results}
    head = []
    seeds = "-".join(map(str, args.seeds))
    for regime, metrics in (
        ("semi", (("allway4", f"all-way 4-shot (35 classes, one student per seed {seeds})"),)),
        ("base-novel", (("w1", "novel 5-way 1-shot"), ("w5", "novel 5-way 5-shot"))),
    ):
        a, n = by[(regime, "all")], by[(regime, "none")]
        for key, name in metrics:
            head.append(
                {
                    "regime": regime,
                    "metric": name,
                    "full losses": fmt(a[key], a[key + "_ci"]),
                    "labels only (--losses none)": fmt(n[key], n[key + "_ci"]),
                    "gain": f"{a[key] - n[key]:+.2f}",
                    "beyond both 95% CIs": beyond(a[key], a[key + "_ci"], n[key], n[key + "_ci"]),
                }
            )
    abl = [
        {
            "regime": r["regime"],
            "losses": r["losses"],
            "val acc (selection)": r["val"],
            "best epoch": r["best_epoch"],
            "all-way 4-shot": fmt(r["allway4"], r["allway4_ci"]),
            "novel 5w1s": fmt(r["w1"], r["w1_ci"]),
            "novel 5w5s": fmt(r["w5"], r["w5_ci"]),
            "train s/epoch": r["epoch_s"],
        }
        for r in results
    ]
    cost = cost_rows(store, Path(f"{out / 'semi-all'}-seed{args.seeds[0]}"), reps=3 if args.quick else 5)
    speed = epoch_speed(store, out, args)
    total = time.perf_counter() - t0
    teacher_val = by[("semi", "all")]["teacher_val"]
    md = [
        f"# Distillation on cub35: lite0-minilm teacher -> {args.student} {args.student_kwargs}\n",
        f"mtkd options: {json.dumps(args.options)}\n",
        f"{machine()}; student input {args.image_size} px, {args.epochs} epochs, batch 64, AdamW, mtkd defaults, seed 1; "
        f"semi: 4 labelled shots per class (seed 1) + the unlabelled train split, teacher head val accuracy "
        f"{teacher_val}%; base-novel: the 18 base classes, epoch chosen on 5-way 5-shot val-class episodes. "
        f"Evaluation through `fskd extract cub --encoder student:DIR` + `fskd eval --state DIR`: all-way = one student per "
        f"seed {args.seeds} (each distilled with its own 4 shots per class, scored with its own seed on the 797 test rows), "
        f"mean ± 95% CI (Student t over the seeds); episodic = novel classes, 5-way, 15 queries, {args.episodes} episodes "
        f"(seed 0), mean ± 95% CI over episodes. Inductive. Total {total / 60:.1f} min.\n",
        "## Full losses vs labels only\n",
        table(head, list(head[0])),
        "",
        "## Loss ablation (each level alone and all together)\n" if not args.no_ablation else "## All runs\n",
        table(abl, list(abl[0])),
        "",
        "## Teacher vs student (forward, batch 64, CPU, measured in this run)\n",
        table(cost, list(cost[0]) + ["vs teacher"]),
        "",
        "## One training epoch: cached teacher features vs online teacher (semi regime)\n",
        table([speed], list(speed)),
        "",
    ]
    text = "\n".join(md)
    print(text)
    (out / "distill_cub35.md").write_text(text)
    (out / "distill_cub35.json").write_text(
        json.dumps(
            {"runs": results, "cost": cost, "speed": speed, "args": {k: v for k, v in vars(args).items()}}, indent=2
        )
    )


if __name__ == "__main__":
    main()
