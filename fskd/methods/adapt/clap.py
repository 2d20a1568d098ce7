"""``zs-lp`` and ``clap``: the linear probe started from the zero-shot text weights, and CLAP,
the same probe kept near those weights by a class-adaptive penalty (Silva-Rodríguez et al., "A
Closer Look at the Few-Shot Adaptation of Large Vision-Language Models", CVPR 2024; authors'
code: github.com/jusiro/CLAP, ``trainers/adapters.py``, run as ``ZS none`` and ``ZS l2``).

    logits(x) = 100 * <x / |x|, w_k / |w_k|>          w_k starts at t_k (class k's text weight)
    zs-lp:  min  CE
    clap:   min  CE + mean_k lambda_k |w_k - t_k|^2
            lambda_k = mean over class k's shots of softmax(100 <x, t>)_k  (its zero-shot confidence)

The CLAP multipliers are fixed at their zero-shot values, as the published runs (constraint
``l2``; the code's adaptive outer step, constraint ``adaptative``, is not used by them and not
here). Both train with the authors' recipe (``SGD_lr1e-1_B256_ep300``): SGD with momentum 0.9,
no weight decay, 300 epochs, learning rate 1e-5 for the first epoch then cosine from 0.1, each
epoch as many mini-batches of 256 rows as the shots fill (at least one), the rows shuffled, and
the last epoch's weights kept. Neither looks at validation data: nothing is chosen.

Rows are the shots, one row per shot, or every stored augmented view of a shot (the authors
encode 20 augmented crops of each shot and train on all of them; the per-epoch batch count
still counts images, as theirs), each row L2-normalised.

Batched over episodes: every episode trains its own (N, D) weights in one (E, ...) tensor; the
shuffles come from a generator seeded with the fit's seed, so refitting gives the same head.
In the episodic regime a support of novel classes is trained the same way (text weights through
the base-class bridge when image and text spaces differ); classes with no shot keep their text
weights (zero-shot).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fskd.classifiers.base import FittedHead
from fskd.classifiers.cache import TEXT_SCALE
from fskd.methods.adapt.coop import dassl_lr
from fskd.methods.adapt.method import AdaptMethod, AdaptOptions, Fit
from fskd.methods.adapt.regimes import (
    ALLWAY,
    EPISODIC,
    RegimeHead,
    allway_views,
    keep_allway_head,
    kept_allway_head,
    learned_mask,
    record_views,
)
from fskd.methods.adapt.text_space import TextSpace, embed_views, regime_text_space, state_text
from fskd.methods.base import METHODS, MethodState

EPOCHS = 300
LR = 0.1
BATCH = 256
MOMENTUM = 0.9
WARMUP_LR = 1e-5
RECIPE = "the authors' SGD_lr1e-1_B256_ep300 config; no validation data"
NORMALISATION = (
    "L2 per row (per stored view) and per class weight, in every forward pass (the authors' forward_lp); "
    "a non-joint store's rows are centred on the support mean first (fskd's bridge space)"
)


@dataclass(frozen=True)
class CLAPOptions(AdaptOptions):
    epochs: int = EPOCHS  # passes over the shots (the authors' 300)
    lr: float = LR
    batch_size: int = BATCH
    ridge: float | None = None

    RANGES = {"epochs": (">=", 1), "lr": (">", 0), "batch_size": (">=", 1), "ridge": (">", 0)}


def zero_shot_confidence(x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """CLAP's multipliers: lambda (E, N), the mean softmax probability of each class over its own
    rows under the zero-shot classifier. x (E, R, D) normalised rows, y (E, R) way labels."""
    N = w0.shape[1]
    p = torch.softmax(TEXT_SCALE * torch.bmm(x, F.normalize(w0, dim=-1).transpose(1, 2)), -1)
    onehot = F.one_hot(y, N).to(p.dtype)
    return (p * onehot).sum(1) / onehot.sum(1).clamp_min(1)


def train_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    images: int,
    w0: torch.Tensor,
    constraint: bool,
    seed: int,
    epochs: int = EPOCHS,
    lr: float = LR,
    batch: int = BATCH,
    form: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ZS-LP (``constraint=False``) or CLAP, batched over episodes.

    x (E, R, D) L2-normalised rows, y (E, R) way labels, ``images``: the number of images behind
    the R rows (rows / views), which sets the batches per epoch, w0 (E, N, D) text weights.
    Returns the trained weights (E, N, D) and CLAP's multipliers (E, N) (None for ZS-LP).

    ``form``: "primal" trains the (E, N, D) weights with autograd; "dual" trains the same SGD in
    coefficients, w_k = a_k t_k + X^T c_k (every gradient, and so every momentum buffer, lies in
    that span), with R x R Gram matrices: the same weights, far fewer values per step while
    R <= 2 D (600 episodes of 5 x 5 shots: 26 coefficients per class instead of 1280 values);
    "auto" picks by that rule.
    """
    from fskd.classifiers.linear import gram_form

    lam = zero_shot_confidence(x, y, w0) if constraint else None
    if form == "auto":
        form = "dual" if gram_form(x.shape[1], x.shape[2]) else "primal"
    run = _train_dual if form == "dual" else _train_primal
    return run(x, y, images, w0, lam, seed, epochs, lr, batch), lam


def _batches(E: int, R: int, images: int, batch: int, epochs: int, lr: float, seed: int, device):
    """The authors' loop: per epoch its learning rate and the row indices (E, B) of each batch
    (None: every row, when one batch holds them all and shuffling changes nothing)."""
    per_epoch = images // batch if images >= batch else 1  # Dassl's loader: drop_last when it fills a batch
    whole = per_epoch == 1 and R <= batch
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    for epoch in range(epochs):
        order = None if whole else torch.rand(E, R, generator=g).argsort(-1).to(device)
        for i in range(per_epoch):
            yield dassl_lr(epoch, epochs, lr, WARMUP_LR), (None if whole else order[:, i * batch : (i + 1) * batch])


def _train_primal(x, y, images, w0, lam, seed, epochs, lr, batch) -> torch.Tensor:
    E, R, D = x.shape
    w, buf = w0.clone(), None
    for step, idx in _batches(E, R, images, batch, epochs, lr, seed, x.device):
        xb = x if idx is None else torch.gather(x, 1, idx[..., None].expand(-1, -1, D))
        yb = y if idx is None else torch.gather(y, 1, idx)
        w = w.detach().requires_grad_(True)
        logits = TEXT_SCALE * torch.bmm(xb, F.normalize(w, dim=-1).transpose(1, 2))
        loss = F.cross_entropy(logits.transpose(1, 2), yb, reduction="none").mean(1)  # (E,)
        if lam is not None:
            loss = loss + (lam * (w - w0).pow(2).sum(-1)).mean(-1)
        (grad,) = torch.autograd.grad(loss.sum(), w)
        buf = grad if buf is None else MOMENTUM * buf + grad  # torch.optim.SGD's momentum, no dampening
        w = w.detach() - step * buf
    return w.detach()


def _train_dual(x, y, images, w0, lam, seed, epochs, lr, batch) -> torch.Tensor:
    """The primal SGD in coefficients (a (E, N), c (E, N, R)) of w_k = a_k t_k + X^T c_k.

    With raw_bk = x_b . w_k and n_k = |w_k|, the loss gradient in w_k is
    (s / n_k) sum_b d_bk x_b - (s / n_k^3) (sum_b d_bk raw_bk) w_k (d = (softmax - onehot) / B,
    s = 100), and CLAP's penalty adds 2 lambda_k / N (w_k - t_k): all in the span."""
    E, R, D = x.shape
    N = w0.shape[1]
    gram = torch.bmm(x, x.transpose(1, 2))  # (E, R, R)
    xt = torch.bmm(x, w0.transpose(1, 2))  # (E, R, N): x_r . t_k
    tt = w0.pow(2).sum(-1)  # (E, N)
    a, c = w0.new_ones(E, N), w0.new_zeros(E, N, R)
    buf_a = buf_c = None
    onehot_all = F.one_hot(y, N).to(x.dtype)
    for step, idx in _batches(E, R, images, batch, epochs, lr, seed, x.device):
        gc_rows = torch.bmm(c, gram)  # (E, N, R): (G c_k)_r = x_r . X^T c_k
        norm = (a * a * tt + 2 * a * (c * xt.transpose(1, 2)).sum(-1) + (gc_rows * c).sum(-1)).clamp_min(1e-30).sqrt()
        raw_all = gc_rows.transpose(1, 2) + xt * a[:, None, :]  # (E, R, N): x_r . w_k
        if idx is None:
            raw, onehot = raw_all, onehot_all
        else:
            raw = torch.gather(raw_all, 1, idx[..., None].expand(-1, -1, N))
            onehot = torch.gather(onehot_all, 1, idx[..., None].expand(-1, -1, N))
        B = raw.shape[1]
        d = (torch.softmax(TEXT_SCALE * raw / norm[:, None, :], -1) - onehot) / B  # (E, B, N)
        gamma = TEXT_SCALE / norm.pow(3) * (d * raw).sum(1)  # (E, N)
        ga, gc = -gamma * a, -gamma[..., None] * c
        row = (TEXT_SCALE / norm)[..., None] * d.transpose(1, 2)  # (E, N, B)
        gc = gc + row if idx is None else gc.scatter_add(2, idx[:, None, :].expand(-1, N, -1), row)
        if lam is not None:
            ga, gc = ga + 2 * lam / N * (a - 1), gc + (2 * lam / N)[..., None] * c
        buf_a = ga if buf_a is None else MOMENTUM * buf_a + ga
        buf_c = gc if buf_c is None else MOMENTUM * buf_c + gc
        a, c = a - step * buf_a, c - step * buf_c
    return a[..., None] * w0 + torch.bmm(c, x)


class FittedCosine(FittedHead):
    """100 * cos(query, w) on embedded queries (the authors' forward_lp)."""

    def __init__(self, weights: torch.Tensor, embed) -> None:
        self.weights, self.embed = F.normalize(weights, dim=-1), embed

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        return TEXT_SCALE * torch.bmm(F.normalize(self.embed(query), dim=-1), self.weights.transpose(1, 2))


def training_rows(ts: TextSpace, views: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows (E, R, D), way labels (E, R) and the number of images: the embedded support, or the
    embedded views of the shots (E, V, N*K, D) when given."""
    from fskd.classifiers.linear import way_labels

    E, N, K, D = ts.support.shape
    y = way_labels(E, N, K, ts.support.device)
    if views is None:
        return ts.support.reshape(E, N * K, D), y, N * K
    e = embed_views(ts, views)  # (E, V, N*K, D)
    V = e.shape[1]
    return e.reshape(E, V * N * K, -1), y.repeat(1, V), N * K


class ZeroShotLinearProbe(AdaptMethod):
    """Linear probe from the zero-shot text weights (the authors' recipe; no validation data)."""

    needs_text = True
    transfers_to_new_classes = True  # classes with no shot keep their text weights (zero-shot)
    constraint = False

    name = "zs-lp"
    options = CLAPOptions

    def fit_state(self, f: Fit) -> None:
        store, config, opts, device, state = f.store, f.config, f.opts, f.device, f.state
        user = set(config.options)
        for k, v in (("epochs", opts.epochs), ("lr", opts.lr), ("batch_size", opts.batch_size)):
            state.hparams[k] = v
            state.selected_on[k] = "fixed (--set option)" if k in user else f"fixed ({RECIPE})"
        state.hparams["constraint"] = (
            "class-adaptive l2 to the text weights, lambda_k = zero-shot confidence of class k's shots"
            if self.constraint
            else "none"
        )
        state.selected_on["constraint"] = (
            "fixed (the authors' CLAP: constraint l2, multipliers from the shots, no validation data)"
            if self.constraint
            else "fixed (the authors' ZS-LP)"
        )
        state.hparams["normalisation"] = NORMALISATION
        state.selected_on["normalisation"] = "fixed (the authors' code)"
        if config.shots > 0:  # train the all-way head on the state's own shots once, and keep it
            own = f.own_shots()
            views, why = allway_views(store, config, device)
            ts = f.spaces()[ALLWAY](own.support, own.classes)
            w, lam = train_probe(
                *training_rows(ts, views),
                ts.weights,
                self.constraint,
                config.seed,
                opts.epochs,
                opts.lr,
                opts.batch_size,
            )
            record_views(state, ALLWAY, views, why)
            keep_allway_head(state, own, {"weights": w})
            if lam is not None:
                state.metrics["allway.lambda_mean"] = round(float(lam.mean()), 4)

    def make_head(self, state: MethodState, store, device: torch.device):
        text, bridge = state_text(state, device)
        recipe = {k: state.hparams[k] for k in ("epochs", "lr", "batch_size")}
        seed = int(state.config.get("seed", 1))

        def make(regime: str):
            def fit(support, classes):
                ts = regime_text_space(state, store, regime, support, classes, bridge, text)
                if ts.support.shape[2] == 0:  # no shot: the text weights (zero-shot)
                    return FittedCosine(ts.weights, ts.embed)
                kept = kept_allway_head(state, support, classes) if regime == ALLWAY else None
                if kept is not None:
                    return FittedCosine(kept["weights"], ts.embed)
                w, _ = train_probe(
                    *training_rows(ts),
                    ts.weights,
                    self.constraint,
                    seed,
                    recipe["epochs"],
                    recipe["lr"],
                    recipe["batch_size"],
                )
                return FittedCosine(w, ts.embed)

            return fit

        return RegimeHead(self.name, learned_mask(store, device), make(EPISODIC), make(ALLWAY), needs_text=True)


class CLAP(ZeroShotLinearProbe):
    """CLAP: the zero-shot-initialised probe with a class-adaptive l2 penalty toward the text weights."""

    constraint = True
    name = "clap"


METHODS.register("zs-lp", ZeroShotLinearProbe)
METHODS.register("clap", CLAP)
