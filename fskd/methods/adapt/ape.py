"""``ape``: Adaptive Prior rEfinement, training-free (Zhu et al., "Not All Features Matter:
Enhancing Few-shot CLIP with Adaptive Prior Refinement", ICCV 2023; authors' code:
github.com/yangyangyang127/APE, ``main.py`` (``APE``) and ``utils.py`` (``cal_criterion``), read
at commit ``70460de``).

APE is Tip-Adapter with three changes: the cache compares features in a refined subset of Q
channels, each cache key's value is reweighted by how badly the text classifies it, and the
three affinities (query-text, query-cache, cache-text) are combined:

    channels  the Q channels d with the largest  -w sim_d + (1 - w) var_d, where
              sim_d = mean over pairs of rows of different classes (i != j, each class's rows its
                      text weight and its K cache keys) of f_i[d] f_j[d]   (inter-class similarity)
              var_d = variance over classes of the text weights' channel d (unbiased)
    x', F', t' the query, cache keys and text weights restricted to those channels, L2 again
    R_fW  = 100 x^T t_k                                   all channels (zero-shot)
    R_fF' = x'^T F'_s                                     (S keys)
    p_s   = softmax_k(F'_s^T t'_k)                        no logit scale (the authors')
    div_s = sum_k L_sk log2((L_sk + 1e-6) / (p_sk + 1e-6))  KL of the one-hot value to p_s
    logits(x) = R_fW + alpha * exp(-beta (1 - R_fF')) (L * exp(gamma div))

The cache keys are the shots' features, each the normalised mean of its stored augmented views
when the store has them (the authors build the Tip-Adapter cache from 10 augmented epochs).
beta, alpha and gamma are the first triple (beta, then alpha, then gamma: the authors' loops and
strict ``>``) with the best validation accuracy on the authors' grid of their most common config
(Caltech101, DTD, Food101, Flowers102, OxfordPets: ``search_scale [7, 7, 1]``, ``search_step
[200, 20, 20]``): beta = 0.1 + 6.9 i / 200 (i < 200), alpha = 0.1 + 6.9 i / 20 (i < 20),
gamma = i / 20 (i < 20). On a non-joint store (text through fskd's bridge, whose scores spread
far wider than CLIP's) alpha may also be 8 ... 65536, after the authors' values (fskd's
addition, as its tip-adapter's wide alpha grid). The authors fix w and Q per dataset (w 0.1-0.9,
Q 400-800 of RN50's 1024 channels); fskd fixes them at the median of their eleven configs,
w = 0.5 and Q = 700/1024 of the store's channels, and searches them on validation with the rest
when given lists.

Batched over episodes: channel selection per episode by a batched top-k, every beta's cache
affinities once, every (alpha, gamma) pair scored from one interval of alpha per query (see
:func:`correct_counts`). Classes with no shot have no cache: their logits are zero-shot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fskd.classifiers.base import FittedHead
from fskd.classifiers.cache import TEXT_SCALE
from fskd.errors import ConfigError
from fskd.methods.adapt.method import AdaptMethod, AdaptOptions, Fit
from fskd.methods.adapt.regimes import (
    ALLWAY,
    EPISODIC,
    RegimeHead,
    Task,
    keep_allway_head,
    kept_allway_head,
    learned_mask,
    record_views,
)
from fskd.methods.adapt.text_space import TextSpace, regime_text_space, state_text, view_keys
from fskd.methods.adapt.validation import (
    VAL_RANGES,
    Choice,
    check_val_options,
    fixed_or,
    grid_search,
    hp,
    record,
    record_grid,
)
from fskd.methods.base import METHODS, MethodState

#: the authors' search grid (configs/{caltech101,dtd,food101,oxford_flowers,oxford_pets}.yaml)
BETA = tuple(0.1 + i * (7 - 0.1) / 200 for i in range(200))
ALPHA = tuple(0.1 + i * (7 - 0.1) / 20 for i in range(20))
GAMMA = tuple(i * 1 / 20 for i in range(20))
#: a non-joint store's text logits come through fskd's bridge, whose scores spread far wider than
#: CLIP's cosines (x 100): there alpha may also take these values, after the authors' (fskd's
#: addition, as its tip-adapter's wide alpha grid)
ALPHA_WIDE = tuple(2.0**k for k in range(3, 17))
GRID_JOINT = "the authors': beta 0.1 + 6.9 i / 200, alpha 0.1 + 6.9 i / 20, gamma i / 20"
GRID_BRIDGE = GRID_JOINT + " + alpha 8 ... 65536 (non-joint store: the bridge's text scale)"
#: the authors' starting values (init_beta, init_alpha of most configs, init_gamma): fskd's
#: values when there is no validation data
DEFAULT = {"beta": 1.0, "alpha": 1.0, "gamma": 0.1}
#: the criterion's weight of the inter-class similarity (the authors' w_training_free[0]; the
#: variance gets 1 - w) and the share of channels kept (training_free_feat_num / 1024): the
#: median of their eleven per-dataset configs
W_SIM = 0.5
FEAT_FRAC = 700 / 1024
EPS = 1e-6
#: the search compares (alphas, gammas, episodes, queries) up to this many values at once
CHUNK = 1 << 24
NORMALISATION = (
    "L2 per row; cache keys the L2 mean of a shot's stored views (Tip-Adapter's cache); refined "
    "features: the kept channels L2-normalised again; a non-joint store's rows are centred on the "
    "support mean first (fskd's bridge space)"
)
FIXED_BY_AUTHORS = (
    "fixed (the median of the authors' per-dataset configs: w_training_free and training_free_feat_num / 1024)"
)


@dataclass(frozen=True)
class APEOptions(AdaptOptions):
    beta: float | tuple[float, ...] | None = (
        None  # sharpness of the refined cache affinity (null: the authors' 200-value grid, chosen on validation)
    )
    alpha: float | tuple[float, ...] | None = (
        None  # weight of the cache logits against 100 x the text logits (null: the authors' grid)
    )
    gamma: float | tuple[float, ...] | None = (
        None  # weight of each key's text KL divergence in its value, exp(gamma div) (null: the authors' grid)
    )
    w_sim: float | tuple[float, ...] = (
        W_SIM  # channel criterion: -w_sim x inter-class similarity + (1 - w_sim) x text variance (a list: chosen on validation)
    )
    feat_frac: float | tuple[float, ...] = (
        FEAT_FRAC  # share of the channels the refined cache keeps (a list: chosen on validation)
    )
    ridge: float | None = None
    val_way: int = 5
    val_query: int = 15
    val_episodes: int = 300

    RANGES = {
        "beta": (">=", 0),
        "alpha": (">=", 0),
        "gamma": (">=", 0),
        "w_sim": (">=", 0),
        "feat_frac": (">", 0),
        "ridge": (">", 0),
        **VAL_RANGES,
    }
    MAXIMA = {"w_sim": 1, "feat_frac": 1}

    def __post_init__(self) -> None:
        check_val_options(self)
        for name in ("beta", "alpha", "gamma", "w_sim", "feat_frac"):
            v = getattr(self, name)
            vals = v if isinstance(v, tuple) else (v,)
            if v is not None and any(not isinstance(a, (int, float)) or a < 0 for a in vals):
                raise ConfigError(f"{name} must be numbers >= 0, got {v}")
        fr = self.feat_frac if isinstance(self.feat_frac, tuple) else (self.feat_frac,)
        ws = self.w_sim if isinstance(self.w_sim, tuple) else (self.w_sim,)
        if any(f <= 0 or f > 1 for f in fr) or any(w > 1 for w in ws):
            raise ConfigError(f"feat_frac must be in (0, 1] and w_sim in [0, 1], got {self.feat_frac}, {self.w_sim}")


def n_channels(dim: int, frac: float) -> int:
    return max(1, min(dim, round(frac * dim)))


# -- the refinement --------------------------------------------------------------------------------
def criterion(weights: torch.Tensor, keys: torch.Tensor, w_sim: float) -> torch.Tensor:
    """The authors' channel criterion, batched: (E, D).

    weights (E, N, D) text weights, keys (E, N, K, D) cache keys per class. A class's rows are its
    text weight and its K keys; sim_d sums f_im[d] f_jn[d] over classes i != j and all their rows
    m, n (the square of the sum of every row minus each class's own square), over the number of
    such pairs; var_d is the unbiased variance of channel d over the classes' text weights."""
    E, N, K, D = keys.shape
    per_class = weights.double() + keys.double().sum(2)  # (E, N, D): sum of each class's 1 + K rows
    total = per_class.sum(1)
    pairs = N * (N - 1) * (1 + K) ** 2
    sim = (total.pow(2) - per_class.pow(2).sum(1)) / max(pairs, 1)
    var = weights.double().var(1, correction=1 if N > 1 else 0)
    return (-w_sim * sim + (1 - w_sim) * var).float()


def select_channels(weights: torch.Tensor, keys: torch.Tensor, w_sim: float, q: int) -> torch.Tensor:
    """The Q channels (E, Q) with the largest criterion (torch.topk, as the authors)."""
    return torch.topk(criterion(weights, keys, w_sim), k=q, dim=-1).indices


def refine(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(E, M, D) rows restricted to the channels idx (E, Q), L2-normalised again."""
    return F.normalize(torch.gather(x, 2, idx[:, None, :].expand(-1, x.shape[1], -1)), dim=-1)


def key_divergence(keys: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """div_s: the KL divergence (log2) of key s's one-hot value to softmax(F'_s t'^T), (E, S)."""
    p = torch.softmax(torch.bmm(keys, weights.transpose(1, 2)), -1)
    onehot = F.one_hot(labels, weights.shape[1]).to(p.dtype)
    return (onehot * torch.log2((onehot + EPS) / (p + EPS))).sum(-1)


@dataclass
class Refined:
    """What the APE logits need, per episode: refined queries are made on the fly."""

    weights: torch.Tensor  # (E, N, D) text weights, all channels
    idx: torch.Tensor  # (E, Q) kept channels
    keys: torch.Tensor  # (E, S, Q) refined cache keys
    onehot: torch.Tensor  # (E, S, N)
    div: torch.Tensor  # (E, S)


def refined_cache(weights: torch.Tensor, keys: torch.Tensor, w_sim: float, frac: float) -> Refined:
    """The refined cache of keys (E, N, K, D) (class-major, L2-normalised) under text weights (E, N, D)."""
    E, N, K, D = keys.shape
    idx = select_channels(weights, keys, w_sim, n_channels(D, frac))
    kr = refine(keys.reshape(E, N * K, D), idx)
    labels = torch.arange(N, device=keys.device).repeat_interleave(K)[None].expand(E, -1)
    div = key_divergence(kr, refine(weights, idx), labels)
    return Refined(weights, idx, kr, F.one_hot(labels, N).to(keys.dtype), div)


class FittedAPE(FittedHead):
    """100 q t^T + alpha exp(-beta (1 - q' F'^T)) (L * exp(gamma div)) on embedded queries."""

    def __init__(
        self, weights: torch.Tensor, cache: Refined | None, alpha: float, beta: float, gamma: float, embed
    ) -> None:
        self.weights, self.cache, self.embed = weights, cache, embed
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        q = self.embed(query)
        text = TEXT_SCALE * torch.bmm(q, self.weights.transpose(1, 2))
        c = self.cache
        if c is None or c.keys.shape[1] == 0:
            return text
        aff = torch.exp(-self.beta * (1.0 - torch.bmm(refine(q, c.idx), c.keys.transpose(1, 2))))
        values = c.onehot * torch.exp(self.gamma * c.div)[..., None]
        return text + self.alpha * torch.bmm(aff, values)


def correct_counts(text: torch.Tensor, cache: torch.Tensor, truth: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """How many queries ``text + alpha * cache`` gets right, for every alpha and every cache at once.

    text (E, M, N), cache (G, E, M, N), truth (E, M), alphas (A,) -> (A, G) counts. A query is right
    when alpha lies strictly inside the interval where its true class beats every other class c:
    (t_y - t_c) + alpha (c_y - c_c) > 0 is a half-line in alpha for each c, so one pass over the
    classes gives the interval and every alpha is two comparisons (no (A, G, E, M, N) logits). A
    query exactly on a boundary counts as wrong (argmax would pick the lower class index there)."""
    G = cache.shape[0]
    other = ~F.one_hot(truth, text.shape[-1]).bool()  # (E, M, N)
    d = text.gather(-1, truth[..., None]) - text  # the text's margin of the true class over each class
    e = cache.gather(-1, truth[None, ..., None].expand(G, -1, -1, 1)) - cache  # (G, E, M, N)
    cut = -d / torch.where(e == 0, torch.ones_like(e), e)  # alpha where class c ties with the true class
    lo = torch.where(other & (e > 0), cut, torch.full_like(cut, -torch.inf))
    lo = torch.where(other & (e == 0) & (d <= 0), torch.full_like(cut, torch.inf), lo).amax(-1)  # (G, E, M)
    hi = torch.where(other & (e < 0), cut, torch.full_like(cut, torch.inf)).amin(-1)
    a = alphas.to(lo.dtype)[:, None, None, None]
    step = max(1, CHUNK // max(1, lo.numel()))
    return torch.cat(
        [((lo[None] < a[i : i + step]) & (a[i : i + step] < hi[None])).sum((-1, -2)) for i in range(0, len(a), step)]
    )


def search(task: Task | None, space, grid: dict, default: dict, keys: torch.Tensor | None = None) -> Choice:
    """(w_sim, feat_frac, beta, alpha, gamma) by accuracy on ``task``, in that loop order (the
    authors': beta, alpha, gamma; fskd's w_sim and feat_frac outside), ties to the earlier.

    For each beta the refined affinities are computed once and every (alpha, gamma) pair scored
    at once (:func:`correct_counts`). ``keys`` (E, N, K, D): cache keys in place of the embedded
    support (stored views)."""
    if task is None or task.shot == 0:
        return grid_search([], lambda c: 0.0, None, default)
    ts = space(task.support, task.classes)
    k = ts.support if keys is None else keys
    E, N, K, _ = k.shape
    q = ts.embed(task.query)
    M = q.shape[1]
    text = TEXT_SCALE * torch.bmm(q, ts.weights.transpose(1, 2))  # (E, M, N)
    alphas = torch.tensor(grid["alpha"], dtype=text.dtype, device=text.device)
    gammas = torch.tensor(grid["gamma"], dtype=text.dtype, device=text.device)
    G = len(gammas)
    best, best_count = None, -1
    for w in grid["w_sim"]:
        for frac in grid["feat_frac"]:
            c = refined_cache(ts.weights, k, w, frac)
            sims = torch.bmm(refine(q, c.idx), c.keys.transpose(1, 2))  # (E, M, S)
            # the values of every gamma side by side: (E, S, G * N)
            values = c.onehot[:, :, None, :] * torch.exp(gammas[None, None, :, None] * c.div[:, :, None, None])
            values = values.reshape(E, N * K, G * N)
            for beta in grid["beta"]:
                cache = torch.bmm(torch.exp(-beta * (1.0 - sims)), values).reshape(E, M, G, N).permute(2, 0, 1, 3)
                counts = correct_counts(text, cache, task.truth, alphas)  # (A, G): alpha outer, gamma inner
                top = int(counts.max())
                if top > best_count:
                    i = int((counts.flatten() == top).nonzero()[0])
                    best_count = top
                    best = {
                        "w_sim": w,
                        "feat_frac": frac,
                        "beta": beta,
                        "alpha": grid["alpha"][i // G],
                        "gamma": grid["gamma"][i % G],
                    }
    return Choice(best, best_count / (E * M), task.on, task.description)


def cache_keys(ts: TextSpace, keys: torch.Tensor | None = None) -> torch.Tensor:
    """(E, N, K, D) cache keys: the embedded support, or ``keys`` (E, N*K, D) from stored views."""
    E, N, K, D = ts.support.shape
    return ts.support if keys is None else keys.reshape(E, N, K, -1)


class APE(AdaptMethod):
    """Tip-Adapter's cache in refined channels, values reweighted by the text (beta, alpha, gamma on validation)."""

    needs_text = True
    transfers_to_new_classes = True  # classes with no shot: no cache, their text weights (zero-shot)

    name = "ape"
    options = APEOptions

    def fit_state(self, f: Fit) -> None:
        store, config, opts, state = f.store, f.config, f.opts, f.state
        grid = {
            "beta": fixed_or(opts.beta, BETA),
            "alpha": fixed_or(opts.alpha, ALPHA if store.joint else ALPHA + ALPHA_WIDE),
            "gamma": fixed_or(opts.gamma, GAMMA),
            "w_sim": fixed_or(opts.w_sim, ()),
            "feat_frac": fixed_or(opts.feat_frac, ()),
        }
        fixed = {k for k in grid if len(grid[k]) == 1}  # one value: nothing to choose
        default = {
            "w_sim": grid["w_sim"][0],
            "feat_frac": grid["feat_frac"][0],
            **{k: (DEFAULT[k] if getattr(opts, k) is None else grid[k][0]) for k in DEFAULT},
        }
        val = f.validation()
        aw_task = val.aw_task
        ts = val.view_space()
        keys = view_keys(ts, val.views) if ts is not None else None  # Tip-Adapter's cache of views
        ep = search(val.ep_task, val.spaces[EPISODIC], grid, default)
        aw = search(
            aw_task,
            val.spaces[ALLWAY],
            grid,
            default,
            None if keys is None else keys.reshape(1, *aw_task.support.shape[1:3], -1),
        )
        user = set(config.options)
        for regime, choice in ((EPISODIC, ep), (ALLWAY, aw)):
            record(state, regime, choice, fixed)
            for k in ("w_sim", "feat_frac"):
                if k not in user:
                    state.selected_on[f"{regime}.{k}"] = FIXED_BY_AUTHORS
            if choice.score is None:
                for k in DEFAULT:
                    if k not in fixed:
                        state.selected_on[f"{regime}.{k}"] = (
                            "default (no validation data): the authors' init_beta / init_alpha / init_gamma"
                        )
            state.metrics[f"{regime}.channels"] = n_channels(store.dim, choice.params["feat_frac"])
        given = any(getattr(opts, k) is not None for k in DEFAULT)
        record_grid(
            state,
            "x".join(str(len(grid[k])) for k in ("beta", "alpha", "gamma")) if given else None,
            GRID_JOINT if store.joint else GRID_BRIDGE,
            "alphas",
        )
        state.hparams["normalisation"] = NORMALISATION
        state.selected_on["normalisation"] = "fixed (the authors' code)"
        record_views(state, ALLWAY, val.views, val.why)
        if keys is not None:  # the state's own shots: the cache keys of their views
            keep_allway_head(state, aw_task, {"keys": keys})

    def make_head(self, state: MethodState, store, device: torch.device):
        text, bridge = state_text(state, device)

        def make(regime: str):
            p = {k: hp(state, regime, k) for k in ("beta", "alpha", "gamma", "w_sim", "feat_frac")}

            def fit(support, classes):
                ts = regime_text_space(state, store, regime, support, classes, bridge, text)
                if support.shape[2] == 0:  # no shot: no cache (zero-shot)
                    return FittedAPE(ts.weights, None, p["alpha"], p["beta"], p["gamma"], ts.embed)
                kept = kept_allway_head(state, support, classes) if regime == ALLWAY else None
                keys = cache_keys(ts, kept["keys"] if kept is not None else None)
                cache = refined_cache(ts.weights, keys, p["w_sim"], p["feat_frac"])
                return FittedAPE(ts.weights, cache, p["alpha"], p["beta"], p["gamma"], ts.embed)

            return fit

        return RegimeHead(self.name, learned_mask(store, device), make(EPISODIC), make(ALLWAY), needs_text=True)


METHODS.register("ape", APE)
