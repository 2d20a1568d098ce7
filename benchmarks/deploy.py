"""Deployment of a fitted head (issue 32): the offline teacher (lite0-minilm) and a student distilled
from it on cub35, each with a tip-adapter head fitted on cub35 (16 shots, seed 1), exported to ONNX.

The student is the user's pipeline, run here:

    fskd distill --store TEACHER --student timm:resnet10t --shots 16 --seed 1 --epochs E
                 --set image_size=64 --set 'student_kwargs={"channels":[32,64,128,256]}' --out DIR
    fskd extract cub --root ROOT --encoder student:DIR --store DIR.zarr
    fskd adapt --store DIR.zarr --method tip-adapter --shots 16 --out DIR-tip
    fskd export --state DIR-tip --out DIR-tip.onnx

(benchmarks/distill_cub35.py's half-width ResNet-10-T at 64 px, 20 epochs by default). For each
model, the exported file and the same pipeline in torch eager, in the same run: file size,
parameters, CPU images/s at batch 1 and 32 (``--threads`` intra-op threads each), and top-1 accuracy
on cub35's test images (preprocessed by examples/onnx_predict.py from the file's metadata for ONNX,
by the encoder itself for eager). Then ``fskd predict`` throughput on the same images against
extract's loader + model forward alone (the head and the writer must cost nothing), and eval's
all-way accuracy on the cached features.

    python benchmarks/deploy.py [--store S] [--images N] [--threads 1] [--student-epochs 20] [--reuse]
                                [--out runs/deploy]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: idle OpenMP threads must not spin

import argparse  # noqa: E402
import csv  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, cub35_store, machine, table  # noqa: E402

from fskd import api  # noqa: E402
from fskd.config import (  # noqa: E402
    AdaptConfig,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    ExtractConfig,
    PredictConfig,
)
from fskd.methods import load_state  # noqa: E402
from fskd.store import FeatureStore  # noqa: E402

SHOTS, SEED = 16, 1
STUDENT = "timm:resnet10t"
STUDENT_OPTIONS = {"image_size": 64, "student_kwargs": {"channels": [32, 64, 128, 256]}}


def example():
    spec = importlib.util.spec_from_file_location("onnx_predict", ROOT / "examples" / "onnx_predict.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rate(fn, x: np.ndarray, batch: int, n: int) -> float:
    """Images per second of ``fn`` over ``n`` images in batches of ``batch`` (after one warm-up batch)."""
    fn(x[:batch])
    t0 = time.perf_counter()
    done = 0
    while done < n:
        fn(x[(done % len(x)) : (done % len(x)) + batch])
        done += batch
    return done / (time.perf_counter() - t0)


def student(teacher: str, out: Path, epochs: int, reuse: bool) -> tuple[str, str]:
    """distill -> extract with the student (a fresh store): (student dir, student store)."""
    d = out / "student"
    cfg = DistillConfig(
        store=teacher,
        student=STUDENT,
        shots=SHOTS,
        seed=SEED,
        epochs=epochs,
        out=str(d),
        options=STUDENT_OPTIONS,
        force=True,
    )
    s_store = out / "student.zarr"
    if not (
        reuse
        and (d / "state.json").exists()
        and load_state(d).config == {**cfg.to_dict(), "out": str(d)}
        and s_store.exists()
    ):
        t0 = time.perf_counter()
        api.distill(cfg, progress=None)
        print(f"distilled {STUDENT} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        # a store extracted with an earlier student of the same DIR would be reused by extract (the
        # same spec string) and refused later by its fingerprint: start from a fresh one (ours)
        if s_store.exists():
            FeatureStore.open(s_store)  # an fskd store, written by this script: fine to replace
            shutil.rmtree(s_store)
        root = FeatureStore.open(teacher).attrs["dataset"]["root"]
        api.extract(
            ExtractConfig(dataset="cub", root=root, encoder=f"student:{d}", store=str(s_store), device="cpu"),
            progress=None,
        )
    return str(d), str(s_store)


def measure(who: str, store: str, out: Path, args, ex) -> dict:
    """tip-adapter on ``store`` -> ONNX; ONNX vs eager speed and accuracy, predict vs forward."""
    import onnxruntime as ort

    from fskd.datasets.base import open_rgb
    from fskd.deploy.classifier import Classifier, encode_images
    from fskd.deploy.export import Pipeline

    state = out / f"{who}-tip-adapter-{SHOTS}shot"
    api.adapt(
        AdaptConfig(
            store=store, method="tip-adapter", shots=SHOTS, seed=SEED, out=str(state), device="cpu", force=True
        ),
        progress=None,
    )
    ev = api.evaluate(
        EvalConfig(store=store, state=str(state), protocol="allway", shots=SHOTS, seeds=(SEED,), device="cpu")
    )
    model = out / f"{who}-tip-adapter-{SHOTS}shot.onnx"
    ex_r = api.export(ExportConfig(state=str(state), out=str(model), force=model.exists()))

    s = FeatureStore.open(store)
    valid = s.valid_rows("test")
    root = Path(s.attrs["dataset"]["root"])
    files = [str(root / i) for i in s.sample_ids("test")[valid]]
    truth = np.asarray(s.labels("test")[valid])
    if args.images:
        files, truth = files[: args.images], truth[: args.images]

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    prep = json.loads(sess.get_modelmeta().custom_metadata_map["preprocess"])
    x_onnx = np.stack([ex.preprocess(ex.load_rgb(f), prep) for f in files])

    clf = Classifier(str(state), device="cpu")
    eager = Pipeline(clf).eval()
    x_torch = np.stack([clf.encoder.preprocess(open_rgb(f)).numpy() for f in files])
    pixel_diff = float(np.abs(x_onnx - x_torch).max())

    def run_onnx(x):
        return sess.run(["probabilities"], {"images": x})[0]

    def run_eager(x):
        with torch.inference_mode():
            return eager(torch.from_numpy(x)).numpy()

    probs = {}

    def accuracy(name, fn, x) -> float:
        probs[name] = np.concatenate([fn(x[i : i + 32]) for i in range(0, len(x), 32)])
        return 100.0 * float((probs[name].argmax(1) == truth).mean())

    enc_name = clf.encoder_spec if who == "teacher" else f"{STUDENT.split(':')[1]} (half width)"
    res = {
        "who": who,
        "encoder": enc_name,
        "input": f"{x_onnx.shape[-1]} px",
        "images": len(files),
        "eval_allway": ev.accuracy,
        "export_max_difference": ex_r.max_difference,
        "pixel_difference": pixel_diff,
        "rows": [],
    }
    import onnx

    # the file: its initializers (the encoder, batch norms folded) + the head's constants; eager: the
    # encoder's parameters + the same head tensors
    head = ex_r.parameters - sum(int(np.prod(t.dims)) for t in onnx.load(str(model)).graph.initializer)
    params_eager = sum(p.numel() for p in eager.parameters()) + head
    for name, fn, x, size, params in (
        ("ONNX Runtime", run_onnx, x_onnx, model.stat().st_size, ex_r.parameters),
        ("torch eager", run_eager, x_torch, None, params_eager),
    ):
        res["rows"].append(
            {
                "model": f"{who}: {enc_name} + tip-adapter",
                "input": res["input"],
                "runtime": name,
                "file MB": f"{size / 1e6:.1f}" if size else "-",
                "parameters": f"{params / 1e6:.2f} M (head {head / 1e6:.2f} M)",
                "img/s batch 1": round(rate(fn, x, 1, min(args.speed_images, 32)), 1),
                "img/s batch 32": round(rate(fn, x, 32, args.speed_images), 1),
                f"top-1 on {len(files)} test images (%)": f"{accuracy(name, fn, x):.2f}",
                "_bytes": size,
                "_params": params,
            }
        )

    a, b = probs["ONNX Runtime"], probs["torch eager"]
    res["onnx_vs_eager"] = {
        "max_probability_difference": float(np.abs(a - b).max()),
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
    }

    # predict (loader + forward + head + writer) vs extract's loader + forward alone, same images: the
    # test images repeated until one pass lasts --throughput-seconds, so that predict's fixed costs
    # (building the encoder, opening the output) weigh as they do on a real batch of images
    preds = out / f"{who}-predictions.csv"

    def forward_only(paths) -> float:
        t0 = time.perf_counter()
        for _ in encode_images(clf.encoder, paths, torch.device("cpu"), batch_size=64, workers=args.threads):
            pass
        return time.perf_counter() - t0

    def predict_run(listing):
        return api.predict(
            PredictConfig(
                state=str(state), images=str(listing), out=str(preds), workers=args.threads, device="cpu", force=True
            ),
            progress=None,
        )

    warm = forward_only(files)  # warm-up: the image files into the page cache, the model's first calls
    repeat = max(1, math.ceil(args.throughput_seconds / warm))
    timed = files * repeat
    listing = out / f"{who}-test-images-x{repeat}.txt"
    listing.write_text("\n".join(timed) + "\n")
    forward_s, pr = forward_only(timed), predict_run(listing)  # then each twice, alternating; the best of each
    forward_s, pr2 = min(forward_s, forward_only(timed)), predict_run(listing)
    pr = pr if pr.images_per_s >= pr2.images_per_s else pr2
    names = s.class_names
    with open(preds, newline="") as f:
        got = [r["prediction"] for r in csv.DictReader(f)][: len(files)]
    res["predict_accuracy"] = 100.0 * float(np.mean([g == names[t] for g, t in zip(got, truth, strict=True)]))
    res["forward_img_s"] = len(timed) / forward_s
    res["predict_img_s"] = pr.images_per_s
    res["throughput_images"] = len(timed)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=None, help="cub35 lite0-minilm store (default: the tests' cached one)")
    ap.add_argument("--images", type=int, default=0, help="test images to use (0: all)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for ONNX Runtime and torch")
    ap.add_argument("--speed-images", type=int, default=64, help="images timed per batch size")
    ap.add_argument(
        "--throughput-seconds",
        type=float,
        default=10.0,
        help="predict vs forward: repeat the test images until one pass lasts about this long",
    )
    ap.add_argument("--student-epochs", type=int, default=20, help="distillation epochs of the student")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="reuse a student (and its store) this script distilled with the same settings",
    )
    ap.add_argument("--out", default=str(ROOT / "runs" / "deploy"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = cub35_store(args.store)
    t0 = time.perf_counter()
    s_dir, s_store = student(teacher, out, args.student_epochs, args.reuse)
    ex = example()
    results = [measure("teacher", teacher, out, args, ex), measure("student", s_store, out, args, ex)]
    (out / "deploy.json").write_text(json.dumps(results, indent=2, default=str))
    st = load_state(s_dir)
    t, s = results
    n = t["images"]
    acc = f"top-1 on {n} test images (%)"
    print(
        f"# fskd deploy: tip-adapter ({SHOTS} shots, seed {SEED}) on cub35 over the offline teacher (lite0-minilm) "
        f"and over a student distilled from it ({STUDENT}, half width, {student_settings(st)}); {machine()}; "
        f"{args.threads} intra-op thread(s); {time.perf_counter() - t0:.0f} s\n"
    )
    rows = t["rows"] + s["rows"]
    print(table(rows, ["model", "input", "runtime", "file MB", "parameters", "img/s batch 1", "img/s batch 32", acc]))
    print()
    (to, te), (so, se) = t["rows"], s["rows"]
    print(
        f"student vs teacher: file {to['_bytes'] / so['_bytes']:.1f}x smaller, {to['_params'] / so['_params']:.1f}x "
        f"fewer parameters (ONNX), ONNX {so['img/s batch 1'] / to['img/s batch 1']:.1f}x / "
        f"{so['img/s batch 32'] / to['img/s batch 32']:.1f}x faster at batch 1 / 32 (eager "
        f"{se['img/s batch 1'] / te['img/s batch 1']:.1f}x / {se['img/s batch 32'] / te['img/s batch 32']:.1f}x), "
        f"{float(to[acc]) - float(so[acc]):.2f} points less accurate"
    )
    print()
    prow = []
    for r in results:
        prow += [
            {
                "model": f"{r['who']} ({r['throughput_images']} images)",
                "path": "extract's loader + forward (no head)",
                "img/s": f"{r['forward_img_s']:.1f}",
                "ratio": "1.00",
            },
            {
                "model": f"{r['who']} ({r['throughput_images']} images)",
                "path": "fskd predict (loader + forward + head + CSV)",
                "img/s": f"{r['predict_img_s']:.1f}",
                "ratio": f"{r['predict_img_s'] / r['forward_img_s']:.2f}",
            },
        ]
    print(table(prow, ["model", "path", "img/s", "ratio"]))
    print()
    for r in results:
        print(
            f"{r['who']}: accuracy on the {r['images']} test images: fskd predict (re-encoded) "
            f"{r['predict_accuracy']:.2f}%; fskd eval --state --protocol allway (cached float16 features) "
            f"{r['eval_allway']:.2f}%; ONNX vs eager on these images: top-1 agreement "
            f"{100 * r['onnx_vs_eager']['top1_agreement']:.1f}%, max probability difference "
            f"{r['onnx_vs_eager']['max_probability_difference']:.2g} (export's own check on random batches: "
            f"{r['export_max_difference']:.2g}); examples/onnx_predict.py's pixels vs the encoder's own: max "
            f"{r['pixel_difference']:.2g}"
        )


def student_settings(st) -> str:
    """The student's settings, as the caption says them."""
    hp = st.hparams
    return (
        f"{hp['image_size']} px, {hp['epochs']} epochs (epoch {hp.get('best_epoch')} chosen on val), regime "
        f"{st.config.get('regime', 'semi')}, {st.config['shots']} labelled shots per class + the rest of the train "
        f"split unlabelled"
    )


if __name__ == "__main__":
    main()
