"""``cross-modal-lp``: the cross-modal linear probe (Lin et al., "Multimodality Helps Unimodality:
Cross-Modal Few-Shot Learning with Multimodal Models", CVPR 2023; authors' code:
github.com/linzhiqiu/cross_modal_adaptation, ``train.py``, ``engine/optimizer/default.py``
(``HYPER_DICT['linear']``), ``engine/model/head.py``, ``engine/model/logit.py``, ``eval.py``).

A linear head on L2-normalised features, trained on the image shots *and* the class text
features, each text feature one more training sample of its class:

    logits(x) = 100 * (x / |x|) W^T              W (N, D), no bias, starts at the normalised text weights
    each step: a batch of b - floor(b / 2) image rows and floor(b / 2) text rows, one mean cross-entropy

The recipe is the authors' ``linear`` search: AdamW (betas 0.9 / 0.999, eps 1e-8, decoupled
weight decay), learning rate in (1e-3, 1e-4), weight decay in (0, 1e-2, 1e-4), batch size in
(8, 32) (half text), 12800 steps on a schedule of linear warm-up from 1e-5 over 50 steps then
cosine over 12800, the two halves drawn by two shuffled loaders that drop the last partial batch
and restart when exhausted. The validation accuracy is measured after steps 1, 101, 201, ...
(their ``EVAL_FREQ`` 100) and every candidate keeps its best checkpoint (earliest on ties); the
candidate with the best validation accuracy wins (the first in the authors' loop order lr,
weight decay, batch size on ties). A batch size is a candidate only where each half is smaller
than its set (their ``get_valid_batch_sizes``); where none is, fskd takes the smallest with each
half cut to its set (their code stops there).

Validation, as every fskd method: the all-way task's val rows (CoOp's min(K, 4) per class, as
the authors' few-shot val split; ``--hp-selection``), or, in the episodic regime, N-way K-shot
episodes of the val classes, where the winner (lr, weight decay, batch size, steps) is then
trained on each novel support for that many steps on the same schedule. Episodic validation
trains 12800 steps per candidate per episode, so this method draws 50 val episodes by default,
not 300.

Text rows: the store's one class text per class (fskd's templates averaged), in image space
through the bridge on a non-joint store; the authors use every template's text feature as a
sample (one CoOp template on 10 datasets, 7 on ImageNet). Image rows: one per shot, plus every
stored augmented view of the shot (``fskd extract --augment-views``) as extra rows, as the
authors add a flipped view to the centre crop. The head is ``--classifier_init zeroshot`` of
their README (their ``linear_probe.sh`` runs ``random``, not offered).

Batched: every (lr, weight decay) pair of a batch size and every episode trains at once, as
(P, E, N, D) weights under one torch.optim.AdamW with a parameter group per pair; the batches
come from a generator seeded with the fit's seed, shared by the pairs, so refitting the winner
alone gives the head the search kept. Classes with no shot keep their text weights (zero-shot).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fskd.classifiers.base import FittedHead
from fskd.classifiers.cache import TEXT_SCALE
from fskd.classifiers.linear import way_labels
from fskd.methods.adapt.method import AdaptMethod, AdaptOptions, Fit
from fskd.methods.adapt.regimes import (
    ALLWAY,
    EPISODIC,
    RegimeHead,
    Task,
    allway_views,
    keep_allway_head,
    kept_allway_head,
    learned_mask,
    record_views,
)
from fskd.methods.adapt.text_space import TextSpace, embed_views, regime_text_space, state_text
from fskd.methods.adapt.validation import VAL_RANGES, Choice, check_val_options, fixed_or, grid_search, hp, record
from fskd.methods.base import METHODS, MethodState, TrainProgress

#: the authors' HYPER_DICT['linear'], in their loop order
LR = (1e-3, 1e-4)
WEIGHT_DECAY = (0.0, 1e-2, 1e-4)
BATCH = (8, 32)
ITERS = 12800
WARMUP_ITERS = 50
WARMUP_LR = 1e-5
#: train.py: CROSS_MODAL_BATCH_RATIO and EVAL_FREQ
TEXT_RATIO = 0.5
EVAL_EVERY = 100
BETAS = (0.9, 0.999)
#: fskd's default for this method (the others draw 300): each val episode trains every candidate 12800 steps
VAL_EPISODES = 50
RECIPE = "the authors' HYPER_DICT['linear'] search"
NORMALISATION = (
    "L2 per image row (per stored view) and per text row, in every forward pass (the authors' "
    "LogitHead); W starts at the L2-normalised text weights and is not normalised; a non-joint store's "
    "rows are centred on the support mean first (fskd's bridge space)"
)


@dataclass(frozen=True)
class CrossModalOptions(AdaptOptions):
    lr: float | tuple[float, ...] | None = (
        None  # AdamW learning rate (null: the authors' 1e-3, 1e-4, chosen on validation)
    )
    weight_decay: float | tuple[float, ...] | None = (
        None  # AdamW decoupled decay (null: the authors' 0, 1e-2, 1e-4, chosen on validation)
    )
    batch_size: int | tuple[int, ...] | None = (
        None  # rows per step, half of them text (null: the authors' 8, 32, chosen on validation)
    )
    iters: int = ITERS  # length of the warm-up + cosine schedule and most steps (the authors' 12800)
    eval_every: int = (
        EVAL_EVERY  # the step count is chosen on validation among 1, 1 + eval_every, ... (the authors' 100)
    )
    warmup_iters: int = WARMUP_ITERS  # linear warm-up steps from 1e-5 (the authors' 50)
    text_ratio: float = (
        TEXT_RATIO  # share of each batch that is class text (the authors' 0.5; 0: their uni-modal probe)
    )
    ridge: float | None = None
    val_way: int = 5
    val_query: int = 15
    val_episodes: int = VAL_EPISODES  # validation episodes that choose the hyper-parameters (fewer than other methods: each trains every candidate)

    RANGES = {
        "lr": (">", 0),
        "weight_decay": (">=", 0),
        "batch_size": (">=", 1),
        "iters": (">=", 1),
        "eval_every": (">=", 1),
        "warmup_iters": (">=", 0),
        "text_ratio": (">=", 0),
        "ridge": (">", 0),
        **VAL_RANGES,
    }
    MAXIMA = {"eval_every": 1_000_000, "warmup_iters": 1_000_000, "text_ratio": 1}

    def __post_init__(self) -> None:
        check_val_options(self)


# -- the schedule and the batches -----------------------------------------------------------------
def lr_at(step: int, base: float, iters: int = ITERS, warmup: int = WARMUP_ITERS) -> float:
    """The authors' scheduler at (0-based) step ``step``: 1e-5 at step 0, base * step / warmup
    during the warm-up, then CosineAnnealingLR over ``iters`` (not counting the warm-up)."""
    if step < warmup:
        return WARMUP_LR if step == 0 else base * step / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / iters))


def halves(batch: int, ratio: float) -> tuple[int, int]:
    """(image rows, text rows) of a batch: text int(batch * ratio), as the authors."""
    t = int(batch * ratio)
    return batch - t, t


def valid_batch_sizes(sizes: Sequence[int], n_image: int, n_text: int, ratio: float) -> tuple[list[int], str]:
    """The authors' get_valid_batch_sizes: each non-empty half smaller than its set. When none
    is, the smallest size (each half cut to its set by :class:`Loader`), and why."""
    ok = []
    for b in sizes:
        i, t = halves(b, ratio)
        if (t == 0 or t < n_text) and (i == 0 or i < n_image):
            ok.append(int(b))
    if ok:
        dropped = [b for b in sizes if b not in ok]
        return ok, (
            f"batch sizes {dropped} left out (a half not smaller than its {n_image} image / {n_text} text "
            f"rows, the authors' rule)"
            if dropped
            else ""
        )
    b = int(min(sizes))
    return [b], (
        f"no batch size has both halves smaller than the {n_image} image / {n_text} text rows (the "
        f"authors' code stops): {b}, each half cut to its set"
    )


class Loader:
    """A shuffling loader that drops the last partial batch and restarts when exhausted (a
    DataLoader(shuffle=True, drop_last=True) iterated as the authors' train loop), batched over
    E episodes (each its own order). A batch as large as the set is every row (order unused)."""

    def __init__(self, n: int, batch: int, episodes: int, generator: torch.Generator, device) -> None:
        self.n, self.b, self.E, self.g, self.device = n, min(batch, n), episodes, generator, device
        self.pos, self.order = n, None

    def next(self) -> torch.Tensor | None:
        """(E, b) row indices, or None for every row."""
        if self.b == self.n:
            return None
        if self.pos + self.b > self.n:
            self.order, self.pos = torch.rand(self.E, self.n, generator=self.g).argsort(-1).to(self.device), 0
        idx = self.order[:, self.pos : self.pos + self.b]
        self.pos += self.b
        return idx


def _take(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if idx is None:
        return x, y
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1])), torch.gather(y, 1, idx)


def _adamw(params: list[torch.Tensor], lrs: Sequence[float], wds: Sequence[float]) -> torch.optim.Optimizer:
    groups = [
        {"params": [p], "lr": float(lr), "weight_decay": float(wd)} for p, lr, wd in zip(params, lrs, wds, strict=True)
    ]
    try:  # one fused kernel per step where torch has it (the same update as the loop form)
        return torch.optim.AdamW(groups, betas=BETAS, eps=1e-8, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, betas=BETAS, eps=1e-8)


@dataclass
class Trained:
    """What :func:`train_probe` returns: the weights after the last step (P, E, N, D), the
    validation accuracy at each checkpoint (P, C) and the steps of the checkpoints (C,), and
    each pair's weights at its best checkpoint (P, E, N, D) (the last two None without validation)."""

    weights: torch.Tensor
    history: torch.Tensor | None
    checkpoints: list[int]
    best: torch.Tensor | None


def train_probe(
    image: torch.Tensor,
    image_y: torch.Tensor,
    text: torch.Tensor,
    text_y: torch.Tensor,
    w0: torch.Tensor,
    lrs: Sequence[float],
    wds: Sequence[float],
    batch: int,
    steps: int,
    seed: int,
    iters: int = ITERS,
    warmup: int = WARMUP_ITERS,
    ratio: float = TEXT_RATIO,
    score: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eval_every: int = EVAL_EVERY,
    keep_best: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Trained:
    """The authors' training of P = len(lrs) heads (pairs lrs[p], wds[p]) on E episodes at once.

    image (E, Ri, D) and text (E, Rt, D) L2-normalised rows with way labels (E, Ri) / (E, Rt);
    w0 (E, N, D) the initial weights; ``steps`` optimiser steps on the schedule of ``iters``.
    ``score``: weights (P, E, N, D) -> (P,) validation accuracy, called after steps 1, 1 +
    eval_every, ... (the authors' ``i % EVAL_FREQ == 0``); ``keep_best`` keeps each pair's
    weights at its best checkpoint (strictly better replaces: the earliest best is kept)."""
    E, N, D = w0.shape
    P = len(lrs)
    W = w0[None].repeat(P, 1, 1, 1).contiguous()
    G = torch.zeros_like(W)
    params = [W[p] for p in range(P)]  # views into W: the optimiser updates W in place
    for p in range(P):
        params[p].grad = G[p]
    opt = _adamw(params, lrs, wds)
    b_img, b_txt = halves(batch, ratio)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    loaders = [
        (Loader(image.shape[1], b_img, E, g, w0.device), image, image_y) if b_img > 0 and image.shape[1] else None,
        (Loader(text.shape[1], b_txt, E, g, w0.device), text, text_y) if b_txt > 0 and text.shape[1] else None,
    ]
    loaders = [ld for ld in loaders if ld is not None]
    if not loaders:
        raise ValueError("cross-modal-lp: a batch with no image and no text row")
    history, checkpoints, best, best_acc = [], [], None, None
    for i in range(steps):
        parts = [_take(x, y, ld.next()) for ld, x, y in loaders]
        xb = torch.cat([p[0] for p in parts], 1) if len(parts) > 1 else parts[0][0]
        yb = torch.cat([p[1] for p in parts], 1) if len(parts) > 1 else parts[0][1]
        onehot = F.one_hot(yb, N).to(W.dtype)
        B = xb.shape[1]
        for p in range(P):  # d mean-CE / dW = 100 (softmax - onehot)^T x / B
            d = (torch.softmax(TEXT_SCALE * torch.bmm(xb, W[p].transpose(1, 2)), -1) - onehot).mul_(TEXT_SCALE / B)
            torch.bmm(d.transpose(1, 2), xb, out=G[p])
        for group, base in zip(opt.param_groups, lrs, strict=True):
            group["lr"] = lr_at(i, float(base), iters, warmup)
        opt.step()
        if score is not None and i % eval_every == 0:
            acc = score(W)
            history.append(acc)
            checkpoints.append(i + 1)
            if keep_best:
                better = acc > best_acc if best_acc is not None else torch.ones(P, dtype=torch.bool)
                best = W.clone() if best is None else torch.where(better.to(W.device)[:, None, None, None], W, best)
                best_acc = acc if best_acc is None else torch.maximum(acc, best_acc)
            if progress is not None:
                progress(i + 1)
    hist = torch.stack(history, 1) if history else None
    return Trained(W, hist, checkpoints, best)


# -- rows, scores, search -------------------------------------------------------------------------
def training_rows(ts: TextSpace, views: torch.Tensor | None = None):
    """Image rows (E, (1 + V) N K, D) with way labels, text rows (E, N, D) with way labels, and
    the initial weights (E, N, D): the embedded support (and its embedded stored views), the
    normalised text weights as samples and as W's start."""
    E, N, K, D = ts.support.shape
    y = way_labels(E, N, K, ts.support.device)
    img = ts.support.reshape(E, N * K, D)
    if views is not None:
        v = embed_views(ts, views)  # (E, V, N*K, D)
        img = torch.cat([img, v.reshape(E, -1, v.shape[-1])], 1)
        y = y.repeat(1, 1 + v.shape[1])
    t = F.normalize(ts.weights, dim=-1)
    ty = torch.arange(N, device=t.device)[None].expand(E, -1)
    return F.normalize(img, dim=-1), y, t, ty, t


def _scorer(task: Task, ts: TextSpace) -> Callable[[torch.Tensor], torch.Tensor]:
    """weights (P, E, N, D) -> (P,) mean accuracy over the task's episodes (its query rows)."""
    q = F.normalize(ts.embed(task.query), dim=-1)

    def score(W: torch.Tensor) -> torch.Tensor:
        pred = torch.stack([torch.bmm(q, w.transpose(1, 2)).argmax(-1) for w in W])  # (P, E, M)
        return (pred == task.truth[None]).float().mean((1, 2)).cpu()

    return score


def search(
    task: Task | None,
    space,
    grids: dict,
    opts,
    seed: int,
    views: torch.Tensor | None = None,
    progress: TrainProgress | None = None,
    tag: str = "",
) -> tuple[Choice, str]:
    """(lr, weight decay, batch size, steps) by validation accuracy on ``task``, in the authors'
    order (ties: the earlier); ``fitted``: the winner's weights at its best checkpoint (1, N, D)
    when the task has one episode (all-way). Returns the choice and a note on the batch sizes."""
    default = {
        "lr": grids["lr"][0],
        "weight_decay": grids["weight_decay"][0],
        "batch_size": grids["batch_size"][0],
        "steps": opts.iters,
    }
    if task is None or task.shot == 0:
        return grid_search([], lambda c: 0.0, None, default), ""
    ts = space(task.support, task.classes)
    img, iy, txt, ty, w0 = training_rows(ts, views)
    sizes, note = valid_batch_sizes(grids["batch_size"], img.shape[1], txt.shape[1], opts.text_ratio)
    pairs = [(lr, wd) for lr in grids["lr"] for wd in grids["weight_decay"]]
    score = _scorer(task, ts)
    acc, best = {}, {}
    for b in sizes:
        report = (lambda s, b=b: progress(f"{tag} batch {b}", s, opts.iters, {})) if progress else None
        run = train_probe(
            img,
            iy,
            txt,
            ty,
            w0,
            [p[0] for p in pairs],
            [p[1] for p in pairs],
            b,
            opts.iters,
            seed,
            opts.iters,
            opts.warmup_iters,
            opts.text_ratio,
            score,
            opts.eval_every,
            keep_best=task.support.shape[0] == 1,
            progress=report,
        )
        for j, (lr, wd) in enumerate(pairs):
            for c, s in enumerate(run.checkpoints):
                acc[(lr, wd, b, s)] = float(run.history[j, c])
            if run.best is not None:
                best[(lr, wd, b)] = run.best[j]
    cands = [
        {"lr": lr, "weight_decay": wd, "batch_size": b, "steps": s}
        for lr, wd in pairs
        for b in sizes
        for s in run.checkpoints
    ]
    choice = grid_search(cands, lambda c: acc[(c["lr"], c["weight_decay"], c["batch_size"], c["steps"])], task, default)
    p = choice.params
    choice.fitted = best.get((p["lr"], p["weight_decay"], p["batch_size"]))
    return choice, note


class FittedProbe(FittedHead):
    """100 * (q / |q|) W^T on embedded queries (the authors' LogitHead)."""

    def __init__(self, weights: torch.Tensor, embed) -> None:
        self.weights, self.embed = weights, embed

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        return TEXT_SCALE * torch.bmm(F.normalize(self.embed(query), dim=-1), self.weights.transpose(1, 2))


class CrossModalLinearProbe(AdaptMethod):
    """Linear probe on image shots + class text as samples, text-initialised (the authors' search on validation)."""

    needs_text = True
    transfers_to_new_classes = True  # a class with no shot keeps its text weight (zero-shot)

    name = "cross-modal-lp"
    options = CrossModalOptions

    def fit_state(self, f: Fit) -> None:
        store, config, opts, device, state, progress = f.store, f.config, f.opts, f.device, f.state, f.progress
        grids = {
            "lr": fixed_or(opts.lr, LR),
            "weight_decay": fixed_or(opts.weight_decay, WEIGHT_DECAY),
            "batch_size": fixed_or(opts.batch_size, BATCH),
        }
        fixed = {k for k in grids if getattr(opts, k) is not None and not isinstance(getattr(opts, k), tuple)}
        user = set(config.options)
        for k in ("iters", "warmup_iters", "eval_every", "text_ratio"):
            state.hparams[k] = getattr(opts, k)
            state.selected_on[k] = "fixed (--set option)" if k in user else f"fixed ({RECIPE})"
        state.hparams["init"] = "the L2-normalised text weights"
        state.selected_on["init"] = "fixed (the authors' --classifier_init zeroshot)"
        state.hparams["normalisation"] = NORMALISATION
        state.selected_on["normalisation"] = "fixed (the authors' code)"
        spaces = f.spaces()
        ep_task = f.episodic_task()
        ep, ep_note = search(
            ep_task, spaces[EPISODIC], grids, opts, config.seed, progress=progress, tag="cross-modal-lp episodic"
        )
        aw_task = f.allway_task()
        if aw_task is not None and aw_task.shot == 0:
            aw_task = None
        views, why = allway_views(store, config, device) if config.shots > 0 else (None, "no shots")
        aw, aw_note = search(
            aw_task, spaces[ALLWAY], grids, opts, config.seed, views, progress, "cross-modal-lp all-way"
        )
        record(state, EPISODIC, ep, fixed)
        record(state, ALLWAY, aw, fixed)
        for regime, choice, note in ((EPISODIC, ep, ep_note), (ALLWAY, aw, aw_note)):
            if choice.score is None:  # no validation data: no early stopping, the whole schedule
                for k in ("lr", "weight_decay", "batch_size", "steps"):
                    state.selected_on[f"{regime}.{k}"] = (
                        "fixed (--set option)"
                        if k in fixed
                        else "default (no validation data: the first of the grid; steps: the whole schedule)"
                    )
            if note:
                state.metrics[f"{regime}.batch_sizes"] = note
        if config.shots > 0:
            record_views(state, ALLWAY, views, why)
        if aw.fitted is not None:
            keep_allway_head(state, aw_task, {"weights": aw.fitted})
        elif config.shots > 0:  # no all-way validation: train the default on the state's own shots once
            own = f.own_shots()
            w = fit_weights(spaces[ALLWAY](own.support, own.classes), state, ALLWAY, config.seed, views)
            keep_allway_head(state, own, {"weights": w})

    def make_head(self, state: MethodState, store, device: torch.device):
        text, bridge = state_text(state, device)
        seed = int(state.config.get("seed", 1))

        def make(regime: str):
            def fit(support, classes):
                ts = regime_text_space(state, store, regime, support, classes, bridge, text)
                if ts.support.shape[2] == 0:  # no shot: the normalised text weights (zero-shot)
                    return FittedProbe(F.normalize(ts.weights, dim=-1), ts.embed)
                kept = kept_allway_head(state, support, classes) if regime == ALLWAY else None
                w = kept["weights"] if kept is not None else fit_weights(ts, state, regime, seed)
                return FittedProbe(w, ts.embed)

            return fit

        return RegimeHead(self.name, learned_mask(store, device), make(EPISODIC), make(ALLWAY), needs_text=True)


def fit_weights(
    ts: TextSpace, state: MethodState, regime: str, seed: int, views: torch.Tensor | None = None
) -> torch.Tensor:
    """The head (E, N, D) of a support trained with a regime's chosen lr, weight decay, batch
    size and steps on the state's schedule."""
    lr, wd, b, steps = (hp(state, regime, k) for k in ("lr", "weight_decay", "batch_size", "steps"))
    img, iy, txt, ty, w0 = training_rows(ts, views)
    h = state.hparams
    return train_probe(
        img,
        iy,
        txt,
        ty,
        w0,
        [lr],
        [wd],
        int(b),
        int(steps),
        seed,
        int(h["iters"]),
        int(h["warmup_iters"]),
        float(h["text_ratio"]),
    ).weights[0]


METHODS.register("cross-modal-lp", CrossModalLinearProbe)
