"""``proker``: proximal kernel ridge regression around the zero-shot classifier, training-free
(Bendou et al., "ProKeR: A Kernel Perspective on Few-Shot Adaptation of Large Vision-Language
Models", CVPR 2025; authors' code: github.com/ybendou/ProKeR, ``trainers/proker.py`` and
``main.py``; that repository could not be fetched here, its history up to commit ``f2ecb3d``
(5 March 2025, all commits by Yassir Bendou) was read in the fork ``omarnust/BReg-Adapter``).

The zero-shot classifier is the base learner; a kernel ridge regression on the shots fits what
it gets wrong (the residual between the one-hot labels and its predictions) and is added back:

    z(x)     = x^T t_k                                   cosine zero-shot scores (no x100)
    k(x, y)  = exp(-beta (1 - x^T y))                    RBF kernel on L2-normalised rows
    R        = Y - z(S)                                  (S, N) residual on the S rows
    A        = (K_SS / lambda + I)^-1 R                  (S, N)
    logits(x) = z(x) + k(x, S) A

This is the authors' code (``alpha_i = solve(1/lmbda * K_SS + I, cache - logits_text_shots)``),
lambda included: their ``A = lambda (K_SS + lambda I)^-1 R``, so the correction is lambda times
the kernel ridge regression of R with ridge lambda. lambda -> 0 gives the zero-shot classifier
exactly; lambda -> infinity gives ``z(x) + k(x, S) R``, a Tip-Adapter-like cache of residuals.

beta and lambda are the first pair (beta outer, lambda inner, the authors' loops and strict ``>``)
with the best validation accuracy on the grid of the authors' configs for Caltech101, FGVC,
Food101 and UCF101: beta = linspace(0.5, 3, 20), lambda = linspace(0.001, 1, 10). On a non-joint
store (text through fskd's bridge, whose zero-shot scores spread far wider than CLIP's cosines)
lambda may also be 3 ... 10000, after the authors' values (fskd's addition). Without validation
data fskd uses the authors' ImageNet-transferred pair for the nearest shot count (their
``configs_proker/hyperparameters.json``, ``--hp-selection imagenet``).

Rows are the shots, one row per shot, or every stored augmented view of a shot (the authors
encode 10 augmented crops of every shot and use each as a row). Exact and batched over episodes:
the search diagonalises each beta's kernel once (float64 ``eigh``: ``(K/lambda + I)^-1 =
U diag(lambda / (s + lambda)) U^T``), the head solves with a float64 Cholesky factorisation.
Classes with no shot (base-to-new's new classes) have nothing to regress: zero-shot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fskd.classifiers.base import FittedHead
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
from fskd.methods.adapt.text_space import TextSpace, regime_text_space, state_text, view_rows
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

#: the authors' grid (configs_proker/{caltech101,fgvc,food101,ucf101}.yaml: torch.linspace)
BETA = tuple(round(0.5 + i * 2.5 / 19, 6) for i in range(20))
LAMBDA = tuple(round(0.001 + i * 0.999 / 9, 6) for i in range(10))
#: a non-joint store's text comes through fskd's bridge, whose zero-shot scores spread far wider
#: than CLIP's cosines: there lambda may also take these values, after the authors' (fskd's addition)
LAMBDA_WIDE = (3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
#: the authors' ImageNet-transferred (beta, lambda) per shot count (configs_proker/hyperparameters.json):
#: fskd's default when there is no validation data
TRANSFERRED = {1: (3.0, 0.05), 2: (2.6, 0.05), 4: (1.5, 0.05), 8: (1.66, 0.07), 16: (1.7, 0.1)}
GRID_JOINT = "the authors': beta linspace(0.5, 3, 20) x lambda linspace(0.001, 1, 10)"
GRID_BRIDGE = GRID_JOINT + " + lambda 3 ... 10000 (non-joint store: the bridge's text scale)"
NORMALISATION = (
    "L2 per row (per stored view), kernel exp(-beta (1 - x.y)) on those rows, text weights L2, "
    "zero-shot scores x.t unscaled (the authors' code); a non-joint store's rows are centred on "
    "the support mean first (fskd's bridge space)"
)


@dataclass(frozen=True)
class ProKeROptions(AdaptOptions):
    beta: float | tuple[float, ...] | None = (
        None  # RBF kernel sharpness, k(x, y) = exp(-beta (1 - x.y)) (null: the authors' grid, chosen on validation)
    )
    lam: float | tuple[float, ...] | None = (
        None  # the authors' lmbda: A = (K / lam + I)^-1 (Y - zero-shot); small lam: zero-shot (null: the authors' grid, chosen on validation)
    )
    ridge: float | None = None
    val_way: int = 5
    val_query: int = 15
    val_episodes: int = 300

    RANGES = {
        "beta": (">=", 0),
        "lam": (">", 0),
        "ridge": (">", 0),
        **VAL_RANGES,
    }

    def __post_init__(self) -> None:
        check_val_options(self)
        for name, strict in (("beta", False), ("lam", True)):
            v = getattr(self, name)
            vals = v if isinstance(v, tuple) else (v,)
            if v is not None and any(not isinstance(a, (int, float)) or a < 0 or (strict and a == 0) for a in vals):
                raise ConfigError(f"{name} must be numbers {'> 0' if strict else '>= 0'}, got {v}")


def transferred_default(shots: int) -> dict:
    """The authors' ImageNet-transferred pair for the shot count nearest ``shots`` (in log scale)."""
    k = min(TRANSFERRED, key=lambda s: (abs(math.log2(s) - math.log2(max(shots, 1))), s))
    beta, lam = TRANSFERRED[k]
    return {"beta": beta, "lam": lam}


# -- the estimator ---------------------------------------------------------------------------------
def rbf(x: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """exp(-beta (1 - x y^T)) for (E, M, D), (E, S, D) L2-normalised rows: (E, M, S)."""
    return torch.exp(-beta * (1.0 - torch.bmm(x, y.transpose(1, 2))))


def residual(rows: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Y - z(S): one-hot labels minus the zero-shot scores of the rows, (E, S, N), float64."""
    N = weights.shape[1]
    return F.one_hot(labels, N).double() - torch.bmm(rows, weights.transpose(1, 2)).double()


def proker_coef(
    rows: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, beta: float, lam: float
) -> torch.Tensor:
    """The authors' closed form, batched: (K_SS / lam + I)^-1 (Y - z(S)), (E, S, N).

    rows (E, S, D) L2-normalised, labels (E, S) way indices, weights (E, N, D) L2-normalised text
    weights. K_SS is an RBF Gram matrix (positive semi-definite), so K/lam + I is positive definite:
    a float64 Cholesky solve."""
    E, S, _ = rows.shape
    k = rbf(rows.double(), rows.double(), beta)
    m = k / lam + torch.eye(S, dtype=k.dtype, device=k.device)
    return torch.cholesky_solve(residual(rows, labels, weights), torch.linalg.cholesky(m))


class FittedProKeR(FittedHead):
    """z(q) + k(q, S) A on embedded queries (zero-shot when there are no rows)."""

    def __init__(
        self, weights: torch.Tensor, rows: torch.Tensor | None, coef: torch.Tensor | None, beta: float, embed
    ) -> None:
        self.weights, self.rows, self.coef, self.beta, self.embed = weights, rows, coef, float(beta), embed

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        q = self.embed(query)
        z = torch.bmm(q, self.weights.transpose(1, 2))
        if self.rows is None or self.rows.shape[1] == 0:
            return z
        kq = rbf(q.double(), self.rows.double(), self.beta)
        return (z.double() + torch.bmm(kq, self.coef.double())).float()


def support_rows(ts: TextSpace, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The regression's rows (E, R, D) and way labels (E, R): the embedded support, or ``rows``
    (E, N, R_n, D) per class (stored views)."""
    x = ts.support if rows is None else rows
    E, N, R, D = x.shape
    labels = torch.arange(N, device=x.device).repeat_interleave(R)[None].expand(E, -1)
    return x.reshape(E, N * R, D), labels


def search_beta_lam(
    task: Task | None, space, betas, lams, default: dict, rows: torch.Tensor | None = None
) -> tuple[Choice, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """(beta, lambda) by accuracy on ``task``: each beta's Gram matrix is diagonalised once and every
    lambda is a reweighting of its eigenvectors. ``rows``: the regression's rows per class in place
    of the embedded support (stored views). Returns the choice and, for the winner, the rows, their
    labels and the coefficients A."""
    if task is None or task.shot == 0:
        return grid_search([], lambda c: 0.0, None, default), None
    ts = space(task.support, task.classes)
    weights = F.normalize(ts.weights, dim=-1)
    x, y = support_rows(ts, rows)
    q = ts.embed(task.query)
    zq = torch.bmm(q, weights.transpose(1, 2)).double()  # (E, M, N)
    res = residual(x, y, weights)  # (E, S, N)
    gram = torch.bmm(x, x.transpose(1, 2)).double()  # (E, S, S)
    cross = torch.bmm(q, x.transpose(1, 2)).double()  # (E, M, S)
    cache: dict = {}

    def score(c: dict) -> float:
        b = c["beta"]
        if b not in cache:
            cache.clear()  # one beta at a time (the loop order is beta outer)
            s, u = torch.linalg.eigh(torch.exp(-b * (1.0 - gram)))
            cache[b] = (s.clamp_min(0), torch.bmm(torch.exp(-b * (1.0 - cross)), u), torch.bmm(u.transpose(1, 2), res))
        s, ku, ur = cache[b]
        shrink = c["lam"] / (s + c["lam"])  # (E, S)
        return task.accuracy(zq + torch.bmm(ku, shrink[..., None] * ur))

    choice = grid_search([{"beta": b, "lam": lam} for b in betas for lam in lams], score, task, default)
    coef = proker_coef(x, y, weights, choice.params["beta"], choice.params["lam"])
    return choice, (x, y, coef)


class ProKeR(AdaptMethod):
    """Kernel ridge regression of the zero-shot residual on the shots (beta, lambda on validation)."""

    needs_text = True
    transfers_to_new_classes = True  # classes with no shot: nothing to regress, their text weights (zero-shot)

    name = "proker"
    options = ProKeROptions

    def fit_state(self, f: Fit) -> None:
        store, config, opts, state = f.store, f.config, f.opts, f.state
        betas, lams = fixed_or(opts.beta, BETA), fixed_or(opts.lam, LAMBDA if store.joint else LAMBDA + LAMBDA_WIDE)
        fixed = {k for k, v in (("beta", betas), ("lam", lams)) if getattr(opts, k) is not None and len(v) == 1}
        base = transferred_default(config.shots)
        default = {
            "beta": base["beta"] if opts.beta is None else betas[0],
            "lam": base["lam"] if opts.lam is None else lams[0],
        }
        val = f.validation()
        ts = val.view_space()
        rows = view_rows(ts, val.views) if ts is not None else None
        ep, _ = search_beta_lam(val.ep_task, val.spaces[EPISODIC], betas, lams, default)
        aw, fitted = search_beta_lam(val.aw_task, val.spaces[ALLWAY], betas, lams, default, rows)
        for regime, choice in ((EPISODIC, ep), (ALLWAY, aw)):
            record(state, regime, choice, fixed)
            for k in ("beta", "lam"):
                if choice.score is None and k not in fixed:
                    state.selected_on[f"{regime}.{k}"] = (
                        "default (no validation data): the authors' ImageNet-"
                        "transferred value for the nearest shot count"
                    )
        given = opts.beta is not None or opts.lam is not None
        record_grid(
            state,
            f"{len(betas)} beta x {len(lams)} lambda" if given else None,
            GRID_JOINT if store.joint else GRID_BRIDGE,
            "lambdas",
        )
        state.hparams["normalisation"] = NORMALISATION
        state.selected_on["normalisation"] = "fixed (the authors' code normalises every encoded crop)"
        record_views(state, ALLWAY, val.views, val.why)
        if rows is not None and fitted is not None:  # the state's own shots: the regression on their views
            keep_allway_head(state, val.aw_task, {"rows": fitted[0], "coef": fitted[2]})

    def make_head(self, state: MethodState, store, device: torch.device):
        text, bridge = state_text(state, device)

        def make(regime: str):
            beta, lam = hp(state, regime, "beta"), hp(state, regime, "lam")

            def fit(support, classes):
                ts = regime_text_space(state, store, regime, support, classes, bridge, text)
                weights = F.normalize(ts.weights, dim=-1)
                if support.shape[2] == 0:  # no shot: nothing to regress (zero-shot)
                    return FittedProKeR(weights, None, None, beta, ts.embed)
                kept = kept_allway_head(state, support, classes) if regime == ALLWAY else None
                if kept is not None:
                    return FittedProKeR(weights, kept["rows"], kept["coef"], beta, ts.embed)
                x, y = support_rows(ts)
                return FittedProKeR(weights, x, proker_coef(x, y, weights, beta, lam), beta, ts.embed)

            return fit

        return RegimeHead(self.name, learned_mask(store, device), make(EPISODIC), make(ALLWAY), needs_text=True)


METHODS.register("proker", ProKeR)
