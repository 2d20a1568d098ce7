"""``tip-adapter-f``: Tip-Adapter-F (Zhang et al., ECCV 2022), the cache keys fine-tuned on the shots.

Two forms (``--set form=keys|span``):

- ``keys`` (default) follows the reference code (gaopengcuhk/Tip-Adapter, ``run_tip_adapter_F``):
  the keys themselves (E, S, D) are the parameters, AdamW (lr 1e-3, eps 1e-4, weight decay
  0.01) with a cosine schedule over 20 epochs of shuffled batches of 256 support rows, the
  text logits ``100 q T^T`` plus ``alpha exp(-beta (1 - q K^T)) L`` at the training-free
  search's alpha and beta; the epoch kept is the one with the best validation accuracy (the
  reference picks it on the test set), and alpha and beta are then searched again with the
  fine-tuned keys (as the reference does, on the same wide grid as ``tip-adapter``). The
  reference queries each step with freshly augmented views of the shots. With views in the
  store (``fskd extract --augment-views V``) the all-way fit does the same with one of each
  shot's V views per epoch, its keys starting at the mean of the views; without them a store
  holds one feature per image, so a support row never sees its own key (leave-one-out).
- ``span`` is fskd's earlier variant: keys in the span of the support (``K = X + B X``, B
  (E, S, S)), full-batch Adam, step count and an alpha rescale chosen on validation, no
  re-search; up to :data:`SPAN_MAX_ROWS` support rows.

The state keeps the all-way keys fine-tuned on its own shots (``regimes.keep_allway_head``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fskd.classifiers.cache import TEXT_SCALE, FittedTip, affinity, cache_from_support
from fskd.classifiers.linear import train_steps
from fskd.errors import ConfigError
from fskd.methods.adapt.method import AdaptMethod, Fit
from fskd.methods.adapt.regimes import ALLWAY, EPISODIC, RegimeHead, keep_allway_head, kept_allway_head, learned_mask
from fskd.methods.adapt.text_space import TextSpace, embed_views, regime_text_space, state_text
from fskd.methods.adapt.tip_adapter import (
    ALPHA,
    BETA,
    TipOptions,
    fit_tip,
    search_alpha_beta,
)
from fskd.methods.adapt.validation import NO_VALIDATION, Choice, fixed_or, grid_search, hp, no_validation, record
from fskd.methods.base import METHODS, MethodState
from fskd.runtime import single_thread

#: the reference's fine-tuning: 20 epochs of batches of 256, AdamW(eps 1e-4, weight decay 0.01)
EPOCHS = 20
KEY_BATCH = 256
ADAMW_EPS = 1e-4
ADAMW_DECAY = 0.01
FORMS = ("keys", "span")
#: span form: step counts and alpha rescales searched on validation; at most this many support rows
STEPS = (0, 10, 25, 50, 100)
SPAN_MAX_ROWS = 2048
ALPHA_SCALE = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class TipFOptions(TipOptions):
    """tip-adapter's options and the fine-tuning's own (tip-adapter takes only the former)."""

    form: str = "keys"  # keys: the reference's fine-tuning of the keys; span: fskd's earlier span form
    epochs: int = EPOCHS  # keys form: the reference's epochs (validation keeps the best one)
    steps: int | tuple[int, ...] | None = None  # span form: Adam steps (default: a grid chosen on validation)
    lr: float = 1e-3  # the paper's learning rate

    RANGES = {**TipOptions.RANGES, "steps": (">=", 0), "lr": (">", 0), "epochs": (">=", 1)}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.form not in FORMS:
            raise ConfigError(f"form must be keys (the reference's fine-tuning) or span, got {self.form!r}")


def class_cache(a: torch.Tensor, n_ways: int) -> torch.Tensor:
    """(E, M, N*K) affinities to class-major keys -> (E, M, N) summed per class (= a @ one-hot)."""
    E, M, S = a.shape
    return a.reshape(E, M, n_ways, S // n_ways).sum(-1)


@dataclass
class KeyRun:
    """Fine-tuned keys (E, S, D); ``epoch`` how many epochs made them (the best on validation when
    scored, else the stop); ``curve`` the mean val accuracy after each epoch."""

    keys: torch.Tensor
    epoch: int
    curve: list = field(default_factory=list)


def train_keys(
    space: TextSpace,
    alpha: float,
    beta: float,
    *,
    epochs: int = EPOCHS,
    lr: float = 1e-3,
    seed: int = 0,
    stop: int | None = None,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    views: torch.Tensor | None = None,
    keys0: torch.Tensor | None = None,
) -> KeyRun:
    """The ``keys`` form (module docstring) for E episodes at once.

    The cosine schedule spans ``epochs``; training stops after ``stop`` (default: all) epochs, so a
    refit to the epoch validation chose retraces the original run exactly (same seed, same
    batches). ``val`` = (embedded queries (E, M, D), way labels (E, M)) keeps the keys of the epoch
    with the best mean val accuracy (ties: the earlier epoch).

    ``views`` (E, V, S, D), embedded augmented views of the support (``fskd extract
    --augment-views``): the keys start at ``keys0`` (E, S, D) (the cache of the views,
    ``text_space.view_keys``) and every epoch queries
    each shot with one of its views drawn at random (the reference's freshly augmented epoch), with
    no leave-one-out mask; the batches and their order are the same as without views."""
    x, values = cache_from_support(space.support)
    E, N, K, D = space.support.shape
    S = N * K
    stop = epochs if stop is None else min(stop, epochs)
    init = x if views is None else keys0
    if S == 0 or stop == 0:
        return KeyRun(init, 0)
    keys = init.clone().requires_grad_(True)
    opt = torch.optim.AdamW([keys], lr=lr, eps=ADAMW_EPS, weight_decay=ADAMW_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(S / KEY_BATCH))
    gen = torch.Generator().manual_seed(seed)
    gen_views = torch.Generator().manual_seed(seed + 1_000_003)  # its own stream: the batches do not change
    text_logits = TEXT_SCALE * torch.bmm(x, space.weights.transpose(1, 2))  # (E, S, N)
    arange = torch.arange(S, device=x.device)
    run = KeyRun(init, 0)
    best = -1.0
    if val is not None:
        q, truth = val
        q_text = TEXT_SCALE * torch.bmm(q, space.weights.transpose(1, 2))
    with single_thread(E * S * min(S, KEY_BATCH) * D):
        for epoch in range(stop):
            perm = torch.randperm(S, generator=gen).to(x.device)
            if views is not None:
                pick = torch.randint(views.shape[1], (S,), generator=gen_views).to(x.device)
            for i in range(0, S, KEY_BATCH):
                rows = perm[i : i + KEY_BATCH]
                with torch.enable_grad():
                    if views is None:
                        sims = torch.bmm(x[:, rows], keys.transpose(1, 2))  # (E, b, S)
                        a = torch.exp(-beta * (1.0 - sims)).masked_fill((rows[:, None] == arange[None])[None], 0.0)
                        tl = text_logits[:, rows]
                    else:
                        q = views[:, pick[rows], rows]  # (E, b, D): one view of each shot
                        a = torch.exp(-beta * (1.0 - torch.bmm(q, keys.transpose(1, 2))))
                        tl = TEXT_SCALE * torch.bmm(q, space.weights.transpose(1, 2))
                    logits = tl + alpha * class_cache(a, N)
                    loss = F.cross_entropy(logits.reshape(-1, N), values[:, rows].reshape(-1), reduction="none")
                    loss = loss.reshape(E, -1).mean(1).sum()  # episodes train independently (AdamW is element-wise)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                sched.step()
            if val is None:
                continue
            with torch.no_grad():
                scores = q_text + alpha * class_cache(affinity(q, keys, beta), N)
                acc = float((scores.argmax(-1) == truth).float().mean())
            run.curve.append(round(100 * acc, 2))
            if acc > best:
                best, run.epoch, run.keys = acc, epoch + 1, keys.detach().clone()
    if val is None:
        run.keys, run.epoch = keys.detach(), stop
    return run


def finetune_span(space: TextSpace, alpha: float, beta: float, steps, lr: float) -> dict[int, torch.Tensor]:
    """The ``span`` form: keys (E, S, D) after each step count in ``steps`` (step 0: the support).

    The keys move in the span of the support, ``K = X + B X`` with B (E, S, S) trained on the full
    support with Adam (the gradient of the support loss only has components there), leave-one-out,
    so a step costs O(S^2) per episode rather than O(S D)."""
    x, values = cache_from_support(space.support)
    E, S, D = x.shape
    N = space.weights.shape[1]
    steps = sorted(set(int(s) for s in steps))
    if not steps or steps[-1] == 0 or S == 0:
        return {s: x for s in steps}
    if S > SPAN_MAX_ROWS:
        raise ConfigError(
            f"tip-adapter-f form=span keeps an S x S matrix per episode, so it takes at most "
            f"{SPAN_MAX_ROWS} support rows; this fit has S = {S}: use form=keys (the default)"
        )
    b = torch.zeros(E, S, S, device=x.device, requires_grad=True)
    gram = torch.bmm(x, x.transpose(1, 2))
    onehot = F.one_hot(values, N).to(x.dtype)
    eye = torch.eye(S, dtype=torch.bool, device=x.device)[None]
    text_logits = TEXT_SCALE * torch.bmm(x, space.weights.transpose(1, 2))
    opt = torch.optim.Adam([b], lr=lr)

    def loss(step: int) -> torch.Tensor:
        sims = gram + torch.bmm(gram, b.transpose(1, 2))  # x K^T
        a = torch.exp(-beta * (1.0 - sims)).masked_fill(eye, 0.0)  # leave-one-out
        logits = text_logits + alpha * torch.bmm(a, onehot)
        return F.cross_entropy(logits.reshape(-1, N), values.reshape(-1), reduction="none").reshape(E, -1).mean(1).sum()

    with torch.enable_grad(), single_thread():
        return train_steps(opt, loss, steps, lambda: x + torch.bmm(b.detach(), x), {0: x})


class TipAdapterF(AdaptMethod):
    """Tip-Adapter with cache keys fine-tuned on the shots (the reference's recipe, or the span form)."""

    needs_text = True
    transfers_to_new_classes = True  # an empty support of unlearned classes: their text alone

    name = "tip-adapter-f"
    options = TipFOptions

    def fit_state(self, f: Fit) -> None:
        config, opts, state, progress = f.config, f.opts, f.state, f.progress
        ctx = fit_tip(f)
        for regime in (EPISODIC, ALLWAY):
            task = ctx["tasks"][regime]
            alpha, beta = hp(state, regime, "alpha"), hp(state, regime, "beta")
            space = ctx["spaces"][regime]
            trains = task is not None and task.shot > 0 and alpha != 0
            if opts.form == "keys":
                views = (ctx["views"], ctx["view_keys"]) if regime == ALLWAY and ctx["views"] is not None else None
                if no_validation(config) and alpha != 0:
                    self._fit_keys_fixed(f, state, regime, space, alpha, beta, opts, views)
                    continue
                self._fit_keys(state, regime, task if trains else None, space, alpha, beta, opts, config.seed, views)
            else:
                self._fit_span(state, regime, task if trains else None, space, alpha, beta, opts)
            if progress and trains:
                progress(f"tip-adapter-f {regime}", 1, 1, {"val_acc": state.metrics.get(f"{regime}.val_acc")})
        for k, v in (("form", opts.form), ("lr", opts.lr), ("epoch_budget", opts.epochs)):
            state.hparams[k] = v
            state.selected_on[k] = "fixed"

    @staticmethod
    def _fit_keys_fixed(
        f: Fit,
        state,
        regime: str,
        space,
        alpha: float,
        beta: float,
        opts,
        views: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        """``--hp-selection none``: the authors' recipe with no validation data, every epoch of the
        budget trained and the last kept; the all-way keys trained now on the state's own shots
        (with their stored views), an episode's keys when the head meets its support."""
        state.hparams[f"{regime}.init_alpha"], state.hparams[f"{regime}.init_beta"] = alpha, beta
        state.selected_on[f"{regime}.init_alpha"] = state.selected_on[f"{regime}.alpha"]
        state.selected_on[f"{regime}.init_beta"] = state.selected_on[f"{regime}.beta"]
        state.hparams[f"{regime}.epochs"] = opts.epochs
        state.selected_on[f"{regime}.epochs"] = (
            f"{NO_VALIDATION}: the whole budget of {opts.epochs} epochs, the last kept"
        )
        if regime != ALLWAY or f.config.shots == 0:
            return
        own = f.own_shots()
        ts = space(own.support, own.classes)
        embedded, keys0 = (embed_views(ts, views[0]), views[1]) if views is not None else (None, None)
        run = train_keys(
            ts, alpha, beta, epochs=opts.epochs, lr=opts.lr, seed=f.config.seed, views=embedded, keys0=keys0
        )
        keep_allway_head(state, own, {"keys": run.keys})

    @staticmethod
    def _fit_keys(
        state,
        regime: str,
        task,
        space,
        alpha: float,
        beta: float,
        opts,
        seed: int,
        views: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Fine-tune at the training-free (alpha, beta), keep the best val epoch, re-search (alpha, beta).
        ``views``: (raw augmented views (E, V, S, D), their cache keys (E, S, D)) from ``fit_tip``."""
        state.hparams[f"{regime}.init_alpha"], state.hparams[f"{regime}.init_beta"] = alpha, beta
        state.selected_on[f"{regime}.init_alpha"] = state.selected_on[f"{regime}.alpha"]
        state.selected_on[f"{regime}.init_beta"] = state.selected_on[f"{regime}.beta"]
        if task is None:  # nothing to fine-tune (no shots, no val data, or the cache is off)
            record(state, regime, grid_search([], lambda c: 0.0, None, {"epochs": 0}))
            return
        ts = space(task.support, task.classes)
        embedded, keys0 = (embed_views(ts, views[0]), views[1]) if views is not None else (None, None)
        run = train_keys(
            ts,
            alpha,
            beta,
            epochs=opts.epochs,
            lr=opts.lr,
            seed=seed,
            val=(ts.embed(task.query), task.truth),
            views=embedded,
            keys0=keys0,
        )
        table = [{"epochs": e + 1, "val_acc": a} for e, a in enumerate(run.curve)]
        record(state, regime, Choice({"epochs": run.epoch}, max(run.curve) / 100, task.on, task.description, table))
        fixed = {k for k, v in (("alpha", opts.alpha), ("beta", opts.beta)) if v is not None}
        alphas, betas = fixed_or(opts.alpha, ALPHA), fixed_or(opts.beta, BETA)
        again = search_alpha_beta(task, space, alphas, betas, {"alpha": alpha, "beta": beta}, keys=run.keys)
        again.on = f"{again.on}, with the fine-tuned keys"
        record(state, regime, again, fixed)
        if regime == ALLWAY:
            keep_allway_head(state, task, {"keys": run.keys})

    @staticmethod
    def _fit_span(state, regime: str, task, space, alpha: float, beta: float, opts) -> None:
        """fskd's span form: step count and an alpha rescale on validation."""
        steps = fixed_or(opts.steps, STEPS)
        default = {"steps": steps[len(steps) // 2], "alpha_scale": 1.0}
        if task is None:
            choice = grid_search([], lambda c: 0.0, None, default)
        else:
            ts = space(task.support, task.classes)
            q = ts.embed(task.query)
            ckpts = finetune_span(ts, alpha, beta, steps, opts.lr)
            text_logits = TEXT_SCALE * torch.bmm(q, ts.weights.transpose(1, 2))
            N = ts.weights.shape[1]

            def score(c, ckpts=ckpts, q=q, text_logits=text_logits, alpha=alpha, beta=beta, task=task):
                return task.accuracy(
                    text_logits + c["alpha_scale"] * alpha * class_cache(affinity(q, ckpts[c["steps"]], beta), N)
                )

            choice = grid_search(
                [{"steps": s, "alpha_scale": a} for s in steps for a in ALPHA_SCALE], score, task, default
            )
            if regime == ALLWAY and choice.params["steps"] > 0:
                keep_allway_head(state, task, {"keys": ckpts[choice.params["steps"]]})
        record(state, regime, choice, {"steps"} if opts.steps is not None else None)

    def make_head(self, state: MethodState, store, device: torch.device):
        text, bridge = state_text(state, device)
        lr = state.hparams["lr"]
        seed = int(state.config.get("seed", 1))
        form = state.hparams["form"]

        def make(regime: str):
            alpha, beta = hp(state, regime, "alpha"), hp(state, regime, "beta")
            if form == "keys":
                init = (hp(state, regime, "init_alpha"), hp(state, regime, "init_beta"))
                epochs, budget, scale = hp(state, regime, "epochs"), state.hparams["epoch_budget"], 1.0
            else:
                steps, scale = hp(state, regime, "steps"), hp(state, regime, "alpha_scale")

            def fit(support, classes):
                ts = regime_text_space(state, store, regime, support, classes, bridge, text)
                kept = kept_allway_head(state, support, classes) if regime == ALLWAY else None
                keys, values = cache_from_support(ts.support)
                if kept is not None:
                    keys = kept["keys"]
                elif form == "keys" and epochs > 0:
                    keys = train_keys(ts, *init, epochs=budget, stop=epochs, lr=lr, seed=seed).keys
                elif form == "span" and alpha != 0:
                    keys = finetune_span(ts, alpha, beta, [steps], lr)[steps]
                return FittedTip(ts.weights, keys, values, scale * alpha, beta, ts.embed)

            return fit

        return RegimeHead(self.name, learned_mask(store, device), make(EPISODIC), make(ALLWAY), needs_text=True)


METHODS.register("tip-adapter-f", TipAdapterF)
