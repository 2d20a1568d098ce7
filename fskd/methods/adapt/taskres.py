"""``taskres``: the zero-shot text classifier plus a learned task residual (Yu et al., "Task
Residual for Tuning Vision-Language Models", CVPR 2023; authors' code: github.com/geekyutao/TaskRes,
``trainers/taskres.py``, ``train_regular.sh``, ``configs/trainers/TaskRes/adam_lr2e-3_B256_ep*.yaml``
on Dassl's defaults).

    w_k = t_k + alpha * r_k             t_k: class k's text weight (frozen), r_k: learned, r = 0 at start
    logits_k(x) = 100 * <x / |x|, w_k / |w_k|>

r is trained on the shots by cross-entropy with the authors' "regular base" recipe: Adam (betas
0.9 / 0.999, eps 1e-8) with Dassl's default weight decay 5e-4 as an L2 term in r's gradient,
learning rate 2e-3 (their ImageNet runs use 2e-4: ``--set lr=2e-4``), 100 epochs at K <= 4 shots
and 200 above (their ep100 configs at 1, 2, 4 shots, ep200 at 8, 16), Dassl's 1-epoch constant
warm-up at 1e-5 then cosine, each epoch as many shuffled mini-batches of 256 images as the shots
fill (at least one: Dassl drops the last partial batch once the shots fill one), alpha 0.5 (their
value on 10 of 11 datasets; 1.0 on Flowers102), the last epoch's residual kept. No validation
data is used unless ``alpha`` is a list: then alpha is chosen on validation (the all-way task's
val rows, val-class episodes in the episodic regime), which is fskd's addition (the authors fix
alpha per dataset).

The base is the store's class text (the regular base): fskd's prompt templates, each prompt
embedding L2-normalised, averaged and renormalised; the authors average the raw CLIP text
features of their per-dataset template (CoOp's one, plus 7 on ImageNet) without normalising, so
fskd's t_k has unit norm where theirs has CLIP's text norm, and alpha * r moves it relatively
more (Adam's steps do not scale with the gradient). Their "enhanced base" (a text projection
tuned by a linear probe, downloaded from their drive) is not offered.

Rows: one per shot, each L2-normalised; with the store's augmented views of the shots
(``fskd extract --augment-views``: RandomResizedCrop + flip, the authors' training transform)
each epoch draws one view of every shot at random (seeded), as the authors see one new crop of
every image per epoch; the batch count counts shots.

Batched over episodes (and over candidate alphas): every episode trains its own (N, D) residual
in one (E, N, D) tensor with a hand-written gradient and torch.optim.Adam's update (checked
against both in tests/test_baselines_taskres.py); the shuffles and view draws come from a
generator seeded with the fit's seed and are shared by the candidate alphas, so refitting one
alpha gives the head the search kept. Classes with no shot get r = 0 (their text weight,
zero-shot): the authors' residual exists only for the classes it was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fskd.classifiers.cache import TEXT_SCALE
from fskd.methods.adapt.clap import WARMUP_LR, FittedCosine
from fskd.methods.adapt.coop import dassl_lr
from fskd.methods.adapt.method import AdaptMethod, AdaptOptions, Fit
from fskd.methods.adapt.regimes import (
    ALLWAY,
    EPISODIC,
    RegimeHead,
    Task,
    keep_allway_head,
    kept_allway_head,
    learned_mask,
)
from fskd.methods.adapt.text_space import TextSpace, regime_text_space, shot_rows, state_text
from fskd.methods.adapt.validation import VAL_RANGES, Choice, check_val_options, grid_search, hp
from fskd.methods.base import METHODS, MethodState

ALPHA = 0.5
LR = 2e-3
BATCH = 256
#: Dassl's OPTIM.WEIGHT_DECAY, which the authors' TaskRes configs do not override
WEIGHT_DECAY = 5e-4
BETAS = (0.9, 0.999)
EPS = 1e-8
#: the authors' train_regular.sh: ep100 configs at 1, 2 and 4 shots, ep200 at 8 and 16
FEW_SHOT_EPOCHS, MANY_SHOT_EPOCHS = 100, 200
RECIPE = "the authors' train_regular.sh: adam_lr2e-3_B256_ep100 (K <= 4) / _ep200 (K > 4), scale 0.5, regular base"
NORMALISATION = (
    "L2 per row (per stored view); the base text weights L2-normalised (the store's class text); "
    "t + alpha r renormalised in every forward pass (the authors' CustomCLIP); a non-joint store's rows "
    "are centred on the support mean first (fskd's bridge space)"
)


def default_epochs(shots: int) -> int:
    """The authors' epochs for K shots: 100 at K <= 4, 200 above (their configs cover 1-16)."""
    return FEW_SHOT_EPOCHS if shots <= 4 else MANY_SHOT_EPOCHS


@dataclass(frozen=True)
class TaskResOptions(AdaptOptions):
    alpha: float | tuple[float, ...] = ALPHA  # residual scale (the authors' 0.5; a list: chosen on validation)
    epochs: int | None = None  # passes over the shots (null: the authors' 100 at K <= 4 shots, 200 above)
    lr: float = LR  # Adam's learning rate (the authors' 2e-3; 2e-4 in their ImageNet runs)
    batch_size: int = BATCH
    weight_decay: float = WEIGHT_DECAY  # Adam's L2 term on the residual (Dassl's default, kept by the authors)
    ridge: float | None = None
    val_way: int = 5
    val_query: int = 15
    val_episodes: int = 300

    RANGES = {
        "alpha": (">=", 0),
        "epochs": (">=", 1),
        "lr": (">", 0),
        "batch_size": (">=", 1),
        "weight_decay": (">=", 0),
        "ridge": (">", 0),
        **VAL_RANGES,
    }

    def __post_init__(self) -> None:
        check_val_options(self)


# -- training ---------------------------------------------------------------------------------------
def residual_grad(
    x: torch.Tensor, onehot: torch.Tensor, t: torch.Tensor, r: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """d mean-CE / d r of one batch, batched: x (E, B, D) L2-normalised rows, onehot (E, B, N),
    t and r (E, N, D), alpha (E, 1, 1). With w = t + alpha r, n = |w|, w^ = w / n:
    dL/dw^_k = 100 sum_b d_bk x_b (d = (softmax - onehot) / B), dL/dw_k = (I - w^_k w^_k^T) dL/dw^_k / n_k,
    dL/dr = alpha dL/dw."""
    w = t + alpha * r
    norm = w.norm(dim=-1, keepdim=True)
    wn = w / norm
    d = (torch.softmax(TEXT_SCALE * torch.bmm(x, wn.transpose(1, 2)), -1) - onehot) / x.shape[1]
    gwn = TEXT_SCALE * torch.bmm(d.transpose(1, 2), x)
    return alpha * (gwn - wn * (wn * gwn).sum(-1, keepdim=True)) / norm


def adam_step(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: float) -> None:
    """torch.optim.Adam's update (no amsgrad), in place; ``step`` counts from 1."""
    b1, b2 = BETAS
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    denom = (v.sqrt() / math.sqrt(1 - b2**step)).add_(EPS)
    p.addcdiv_(m, denom, value=-lr / (1 - b1**step))


def train_residual(
    rows: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    alphas: Sequence[float],
    seed: int,
    epochs: int,
    lr: float = LR,
    batch: int = BATCH,
    weight_decay: float = WEIGHT_DECAY,
) -> torch.Tensor:
    """The task residual of every episode for every alpha: (A, E, N, D).

    rows (E, V, S, D): V >= 1 embedded (L2-normalised) rows of each of S shots (V > 1: stored
    views, one drawn per shot per epoch); y (E, S) way labels; t (E, N, D) the text weights.
    The draws (views, shuffles) depend on the seed and E only, so every alpha sees the same
    batches as it would alone."""
    E, V, S, D = rows.shape
    N, A = t.shape[1], len(alphas)
    a = torch.tensor([float(x) for x in alphas], dtype=t.dtype, device=t.device).repeat_interleave(E)[:, None, None]
    tt = t.repeat(A, 1, 1)
    r, m, v = (torch.zeros_like(tt) for _ in range(3))
    onehot = F.one_hot(y, N).to(t.dtype)
    per_epoch = S // batch if S >= batch else 1  # Dassl's loader: drop_last once the shots fill a batch
    whole = per_epoch == 1 and S <= batch
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    step = 0
    for epoch in range(epochs):
        lr_e = dassl_lr(epoch, epochs, lr, WARMUP_LR)
        x = rows[:, 0]
        if V > 1:
            pick = torch.randint(V, (E, 1, S, 1), generator=g).to(rows.device)
            x = torch.gather(rows, 1, pick.expand(E, 1, S, D))[:, 0]
        order = None if whole else torch.rand(E, S, generator=g).argsort(-1).to(rows.device)
        for i in range(per_epoch):
            if order is None:
                xb, ob = x, onehot
            else:
                idx = order[:, i * batch : (i + 1) * batch]
                xb = torch.gather(x, 1, idx[..., None].expand(-1, -1, D))
                ob = torch.gather(onehot, 1, idx[..., None].expand(-1, -1, N))
            grad = residual_grad(xb.repeat(A, 1, 1), ob.repeat(A, 1, 1), tt, r, a)
            if weight_decay:
                grad = grad.add(r, alpha=weight_decay)
            step += 1
            adam_step(r, grad, m, v, step, lr_e)
    return r.reshape(A, E, N, D)


def fit_residuals(
    ts: TextSpace, alphas: Sequence[float], seed: int, recipe: dict, views: torch.Tensor | None = None
) -> torch.Tensor:
    """(A, E, N, D) residuals of a text space's support for each alpha, with the recipe's
    epochs (null: the authors' epochs for the support's K)."""
    K = ts.support.shape[2]
    epochs = recipe["epochs"] or default_epochs(K)
    rows, y = shot_rows(ts, views)
    return train_residual(
        rows, y, ts.weights, alphas, seed, epochs, recipe["lr"], recipe["batch_size"], recipe["weight_decay"]
    )


def search_alpha(
    task: Task | None,
    space,
    alphas: Sequence[float],
    default: dict,
    seed: int,
    recipe: dict,
    views: torch.Tensor | None = None,
) -> Choice:
    """alpha by accuracy on ``task`` (every alpha trained in one batch); ``fitted``: the winner's residual."""
    if task is None or task.shot == 0:
        return grid_search([], lambda c: 0.0, None, default)
    ts = space(task.support, task.classes)
    r = fit_residuals(ts, alphas, seed, recipe, views)  # (A, E, N, D)
    q = F.normalize(ts.embed(task.query), dim=-1)
    acc = {}
    for i, a in enumerate(alphas):
        w = F.normalize(ts.weights + float(a) * r[i], dim=-1)
        acc[i] = task.accuracy(torch.bmm(q, w.transpose(1, 2)))
    cands = [{"alpha": float(a)} for a in alphas]
    choice = grid_search(cands, lambda c: acc[cands.index(c)], task, default)
    if choice.score is not None:
        choice.fitted = r[cands.index(choice.params)]
    return choice


class TaskRes(AdaptMethod):
    """Text weights + a learned task residual (the authors' regular-base recipe; alpha fixed unless a list)."""

    needs_text = True
    transfers_to_new_classes = True  # a class with no shot has no residual: its text weight (zero-shot)

    name = "taskres"
    options = TaskResOptions

    def fit_state(self, f: Fit) -> None:
        config, opts, state = f.config, f.opts, f.state
        user = set(config.options)
        recipe = {
            "epochs": opts.epochs,
            "lr": opts.lr,
            "batch_size": opts.batch_size,
            "weight_decay": opts.weight_decay,
        }
        for k, v in recipe.items():
            state.hparams[k] = v
            state.selected_on[k] = "fixed (--set option)" if k in user else f"fixed ({RECIPE})"
        if opts.epochs is None:
            state.selected_on["epochs"] += "; null: 100 epochs at K <= 4 shots, 200 above, by each support's K"
        state.hparams["init"] = "r = 0"
        state.selected_on["init"] = "fixed (the authors' TaskResLearner: zeros)"
        state.hparams["base"] = "the store's class text (regular base)"
        state.selected_on["base"] = "fixed (the authors' ENHANCED_BASE none; the enhanced base is not offered)"
        state.hparams["normalisation"] = NORMALISATION
        state.selected_on["normalisation"] = "fixed (the authors' code)"
        kept = f.fixed_or_chosen(
            "alpha",
            opts.alpha,
            ALPHA,
            RECIPE,
            lambda task, space, cands, first, views: search_alpha(
                task, space, cands, first, config.seed, recipe, views
            ),
            lambda ts, alpha, views: fit_residuals(ts, [alpha], config.seed, recipe, views)[0],
        )
        if config.shots > 0:
            state.hparams["allway.epochs"] = opts.epochs or default_epochs(config.shots)
            state.selected_on["allway.epochs"] = state.selected_on["epochs"]
        if kept is not None:
            keep_allway_head(state, kept[0], {"residual": kept[1]})
            state.metrics["allway.residual_norm"] = round(float(kept[1].norm(dim=-1).mean()), 4)

    def make_head(self, state: MethodState, store, device: torch.device):
        text, bridge = state_text(state, device)
        recipe = {k: state.hparams[k] for k in ("epochs", "lr", "batch_size", "weight_decay")}
        seed = int(state.config.get("seed", 1))

        def make(regime: str):
            alpha = float(hp(state, regime, "alpha"))

            def fit(support, classes):
                ts = regime_text_space(state, store, regime, support, classes, bridge, text)
                if ts.support.shape[2] == 0:  # no shot, no residual: the text weights (zero-shot)
                    return FittedCosine(ts.weights, ts.embed)
                kept = kept_allway_head(state, support, classes) if regime == ALLWAY else None
                r = kept["residual"] if kept is not None else fit_residuals(ts, [alpha], seed, recipe)[0]
                return FittedCosine(ts.weights + alpha * r, ts.embed)

            return fit

        return RegimeHead(self.name, learned_mask(store, device), make(EPISODIC), make(ALLWAY), needs_text=True)


METHODS.register("taskres", TaskRes)
