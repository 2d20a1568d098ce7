"""Export fskd's exact CoOp inputs, so that the CoOp authors' own code (KaiyangZhou/CoOp,
trainers/coop.py on Dassl) can be run on them in a scratch folder outside this repository (their
code is never committed here), and fskd's result on the same inputs, per K and seed.

    python benchmarks/authors_inputs_coop.py --shots 1,4,16 --seeds 1,2,3 --out /tmp/authors_coop
    python benchmarks/authors_inputs_coop.py --method kgcoop --set batch_size=128 --set epochs=100 \
        --shots 1,4,16 --seeds 1,2,3 --out /tmp/authors_kgcoop     # KgCoOp's released config

CoOp trains context vectors through a CLIP text tower, so the store needs a real open_clip model:
this machine has no pretrained weights, so the script writes a tiny open_clip CLIP with seeded
random weights (``fskd.encoders.openclip.TINY_CONFIG``, 2-layer ViT and text transformer, 32-d,
16 text positions) to OUT/tiny-clip and encodes cub35 with it (OUT/cub-tiny-clip.zarr; ``--store``
and ``--model-dir`` reuse others). Its image features carry no class information, so accuracies
sit near chance: the comparison is of the algorithm (the learned context, the training losses,
the test logits), not of CoOp's accuracy.

fskd fits ``coop`` (or ``kgcoop``) all-way with the reference's choices: ``--hp-selection none``
(the last epoch, as Dassl keeps), ``--set regime=allway`` (the reference has no episodic regime),
for coop ``n_ctx=4`` (the tiny tower's 16 positions; kgcoop's "a photo of a" is 4 already), the
class name at the end, one shared context; ``--set KEY=VALUE`` adds options (e.g. KgCoOp's
released config, batches of 128 for 100 epochs).

Writes OUT/inputs_K{K}_s{seed}.npz:
  x (S, D), y (S,)       the shots' image features as fskd uses them (L2-normalised; class-major)
  test, test_truth       every test row (L2-normalised), labels as class positions 0..N-1
  ctx_init (M, w)        the context fskd starts from (CoOp: nn.init.normal_(std=0.02))
  epoch_perms (E, S)     the row order of every epoch (CoOp's RandomSampler), batches of
                         batch_size in that order, the last short batch dropped when there is a full one
  lr (E,)                the learning rate of every epoch (ConstantWarmupScheduler, cosine)
  momentum, weight_decay, batch_size, logit_scale (exp of the model's), n_ctx
  fskd_ctx (M, w)        the context fskd learned (the last epoch)
  target (N, d), lam     kgcoop: the hand-crafted class text features its term keeps the learned
                         ones near (the store's, L2-normalised) and its weight
  fskd_test_logits (T, N) fskd's test logits with that context
plus OUT/class_names.json (the prompts' class names, in label order), OUT/fskd_results.json
(fskd's test accuracy, fit seconds, per-epoch training losses) and OUT/README.txt.
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
from _common import DATA_ROOT  # noqa: E402

from fskd import api  # noqa: E402
from fskd.cli import _options  # noqa: E402
from fskd.config import AdaptConfig, EvalConfig, ExtractConfig  # noqa: E402
from fskd.methods import load_state  # noqa: E402
from fskd.store import FeatureStore  # noqa: E402

OPTIONS = {"coop": {"regime": "allway", "n_ctx": 4}, "kgcoop": {"regime": "allway"}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="coop", choices=sorted(OPTIONS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more options of the method")
    ap.add_argument("--shots", default="1,4,16")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-dir", default=None, help="an open_clip local-dir model (default: OUT/tiny-clip, written)")
    ap.add_argument("--store", default=None, help="cub35 encoded with that model (default: OUT/cub-tiny-clip.zarr)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir) if args.model_dir else out / "tiny-clip"
    if not args.model_dir and not (model_dir / "open_clip_config.json").exists():
        from fskd.encoders.openclip import save_random_model

        save_random_model(model_dir)
    spec = f"openclip:local-dir:{model_dir}"
    path = args.store or str(out / "cub-tiny-clip.zarr")
    if not args.store:
        api.extract(ExtractConfig(dataset="cub", root=str(DATA_ROOT / "cub35"), encoder=spec, store=path, workers=1))
    store = FeatureStore.open(path)
    (out / "class_names.json").write_text(json.dumps(list(store.class_names), indent=1))
    options = {**OPTIONS[args.method], **_options(args.set)}  # parsed as fskd adapt --set parses them
    results = {}
    for k in map(int, args.shots.split(",")):
        for seed in map(int, args.seeds.split(",")):
            results[f"K{k}_s{seed}"] = r = export(store, path, args.method, options, k, seed, out)
            print(
                f"K={k} seed={seed}: fskd {args.method} {r['accuracy']:.3f}% (fit {r['fit_seconds']:.1f} s)", flush=True
            )
    (out / "fskd_results.json").write_text(json.dumps(results, indent=1))
    (out / "README.txt").write_text(README.format(model_dir=model_dir))


def export(store, path: str, method: str, options: dict, k: int, seed: int, out: Path) -> dict:
    from fskd.methods import METHODS
    from fskd.methods.adapt.coop import PromptLearner, epochs_for, lr_at, prompt_tower
    from fskd.methods.adapt.regimes import allway_rows

    state_dir = out / f"state_K{k}_s{seed}"
    t0 = time.perf_counter()
    cfg = AdaptConfig(
        store=path,
        method=method,
        shots=k,
        seed=seed,
        out=str(state_dir),
        force=True,
        device="cpu",
        hp_selection="none",
        options=options,
    )
    api.adapt(cfg, progress=None)
    fit_s = time.perf_counter() - t0
    ev = api.evaluate(EvalConfig(store=path, state=str(state_dir), protocol="allway", shots=k, seeds=(seed,)))
    state = load_state(state_dir)
    opts = METHODS.get(method).options.from_dict(options)
    cpu = torch.device("cpu")
    tower = prompt_tower(store.encoder_spec, cpu, method)
    learner = PromptLearner(tower, store.class_names, opts.n_ctx, opts.ctx_init, False, "end", seed)
    ctx_init = learner.ctx.detach().clone()
    x, _, classes = allway_rows(store, k, seed)
    n = len(x)
    epochs = opts.epochs if opts.epochs is not None else epochs_for(k)
    if int(state.hparams["allway.epochs"]) != epochs:
        raise SystemExit(f"K={k} seed={seed}: fskd trained {state.hparams['allway.epochs']} epochs, expected {epochs}")
    gen = torch.Generator().manual_seed(seed)  # train_context's row order: one permutation per epoch
    perms = torch.stack([torch.randperm(n, generator=gen) for _ in range(epochs)])
    xt, yt = store.gather(None, ["test"])
    pos = np.full(int(classes.max()) + 1, -1)
    pos[classes] = np.arange(len(classes))
    test = F.normalize(torch.from_numpy(xt), dim=-1)
    with torch.no_grad():
        learner.ctx.copy_(state.tensors["allway.ctx"])
        text = learner.all_text()[torch.from_numpy(classes)]
    scale = float(state.hparams["logit_scale"])
    logits = scale * test @ text.T
    np.savez(
        out / f"inputs_K{k}_s{seed}.npz",
        x=F.normalize(torch.from_numpy(x), dim=-1).numpy(),
        y=np.repeat(np.arange(len(classes)), k),
        test=test.numpy(),
        test_truth=pos[yt],
        ctx_init=ctx_init.numpy(),
        epoch_perms=perms.numpy(),
        lr=np.array([lr_at(e, opts, epochs) for e in range(epochs)]),
        momentum=opts.momentum,
        weight_decay=opts.weight_decay,
        batch_size=opts.batch_size,
        logit_scale=scale,
        n_ctx=opts.n_ctx,
        fskd_ctx=state.tensors["allway.ctx"].numpy(),
        fskd_test_logits=logits.numpy(),
        target=F.normalize(torch.from_numpy(np.asarray(store.text_embeddings(), np.float32)), dim=-1)[classes].numpy(),
        lam=opts.lam,
    )
    own = float((logits.argmax(1).numpy() == pos[yt]).mean() * 100)
    if abs(own - ev.accuracy) > 1e-3:  # eval rounds to 3 decimals
        raise SystemExit(f"K={k} seed={seed}: the exported logits give {own:.3f}%, fskd eval {ev.accuracy:.3f}%")
    return {
        "accuracy": ev.accuracy,
        "fit_seconds": round(fit_s, 2),
        "epochs": int(state.hparams["allway.epochs"]),
        "train_loss": state.metrics["allway.train_loss"],
    }


README = """fskd's CoOp inputs on cub35 encoded by a tiny open_clip CLIP with random weights
({model_dir}: open_clip_config.json + open_clip_pytorch_model.bin; open_clip.CLIP(**model_cfg),
load_state_dict). Its text tower is the CLIP text transformer of open_clip (token_embedding,
positional_embedding (16 positions), transformer (batch first), ln_final, text_projection,
attn_mask); tokenise with open_clip.tokenize(prompts, context_length=16) (CLIP's BPE, as
clip.tokenize). The reference's PromptLearner / TextEncoder (trainers/coop.py) take these modules;
its TextEncoder permutes to sequence-first for OpenAI's transformer: open_clip's is batch first.

Prompts: "X X X X <class name>." (CoOp's prompt_prefix of n_ctx X's, class token at the end,
one context shared by the classes: N_CTX 4, CTX_INIT "", CSC False, CLASS_TOKEN_POSITION end),
class names from class_names.json in label order. The context starts at ctx_init (CoOp draws
nn.init.normal_(std=0.02); fskd's draw is exported instead).

Image side: x (S, D) are the shots' image features already L2-normalised (CustomCLIP's
image_features / norm), y their labels; the image encoder is not run (cached features).
logits = logit_scale * x @ normalize(text_features).T, cross-entropy, as CustomCLIP.forward.

Training: SGD(ctx, lr, momentum, weight_decay) (Dassl build_optimizer: dampening 0, no nesterov),
epoch e at lr[e] (ConstantWarmupScheduler 1 epoch at 1e-5, then CosineAnnealingLR(max_epoch),
stepped per epoch), batches of batch_size rows in epoch_perms[e] order, the last short batch
dropped when there is a full one (Dassl's train_x loader drop_last; at 1 shot 35 rows give one
batch of 32). The result is the last epoch (Dassl's TEST.FINAL_MODEL last_step).

kgcoop (trainers/kgcoop.py of htyao89/KgCoOp): the prompts are "a photo of a <class name>." and the
context starts at those 4 words' token embeddings (KgCoOp's CTX_INIT; ctx_init holds fskd's start);
the loss adds lam * (1 - mean_c cos(text_c, target_c)), target standing in for KgCoOp's
ori_embedding (the text features of its CUSTOM_TEMPLATES prompt: fskd uses the store's class text).
batch_size and the epochs (len(epoch_perms)) are the npz's (--set batch_size=128 --set epochs=100:
KgCoOp's vit_b16_ep100_ctxv1.yaml).

Compare: the final context with fskd_ctx, the test accuracy and the logits with fskd_test_logits,
the per-epoch mean training loss with fskd_results.json's train_loss.
"""

if __name__ == "__main__":
    main()
