"""Export fskd's exact all-way inputs of a method, so that its authors' own code can be run on
them in a scratch folder outside this repository (their code is never committed here), and
fskd's own result on the same inputs, per K and seed.

    python benchmarks/authors_inputs.py --method lp++ --shots 1,4,16 --seeds 1,2,3 --out /tmp/lpp_parity
    python benchmarks/authors_inputs.py --method gda --shots 1,4,16 --seeds 1,2,3 --out /tmp/authors_gda
    python benchmarks/authors_inputs.py --method clap --shots 1,4,16 --seeds 1,2,3 --out /tmp/authors_clap
    python benchmarks/authors_inputs.py --method tip-adapter-f --shots 1,4,16 --seeds 1,2,3 --out /tmp/authors_tipf
    python benchmarks/authors_inputs.py --method ape-t --shots 1,4,16 --seeds 1,2,3 --out /tmp/authors_apet

Writes OUT/inputs_K{K}_s{seed}.npz (x (S, D) support rows in the state's text space, class-major,
y (S,), text (N, D), val / val_truth (the val rows the state's rule chose: CoOp's few-shot rows by
default), test / test_truth, and per method:

- lp++: bias (N,), the nn.Linear(D, N) bias drawn after torch.manual_seed(seed);
- gda: val_full / val_full_truth (the whole val split, as the authors' main_few_shots.py
  validates on it), alpha_grid (their 7 values);
- zs-lp, clap: epochs, lr, batch_size, momentum, warmup_lr, logit_scale (the authors'
  SGD_lr1e-1_B256_ep300 config) and constraint (0 for ZS-LP, 1 for CLAP's l2);
- tip-adapter, tip-adapter-f: keys (S, D) (the cache keys), alpha_grid, beta_grid (the search);
  tip-adapter-f also init_alpha, init_beta, lr, eps, weight_decay, train_epoch, batch_size,
  leave_one_out and epoch_perms (train_epoch, S) (the row order of every epoch; view_picks with views);
- ape-t: alpha_grid, beta_grid, w_sim, feat_num, lr, eps, weight_decay, train_epoch, batch_size,
  init_alpha, init_beta and epoch_perms (train_epoch, S) (ape_t.train's row order of every epoch);
- linear-probe: x / val / test are the raw store features (lpclip's input) and there is no text;
  c_grid, rounds, max_iter (lpclip's C search) and sklearn_version;
- cross-modal-lp: lr_grid, weight_decay_grid, batch_size_grid, valid_batch_sizes, iters,
  warmup_iters, warmup_lr, eval_every, text_ratio, logit_scale and, per batch size b fskd ran,
  image_batches_b{b} / text_batches_b{b} (the rows of every step);
- every method, when the store has augmented views: x_views (V, S, D), each view embedded as x)

plus OUT/fskd_results.json (fskd's test accuracy, fit seconds and hyper-parameters of each) and
OUT/README.txt (what each array is and where the authors' code takes it). The store is cub35
with lite0-minilm (the tests' cached store, made by `make demo` or the tests).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import cub35_store  # noqa: E402
from parity import inputs  # noqa: E402 - the inputs parity.py's re-derivations use

from fskd import api  # noqa: E402
from fskd.config import AdaptConfig, EvalConfig  # noqa: E402
from fskd.methods import load_state  # noqa: E402
from fskd.store import FeatureStore  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="lp++")
    ap.add_argument("--shots", default="1,4,16")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--out", required=True)
    ap.add_argument("--store", default=None, help="the cub35 lite0-minilm store (default: the tests' cached one)")
    ap.add_argument("--hp-selection", default="few-shot-val", choices=("few-shot-val", "full-val"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = cub35_store(args.store)
    store = FeatureStore.open(path)
    results = {}
    for k in map(int, args.shots.split(",")):
        for seed in map(int, args.seeds.split(",")):
            state_dir = out / f"state_K{k}_s{seed}"
            t0 = time.perf_counter()
            api.adapt(
                AdaptConfig(
                    store=path,
                    method=args.method,
                    shots=k,
                    seed=seed,
                    out=str(state_dir),
                    force=True,
                    device="cpu",
                    hp_selection=args.hp_selection,
                ),
                progress=None,
            )
            fit_s = time.perf_counter() - t0
            ev = api.evaluate(
                EvalConfig(store=path, state=str(state_dir), protocol="allway", shots=k, seeds=(seed,), device="cpu")
            )
            state = load_state(state_dir)
            inp = inputs(store, k, seed, state, args.hp_selection)
            if "space" not in inp:  # no class text (linear-probe): the raw store rows, as the method fits them
                from fskd.methods.adapt.text_space import TextSpace

                inp["space"] = TextSpace(None, lambda t: t, inp["support"])
            ts = inp["space"]
            _, n, kk, d = ts.support.shape
            np.savez(
                out / f"inputs_K{k}_s{seed}.npz",
                x=ts.support.reshape(n * kk, d).numpy(),
                y=torch.arange(n).repeat_interleave(kk).numpy(),
                **({} if ts.weights is None else {"text": ts.weights[0].numpy()}),
                val=ts.embed(inp["val"][None])[0].numpy(),
                val_truth=inp["val_truth"].numpy(),
                test=ts.embed(inp["test"][None])[0].numpy(),
                test_truth=inp["test_truth"].numpy(),
                **method_inputs(args.method, store, k, seed, inp, d, n, state),
            )
            results[f"K{k}_s{seed}"] = {
                "accuracy": ev.accuracy,
                "fit_seconds": round(fit_s, 2),
                "hparams": {h: v for h, v in state.hparams.items() if h != "class_split"},
            }
            print(f"K={k} seed={seed}: fskd {args.method} {ev.accuracy:.3f}% (fit {fit_s:.1f} s)", flush=True)
    (out / "fskd_results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "README.txt").write_text(README.get(args.method, README["lp++"]).format(hp_selection=args.hp_selection))


def method_inputs(method: str, store, k: int, seed: int, inp: dict, d: int, n: int, state=None) -> dict:
    """What the method's authors' code takes beyond the common arrays (see the module docstring)."""
    from fskd.methods.adapt.regimes import ALLWAY
    from fskd.methods.adapt.text_space import embed_views, view_keys
    from fskd.methods.adapt.validation import allway_val_rows, hp
    from fskd.store import sampling

    ts = inp["space"]
    extra = {}
    views, _ = sampling.allway_shot_views(store, k, seed)
    v = None
    if views is not None:  # (S, V, D) raw -> (V, S, D), each view embedded as the support
        v = torch.from_numpy(views).transpose(0, 1)[None]
        extra["x_views"] = embed_views(ts, v)[0].numpy()
    if method == "lp++":
        torch.manual_seed(seed)
        extra["bias"] = torch.nn.Linear(d, n).bias.detach().numpy()
    elif method == "gda":
        from fskd.methods.adapt.gda import ALPHA

        xv, yv = allway_val_rows(store, inp["classes"][0].numpy(), k, seed, "full-val")
        pos = np.full(int(inp["classes"].max()) + 1, -1)
        pos[inp["classes"][0].numpy()] = np.arange(n)
        extra.update(
            val_full=ts.embed(torch.from_numpy(xv)[None])[0].numpy(), val_full_truth=pos[yv], alpha_grid=np.array(ALPHA)
        )
    elif method in ("zs-lp", "clap"):
        from fskd.methods.adapt import clap

        extra.update(
            epochs=clap.EPOCHS,
            lr=clap.LR,
            batch_size=clap.BATCH,
            momentum=clap.MOMENTUM,
            warmup_lr=clap.WARMUP_LR,
            logit_scale=100.0,
            constraint=int(method == "clap"),
        )
    elif method == "proker":
        from fskd.methods.adapt import proker

        wide = not store.joint
        extra.update(
            beta_grid=np.array(proker.BETA), lambda_grid=np.array(proker.LAMBDA + (proker.LAMBDA_WIDE if wide else ()))
        )
    elif method == "ape":
        from fskd.methods.adapt import ape

        wide = not store.joint
        extra.update(
            beta_grid=np.array(ape.BETA),
            alpha_grid=np.array(ape.ALPHA + (ape.ALPHA_WIDE if wide else ())),
            gamma_grid=np.array(ape.GAMMA),
            w_sim=ape.W_SIM,
            feat_num=ape.n_channels(d, ape.FEAT_FRAC),
        )
    elif method == "ape-t":
        from fskd.methods.adapt import ape, ape_t

        wide = not store.joint
        extra.update(
            beta_grid=np.array(ape.BETA),
            alpha_grid=np.array(ape.ALPHA + (ape.ALPHA_WIDE if wide else ())),
            w_sim=ape_t.W_SIM,
            feat_num=ape.n_channels(d, ape_t.FEAT_FRAC),
            lr=ape_t.LR,
            eps=ape_t.ADAMW_EPS,
            weight_decay=ape_t.WEIGHT_DECAY,
            train_epoch=ape_t.EPOCHS,
            batch_size=ape_t.BATCH,
            init_alpha=ape.DEFAULT["alpha"],
            init_beta=ape.DEFAULT["beta"],
        )
        gen = torch.Generator().manual_seed(seed)  # ape_t.train's batches: the row order of every epoch
        extra["epoch_perms"] = np.stack([torch.randperm(n * k, generator=gen).numpy() for _ in range(ape_t.EPOCHS)])
    elif method == "taskres":
        from fskd.methods.adapt import taskres

        extra.update(
            alpha=taskres.ALPHA,
            lr=taskres.LR,
            batch_size=taskres.BATCH,
            weight_decay=taskres.WEIGHT_DECAY,
            epochs=taskres.FEW_SHOT_EPOCHS if k <= 4 else taskres.MANY_SHOT_EPOCHS,
            logit_scale=100.0,
        )
    elif method in ("tip-adapter", "tip-adapter-f"):
        from fskd.methods.adapt import tip_adapter, tip_adapter_f

        s = n * k
        keys = ts.support[0].reshape(s, d) if v is None else view_keys(ts, v)[0]  # views: their mean, embedded
        extra.update(keys=keys.numpy(), alpha_grid=np.array(tip_adapter.ALPHA), beta_grid=np.array(tip_adapter.BETA))
        if method == "tip-adapter-f":
            epochs = int(state.hparams["epoch_budget"])
            gen = torch.Generator().manual_seed(seed)  # the fine-tuning's row order, epoch by epoch
            extra.update(
                init_alpha=float(hp(state, ALLWAY, "init_alpha")),
                init_beta=float(hp(state, ALLWAY, "init_beta")),
                lr=float(state.hparams["lr"]),
                eps=tip_adapter_f.ADAMW_EPS,
                weight_decay=tip_adapter_f.ADAMW_DECAY,
                train_epoch=epochs,
                batch_size=tip_adapter_f.KEY_BATCH,
                leave_one_out=int(v is None),
                epoch_perms=np.stack([torch.randperm(s, generator=gen).numpy() for _ in range(epochs)]),
            )
            if v is not None:  # the view each shot shows in each epoch (a stream of its own)
                gv = torch.Generator().manual_seed(seed + 1_000_003)
                extra["view_picks"] = np.stack(
                    [torch.randint(v.shape[1], (s,), generator=gv).numpy() for _ in range(epochs)]
                )
    elif method == "clip-adapter":
        from fskd.methods.adapt import clip_adapter as CA

        recipe = {key: state.hparams[key] for key in CA.RECIPE_KEYS}
        epochs = int(state.hparams["allway.epochs"])
        w1, w2 = CA.init_weights(d, d // int(recipe["reduction"]), seed)
        orders: list = []  # the shuffles (and view picks) fskd's training drew, epoch by epoch
        rows = ts.support.reshape(1, 1, n * k, d) if v is None else embed_views(ts, v)
        CA.train_adapters(
            rows, torch.arange(n).repeat_interleave(k)[None], ts.weights, [0.0], seed, epochs, recipe, orders
        )
        extra.update(
            ratio=float(hp(state, ALLWAY, "ratio")),
            epochs=epochs,
            lr=np.array([CA.lr_at(e, epochs, recipe) for e in range(epochs)]),
            batch_size=int(recipe["batch_size"]),
            momentum=float(recipe["momentum"]),
            weight_decay=float(recipe["weight_decay"]),
            logit_scale=float(recipe["logit_scale"]),
            fc1_weight=w1.T.numpy(),  # nn.Linear(D, D/4, bias=False).weight: (D/4, D)
            fc2_weight=w2.T.numpy(),  # nn.Linear(D/4, D, bias=False).weight: (D, D/4)
            epoch_perms=np.stack([o[0].numpy() for o in orders]),
            fskd_fc1_weight=state.tensors["allway.fitted.w1"][0].T.numpy(),
            fskd_fc2_weight=state.tensors["allway.fitted.w2"][0].T.numpy(),
        )
        if v is not None:
            extra["view_picks"] = np.stack([o[1].numpy() for o in orders])
    elif method == "linear-probe":
        import sklearn

        from fskd.methods.adapt import lpclip

        extra.update(
            c_grid=np.array(lpclip.C_GRID),
            rounds=int(state.hparams["rounds"]),
            max_iter=int(state.hparams["max_iter"]),
            sklearn_version=sklearn.__version__,
        )
    elif method == "cross-modal-lp":
        from fskd.methods.adapt import cross_modal_lp as X

        h = state.hparams
        iters, ratio = int(h["iters"]), float(h["text_ratio"])
        n_img = n * k * (1 + (0 if v is None else v.shape[1]))
        sizes, _ = X.valid_batch_sizes(X.BATCH, n_img, n, ratio)
        extra.update(
            lr_grid=np.array(X.LR),
            weight_decay_grid=np.array(X.WEIGHT_DECAY),
            batch_size_grid=np.array(X.BATCH),
            valid_batch_sizes=np.array(sizes),
            iters=iters,
            warmup_iters=int(h["warmup_iters"]),
            warmup_lr=X.WARMUP_LR,
            eval_every=int(h["eval_every"]),
            text_ratio=ratio,
            logit_scale=100.0,
        )
        for b in sizes:  # the rows of every step, drawn as fskd's search drew them for batch size b
            b_img, b_txt = X.halves(b, ratio)
            g = torch.Generator(device="cpu").manual_seed(int(seed))
            loaders = [
                (name, X.Loader(rows, half, 1, g, "cpu"))
                for name, rows, half in (("image", n_img, b_img), ("text", n, b_txt))
                if half > 0 and rows
            ]
            steps = {name: [] for name, _ in loaders}
            for _ in range(iters):
                for name, ld in loaders:
                    idx = ld.next()
                    steps[name].append(np.arange(ld.n) if idx is None else idx[0].numpy())
            for name, rows in steps.items():
                extra[f"{name}_batches_b{b}"] = np.stack(rows).astype(np.int32)
    return extra


_COMMON = """x (S, D), y (S,): the support rows (class-major, K per class), L2-normalised in fskd's space
  for this store (lite0-minilm is not a joint store: rows centred on the support mean, then L2;
  text: the class text mapped into image space by fskd's leave-one-class-out bridge, L2-normalised)
text (N, D): the class weights (CLIP's clip_weights.T)
val, val_truth: the val rows the fit chose its hyper-parameters on ({hp_selection} rule)
test, test_truth: every test row
x_views (V, S, D), when present: every stored augmented view of the shots, embedded as x
fskd_results.json: fskd's test accuracy (%), fit seconds and hyper-parameters per K and seed
"""
_PROKER = (
    _COMMON
    + """beta_grid, lambda_grid: the (beta, lambda) candidates fskd searched (beta outer, the first best kept;
  lambda: the authors' linspace(0.001, 1, 10), then 3 ... 10000 on a non-joint store)
"""
)
_APE = (
    _COMMON
    + """beta_grid, alpha_grid, gamma_grid: the candidates fskd searched (the authors' loop order beta, alpha,
  gamma; alpha: theirs, then 8 ... 65536 on a non-joint store); w_sim (training_free w), feat_num (channels kept)
"""
)
_APE_T = (
    _COMMON
    + """beta_grid, alpha_grid: the (beta, alpha) candidates fskd searched after training (beta outer)
w_sim (w_training[0]), feat_num (training_feat_num: channels of the residual), lr, eps, weight_decay, train_epoch,
  batch_size, init_alpha, init_beta: the recipe fskd ran (the authors' APE_T / APE_Training, main.py and utils.py)
Authors' code: cache_keys = x.T, cache_values = one_hot(y), clip_weights = text.T, the training loader's
  image features = x (or one of x_views per shot and epoch), val_features = val, test_features = test.
"""
)
_TASKRES = (
    _COMMON
    + """alpha, lr, batch_size, weight_decay, epochs, logit_scale: the recipe fskd ran (the authors'
  train_regular.sh: Adam, 1-epoch warm-up at 1e-5 then cosine, residual initialised at zeros)
"""
)
_CLIP_ADAPTER = (
    _COMMON
    + """ratio, epochs, batch_size, momentum, weight_decay, logit_scale, lr (epochs,): the recipe fskd ran
  (the authors' clip_adapter.py on CoOp's Dassl config: SGD, lr[e] the learning rate of epoch e:
  ConstantWarmupScheduler 1 epoch at 1e-5, then CosineAnnealingLR(epochs) stepped per epoch)
fc1_weight (D/4, D), fc2_weight (D, D/4): the start of the authors' Adapter's two nn.Linear(bias=False)
  (fskd's seeded draw of nn.Linear's default initialisation)
epoch_perms (epochs, S): the row order of every epoch (Dassl's RandomSampler), batches of batch_size
  rows in that order, the last short batch dropped once there is a full one; view_picks (epochs, S)
  with x_views: the view each shot shows in each epoch
fskd_fc1_weight, fskd_fc2_weight: the adapter fskd learned (the last epoch)
Authors' code (gaopengcuhk/CLIP-Adapter clip_adapter.py): CustomCLIP.forward with image_features = the
  batch's x rows (the image encoder not run: cached features), text_features = text (TextEncoder not
  run), logit_scale.exp() = logit_scale; the Adapter, the blend, the normalisation, the loss as written.
"""
)
README = {
    "clip-adapter": _CLIP_ADAPTER,
    "proker": _PROKER,
    "ape": _APE,
    "ape-t": _APE_T,
    "taskres": _TASKRES,
    "lp++": _COMMON + "bias (N,): the nn.Linear(D, N) bias after torch.manual_seed(seed)\n",
    "gda": _COMMON
    + """val_full, val_full_truth: the whole val split (the authors' main_few_shots.py validates on it)
alpha_grid: the authors' 7 blend weights
Authors' code (mrflogs/ICLR24 main_few_shots.py, run()): vecs = x (or x_views flattened, labels
repeated), labels = y, clip_weights = text.T, val_features = val (or val_full), test_features = test.
""",
    "zs-lp": _COMMON
    + """epochs, lr, batch_size, momentum, warmup_lr, logit_scale: the authors' SGD_lr1e-1_B256_ep300
constraint: 0 (ZS-LP: INIT ZS, CONSTRAINT none); 1 (CLAP: INIT ZS, CONSTRAINT l2)
Authors' code (jusiro/CLAP trainers/adapters.py): features_train = x (or x_views rows), labels_train
= y, base_text_features = text; no validation data is used; the last epoch's weights score test.
""",
}
README["clap"] = README["zs-lp"]
_TIP = """keys (S, D): the cache keys, row i the key of support row i (x itself; with x_views, the mean of
  each shot's raw views mapped into the same space)
alpha_grid (22,), beta_grid (6,): the (alpha, beta) candidates fskd searched on val: beta outer, alpha
  inner, a strictly better val accuracy replaces the best (so the first best is kept); alpha 0 is zero-shot
Labels (y, val_truth, test_truth) are class positions 0..N-1; logits = 100 q text^T
  + alpha exp(-beta (1 - q keys^T)) one_hot(y).
Authors' code (gaopengcuhk/Tip-Adapter, main.py and utils.py), float32 throughout:
  cache_keys = keys.T (D, S), cache_values = F.one_hot(y, N).float() (S, N) (not their .half()),
  clip_weights = text.T (D, N), val_features = val, val_labels = val_truth, test_features = test,
  test_labels = test_truth; cfg['search_hp'] = True.
  search_hp builds its lists from cfg['search_scale'] / cfg['search_step'] (linear grids starting
  at 0.1, per-dataset configs, e.g. imagenet.yaml [7, 3] / [200, 20]; there is no CUB config): fskd
  did not search those. To search what fskd searched, set beta_list = list(beta_grid) and
  alpha_list = list(alpha_grid) in search_hp; its loop order and '>' rule are fskd's.
"""
README["tip-adapter"] = (
    _COMMON
    + _TIP
    + """  run_tip_adapter(cfg, cache_keys, cache_values, val, val_truth, test, test_truth, clip_weights):
  cfg['init_beta'] / cfg['init_alpha'] only print one val accuracy there (any value). Compare its
  test accuracy with fskd_results.json (fskd's allway.alpha / allway.beta are the chosen pair).
"""
)
README["tip-adapter-f"] = (
    _COMMON
    + _TIP
    + """init_alpha, init_beta: cfg['init_alpha'], cfg['init_beta']: the pair fskd's training-free search
  (search_hp without adapter, keys as the cache, the grids above, on val) chose; the fine-tuning
  trains at it (the authors' main.py trains at their config's fixed init values instead, e.g.
  imagenet.yaml 1.17 / 1). If init_alpha is 0 fskd did not fine-tune (the cache is off;
  allway.epochs 0) and its result is the training-free one.
lr, eps, weight_decay: torch.optim.AdamW(lr=lr, eps=eps, weight_decay) (the authors' cfg['lr'] 0.001,
  eps 1e-4 and AdamW's default decay 0.01, which their code leaves)
train_epoch, batch_size: cfg['train_epoch'] (20) and their train_loader_F batch (256); scheduler
  CosineAnnealingLR(T_max = train_epoch * ceil(S / batch_size)) (= their len(train_loader_F)),
  stepped every batch
epoch_perms (train_epoch, S): the support rows in the order of each epoch: epoch e's batches are
  epoch_perms[e][0:256], [256:512], ... (the last one short, kept), in place of their shuffled
  train_loader_F: image_features = x[rows] (with x_views: x_views[view_picks[e, rows], rows], one
  stored view per shot per epoch, keys starting at keys), target = y[rows]
leave_one_out: 1 when there are no stored views: a training row is then exactly its own key, so
  fskd sets each row's affinity to its own key to 0 before "@ cache_values" (exp(...) times a
  mask with 0 at (j, rows[j])). The authors' code has no such mask (its training images are fresh
  augmentations, never identical to their cached mean); without the mask expect a difference.
  0: no mask (training on views).
Authors' code: run_tip_adapter_F(cfg, cache_keys, cache_values, val, val_truth, test, test_truth,
  clip_weights, clip_model, train_loader_F) with the loop over train_loader_F replaced by the
  batches above (no clip_model: the rows are features already). Epoch kept: the authors evaluate
  every epoch on the test set and keep the best test epoch; fskd evaluates on val (val, val_truth at
  init_alpha, init_beta) and keeps the first epoch with the best val accuracy (allway.epochs in
  fskd_results.json): evaluate on val there to compare. Then search_hp(..., adapter=adapter) with
  beta_list / alpha_list as above, on val; the test accuracy at its pair is the result (not the
  max(best_acc, acc) their last line prints).
"""
)
README[
    "linear-probe"
] = """x (S, D), y (S,): the support rows (class-major, K per class) as the store holds them: the raw
  image features, neither centred nor normalised (what lpclip fits); no class text is used
val, val_truth: the val rows C was searched on ({hp_selection} rule: CoOp's min(K, 4) per class)
test, test_truth: every test row (raw, as x); labels are class positions 0..N-1
x_views (V, S, D), when present: the stored augmented views of the shots (lpclip does not use them)
c_grid (7,): lpclip's first C list 1e6, 1e4, ..., 1e-6; rounds: its bisection rounds (num_step 8);
  max_iter: LogisticRegression's max_iter (1000); sklearn_version: the scikit-learn fskd ran
fskd_results.json: fskd's test accuracy (%), fit seconds and hyper-parameters per K and seed
  (allway.c: the C of the last round, the probe scored)
Authors' code (KaiyangZhou/CoOp lpclip/linear_probe.py), for one K and seed: skip its sampling
  (np.random.choice of shots and val rows) and set fewshot_train_feature = x, fewshot_train_label
  = y, fewshot_val_feature = val, fewshot_val_label = val_truth, test_feature = test, test_label
  = test_truth, search_list = list(c_grid), args.num_step = rounds; every fit
  LogisticRegression(solver="lbfgs", max_iter=max_iter, penalty="l2", C=c). The grid's best C (the
  first on ties, np.argmax), then each round fits C_left and C_right, keeps C_right only when its val
  accuracy is strictly higher (else C_left) and halves the log10 interval towards it; the test
  accuracy of the last round is the result. fskd's search is that one.
"""
README["cross-modal-lp"] = (
    _COMMON
    + """Labels (y, val_truth, test_truth) are class positions 0..N-1.
lr_grid, weight_decay_grid, batch_size_grid: the authors' HYPER_DICT['linear'] (lr 1e-3, 1e-4; weight
  decay 0, 1e-2, 1e-4; batch 8, 32), searched in their loop order lr, weight decay, batch size
valid_batch_sizes: the batch sizes their get_valid_batch_sizes keeps here (both halves smaller than
  their sets), the only ones fskd trained
iters, warmup_iters, warmup_lr, eval_every, text_ratio, logit_scale: max_iter 12800, warmup_iter
  50 (linear from warmup_min_lr 1e-5, then CosineAnnealingLR(12800)), EVAL_FREQ 100,
  CROSS_MODAL_BATCH_RATIO 0.5 (text rows int(b * 0.5), image rows the rest), logit 4.60517
  (exp = 100); AdamW betas (0.9, 0.999), eps 1e-8
image_batches_b{{b}} (iters, b - int(b * text_ratio)), text_batches_b{{b}} (iters, int(b * text_ratio)):
  for each valid batch size b, the rows of each step fskd drew (indices into the image rows /
  into text); the same for every (lr, weight decay) pair of that b
Image rows: x, then every x_views row (view-major, x_views.reshape(-1, D)) when present; labels y
  repeated (np.tile(y, 1 + V)). Text rows: text, labels 0..N-1 (one text per class: the authors use
  one per template). The head W (N, D), no bias, starts at text L2-normalised (their
  --classifier_init zeroshot); rows are L2-normalised in the forward pass (their LogitHead).
Authors' code (linzhiqiu/cross_modal_adaptation train.py, engine/): image_encoder and text_encoder =
  modules that return their input (text_encoder(text, eot_indices) -> text; the rows are features
  already), text_dataset = TextTensorDataset(text, arange(N), zeros(N)), image_train_dataset =
  TensorDataset(image rows, labels), image_val_dataset = TensorDataset(val, val_truth),
  test_dataset = TensorDataset(test, test_truth); make_classifier_head hard-codes in_features 512 /
  1024 by encoder: use D. To reproduce fskd's batches exactly, replace the shuffled image_loader /
  text_loader by iterators over image_batches_b{{b}} / text_batches_b{{b}} (their own loaders draw
  other batches from the same distribution: expect seed-level differences). fskd's choice: the
  (lr, weight decay, batch size) whose best val checkpoint is strictly the best, the first in their
  loop order on ties (eval.py), each run keeping its earliest best checkpoint (train()); fskd's
  allway.steps s is their result_dict['iter'] = s - 1. Compare test_accs['head'] (not wise-ft).
"""
)


if __name__ == "__main__":
    main()
