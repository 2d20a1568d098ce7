"""``tip-adapter``: Tip-Adapter (Zhang et al., ECCV 2022), training-free.

    logits = 100 * q T^T + alpha * exp(-beta (1 - q K^T)) L

The cache keys K are the normalised support features, the values L their one-hot labels, T the
class text weights in image space (the bridge when the spaces differ). ``alpha = 0`` is exactly
zero-shot. alpha and beta are searched on validation data (val-class episodes for the episodic
regime, the val split with K train shots per class for the all-way regime), as the paper
searches them on a validation set. Large support banks go through FAISS (fskd.classifiers.cache).

With augmented views in the store (``fskd extract --augment-views V``), the all-way keys of the
state's own shots are the normalised mean of each shot's V views, as the reference builds its
cache from 10 augmented epochs; the state keeps them and says so (``allway.views``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fskd.classifiers.cache import TEXT_SCALE, FittedTip, cache_from_support
from fskd.errors import ConfigError
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
from fskd.methods.adapt.text_space import regime_text_space, state_text, view_keys
from fskd.methods.adapt.validation import VAL_RANGES, Choice, check_val_options, fixed_or, grid_search, hp, record
from fskd.methods.base import METHODS, MethodState

#: alpha on a wide log grid: the cache and text terms have store-dependent scales
ALPHA = (0.0, *(2.0**k for k in range(-4, 17)))
BETA = (1.0, 2.0, 3.5, 5.5, 8.0, 12.0)
#: the pooled search reads similarities out of one (P, P) Gram matrix up to this many distinct rows
POOLED_GRAM_MAX_ROWS = 4096


@dataclass(frozen=True)
class TipOptions(AdaptOptions):
    alpha: float | tuple[float, ...] | None = None  # residual ratio of the cache (default: grid chosen on validation)
    beta: float | tuple[float, ...] | None = None  # sharpness of the cache kernel
    ridge: float | None = None  # bridge ridge (non-joint stores; None: chosen on validation)
    val_way: int = 5
    val_query: int = 15
    val_episodes: int = 300

    RANGES = {
        "alpha": (">=", 0),
        "beta": (">=", 0),
        "ridge": (">", 0),
        **VAL_RANGES,
    }

    def __post_init__(self) -> None:
        check_val_options(self)
        for name in ("alpha", "beta"):
            v = getattr(self, name)
            vals = v if isinstance(v, tuple) else (v,)
            if v is not None and any((not isinstance(a, (int, float))) or a < 0 for a in vals):
                raise ConfigError(f"{name} must be numbers >= 0, got {v}")


def search_alpha_beta(
    task: Task | None, space, alphas, betas, default: dict, pooled: bool = False, keys: torch.Tensor | None = None
) -> Choice:
    """Grid over (alpha, beta) on ``task``: the text logits and the query-key similarities are
    computed once, each beta's cache term once, and every alpha is a weighted sum of the two.
    ``keys`` (E, S, D): fine-tuned cache keys in place of the support (tip-adapter-f).

    ``pooled`` (a row-wise embedding, as in the episodic regime): embed the task's distinct rows
    once and read every episode's similarities out of their (P, P) Gram matrix instead of
    gathering (E, M, D) queries and (E, S, D) keys.
    """
    if task is None:
        return grid_search([], lambda c: 0.0, None, default)
    E, N, K, _ = task.support.shape
    if pooled and task.pool is not None and keys is None:
        ts = space(task.support[:, :, :0], task.classes)  # class weights and the embedding only
        pool = ts.embed(task.pool)  # (P, D)
        table = torch.zeros(int(task.classes.max()) + 1, pool.shape[1], device=pool.device)
        table[task.classes] = ts.weights  # the episodes' class weights are rows of one table
        pt = pool @ table.T  # (P, C)
        text_logits = TEXT_SCALE * pt[task.query_idx[:, :, None], task.classes[:, None, :]]
        sidx = task.support_idx.reshape(E, N * K)
        if not K:
            sims = None
        elif len(pool) <= POOLED_GRAM_MAX_ROWS:  # (P, P) once, then read out: cheap for small pools
            sims = (pool @ pool.T)[task.query_idx[:, :, None], sidx[:, None, :]]  # (E, M, S)
        else:  # a (P, P) matrix would not fit (300 episodes of 80 rows: P up to 24,000): per episode
            sims = torch.bmm(pool[task.query_idx], pool[sidx].transpose(1, 2))
        v = torch.arange(N, device=pool.device).repeat_interleave(K)[None].expand(E, -1)
    else:
        ts = space(task.support, task.classes)
        q = ts.embed(task.query)
        k, v = cache_from_support(ts.support)
        k = k if keys is None else keys
        text_logits = TEXT_SCALE * torch.bmm(q, ts.weights.transpose(1, 2))
        sims = torch.bmm(q, k.transpose(1, 2)) if k.shape[1] else None  # (E, M, S), shared by every beta
    onehot = F.one_hot(v, N).to(text_logits.dtype)
    cache = {}

    def score(c: dict) -> float:
        if c["alpha"] == 0 or sims is None:
            return task.accuracy(text_logits)
        if c["beta"] not in cache:
            cache[c["beta"]] = torch.bmm(torch.exp(-c["beta"] * (1.0 - sims)), onehot)
        return task.accuracy(text_logits + c["alpha"] * cache[c["beta"]])

    return grid_search([{"alpha": a, "beta": b} for b in betas for a in alphas], score, task, default)


class TipAdapter(AdaptMethod):
    """Training-free cache model over the support + text weights; alpha, beta chosen on validation."""

    needs_text = True
    transfers_to_new_classes = True  # an empty support of unlearned classes: their text alone

    name = "tip-adapter"
    options = TipOptions

    def fit_state(self, f: Fit) -> None:
        fit_tip(f)

    def make_head(self, state: MethodState, store, device: torch.device):
        text, bridge = state_text(state, device)

        def make(regime: str):
            alpha, beta = hp(state, regime, "alpha"), hp(state, regime, "beta")

            def fit(support, classes):
                ts = regime_text_space(state, store, regime, support, classes, bridge, text)
                keys, values = cache_from_support(ts.support)
                kept = kept_allway_head(state, support, classes) if regime == ALLWAY else None
                if kept is not None:  # the state's own shots: the keys of their augmented views
                    keys = kept["keys"]
                return FittedTip(ts.weights, keys, values, alpha, beta, ts.embed)

            return fit

        return RegimeHead(self.name, learned_mask(store, device), make(EPISODIC), make(ALLWAY), needs_text=True)


#: the order in which the rows are normalised (the state records it)
NORMALISATION = (
    "L2 per row; with stored views the all-way cache keys are the L2-normalised mean of a shot's raw views "
    "(the authors' order: the mean of the augmented epochs, then L2); a non-joint store's rows are centred "
    "on the support mean first (fskd's bridge space)"
)


def fit_tip(f: Fit) -> dict:
    """The training-free fit shared with tip-adapter-f: alpha and beta per regime, into ``f.state``.
    Returns the validation tasks / spaces for further tuning."""
    store, config, opts, device, state = f.store, f.config, f.opts, f.device, f.state
    alphas, betas = fixed_or(opts.alpha, ALPHA), fixed_or(opts.beta, BETA)
    fixed = {k for k, v in (("alpha", opts.alpha), ("beta", opts.beta)) if v is not None}
    default = {"alpha": 1.0 if 1.0 in alphas else alphas[0], "beta": 5.5 if 5.5 in betas else betas[0]}
    ep_task = f.episodic_task()
    aw_task = f.allway_task()
    if aw_task is not None and aw_task.shot == 0 and not store.joint:
        aw_task = None
    spaces = f.spaces()
    views, why = allway_views(store, config, device) if aw_task is not None else (None, "no all-way task")
    keys = None
    if views is not None:  # the reference's cache: the mean of each shot's augmented views
        keys = view_keys(spaces[ALLWAY](aw_task.support, aw_task.classes), views)
    for regime, task in ((EPISODIC, ep_task), (ALLWAY, aw_task)):
        record(
            state,
            regime,
            search_alpha_beta(
                task,
                spaces[regime],
                alphas,
                betas,
                default,
                pooled=regime == EPISODIC,
                keys=keys if regime == ALLWAY else None,
            ),
            fixed,
        )
    state.hparams["normalisation"] = NORMALISATION
    state.selected_on["normalisation"] = "fixed (the authors' code)"
    if aw_task is not None:
        record_views(state, ALLWAY, views, why)
        if keys is not None:
            keep_allway_head(state, aw_task, {"keys": keys})
    return {"tasks": {EPISODIC: ep_task, ALLWAY: aw_task}, "spaces": spaces, "views": views, "view_keys": keys}


METHODS.register("tip-adapter", TipAdapter)
