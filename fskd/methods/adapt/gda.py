"""``gda``: Gaussian discriminant analysis on the shots, blended with zero-shot text logits
(Wang et al., "A Hard-to-Beat Baseline for Training-free CLIP-based Adaptation", ICLR 2024;
authors' code: github.com/mrflogs/ICLR24, ``main_few_shots.py`` and ``main_base2new.py``).

Every class is a Gaussian with its own mean and one covariance shared by all classes, estimated
from the shots (S rows of D features, each row L2-normalised: one row per shot, or per stored
augmented view of a shot, as the authors encode 10 augmented crops of every shot):

    mu_k = mean of class k's rows                                  (not renormalised)
    Z    = every row minus its class mean                          (S, D)
    P    = D * (Z^T Z + tr(Z^T Z) / (S - 1) * I)^-1                (the authors' "KS estimator")
    gda_k(x) = x^T P mu_k - mu_k^T P mu_k / 2 + log(1 / N)         (uniform class prior)
    logits_k(x) = 100 * x^T t_k + alpha * gda_k(x)

t_k is class k's text weight in image space (the store's class text for a joint CLIP store; the
bridge otherwise). The shrinkage term is the authors' own: their code forms ``(S - 1) * cov +
trace(cov) * I`` from ``torch.cov`` of the centred rows, which is the matrix above. alpha is the
first of (1e-4, 1e-3, ..., 100) with the best validation accuracy (the authors' grid and their
strict ``>``), on the all-way task's val rows (``--hp-selection``; the authors use the whole val
split: ``--hp-selection full-val``) or, in the episodic regime, on val-class episodes.

Exact and batched over episodes: the inverse is a Cholesky solve in float64, in the dual
(Woodbury, S x S) form when S < D and the primal (D x D) form otherwise; both equal the
authors' ``pinv`` of that full-rank matrix. When every class has one row (1 shot, no views)
the scatter is zero: the authors' ``pinv(0) = 0`` makes P = 0, the GDA term a constant, and the
classifier zero-shot; fskd does the same and says so in the state.

Classes with no shot (base-to-new's new classes, another store's classes) follow the authors'
``main_base2new.py``: a new class's mean is the average of the 64 support rows nearest its text
weight and 16 copies of that weight; its precision is D * (Z_i^T Z_i + tr(Z_i^T Z_i) / 63 * I)^-1
for those 64 rows centred on the text weight, averaged over the new classes; alpha is the
all-way alpha (chosen on the base classes' val rows, as theirs). The rows are the state's
all-way shots of the classes it learned from (the base classes), kept in the state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
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
    allway_rows,
    keep_allway_head,
    kept_allway_head,
    learned_mask,
    record_views,
)
from fskd.methods.adapt.text_space import regime_text_space, state_text, view_rows
from fskd.methods.adapt.validation import VAL_RANGES, Choice, check_val_options, fixed_or, grid_search, hp, record
from fskd.methods.base import METHODS, MethodState

#: the authors' alpha grid, in their order (ties: the earlier alpha, as their strict ``>``)
ALPHA = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
#: the authors' starting ``best_alpha``: what they keep when no alpha scores; fskd's value when
#: there is no validation data at all
DEFAULT_ALPHA = 0.1
#: new classes (main_base2new.py): neighbours of a class's text weight among the support rows,
#: and copies of the text weight averaged into its mean
NEIGHBOURS = 64
TEXT_COPIES = 16
NORMALISATION = (
    "L2 per row (per stored view), then class means, not renormalised (the authors' order); "
    "a non-joint store's rows are centred on the support mean first (fskd's bridge space)"
)
TRANSFER_ROWS = "gda.transfer_rows"


@dataclass(frozen=True)
class GDAOptions(AdaptOptions):
    alpha: float | tuple[float, ...] | None = (
        None  # weight of the GDA logits against 100 x the text logits (null: the authors' grid, chosen on validation)
    )
    ridge: float | None = None
    val_way: int = 5
    val_query: int = 15
    val_episodes: int = 300

    RANGES = {
        "alpha": (">=", 0),
        "ridge": (">", 0),
        **VAL_RANGES,
    }

    def __post_init__(self) -> None:
        check_val_options(self)
        vals = self.alpha if isinstance(self.alpha, tuple) else (self.alpha,)
        if self.alpha is not None and any(not isinstance(a, (int, float)) or a < 0 for a in vals):
            raise ConfigError(f"alpha must be numbers >= 0, got {self.alpha}")


# -- the estimator ---------------------------------------------------------------------------------
def _solve_shrunk(z: torch.Tensor, c: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """(Z^T Z + c I)^-1 rhs for z (B, S, D), c (B,) > 0, rhs (B, D, M), in float64: the dual
    (Woodbury) form when S < D, else the primal."""
    B, S, D = z.shape
    if S < D:  # (Z^T Z + cI)^-1 = (I - Z^T (cI + Z Z^T)^-1 Z) / c
        eye = torch.eye(S, dtype=z.dtype, device=z.device)
        m = torch.bmm(z, z.transpose(1, 2)) + c[:, None, None] * eye
        inner = torch.cholesky_solve(torch.bmm(z, rhs), torch.linalg.cholesky(m))
        return (rhs - torch.bmm(z.transpose(1, 2), inner)) / c[:, None, None]
    eye = torch.eye(D, dtype=z.dtype, device=z.device)
    m = torch.bmm(z.transpose(1, 2), z) + c[:, None, None] * eye
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(m))


def gda_params(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GDA with the authors' shrunk shared precision, batched over episodes.

    rows (E, N, R, D): R >= 1 embedded (L2-normalised) rows per class (shots, or shots x views).
    Returns P mu (E, N, D) and the bias b (E, N), so that gda(x) = x (P mu)^T + b.
    """
    E, N, R, D = rows.shape
    x = rows.double()
    mu = x.mean(2)  # (E, N, D)
    z = (x - mu[:, :, None]).reshape(E, N * R, D)
    n = N * R
    c = z.pow(2).sum((1, 2)) / max(n - 1, 1)  # trace of torch.cov of the centred rows
    ok = c > 0  # c = 0: no scatter (one row per class): the authors' pinv(0) = 0, P = 0
    pmu = torch.zeros_like(mu)
    if ok.any():
        pmu[ok] = D * _solve_shrunk(z[ok], c[ok], mu[ok].transpose(1, 2)).transpose(1, 2)
    b = math.log(1.0 / N) - 0.5 * (mu * pmu).sum(-1)
    return pmu.float(), b.float()


def gda_new_classes(
    rows: torch.Tensor, weights: torch.Tensor, neighbours: int = NEIGHBOURS, copies: int = TEXT_COPIES
) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' base-to-new classifier for classes with no shot: P mu (E, N, D), b (E, N).

    rows (R, D): embedded rows of the classes the state learned from; weights (E, N, D): the new
    classes' text weights in image space (L2-normalised here, as CLIP's are).
    """
    E, N, D = weights.shape
    w = F.normalize(weights, dim=-1).double()
    k = min(neighbours, rows.shape[0])
    if k < 2:  # no covariance from fewer than 2 neighbours: the GDA term is a constant
        z = weights.new_zeros(E, N, D)
        return z, weights.new_full((E, N), math.log(1.0 / N))
    v = rows.double().to(weights.device)
    idx = torch.matmul(w, v.T).topk(k, dim=-1).indices  # (E, N, k)
    nb = v[idx]  # (E, N, k, D)
    mu = (nb.sum(2) + copies * w) / (k + copies)  # (E, N, D)
    z = nb - w[:, :, None]  # (E, N, k, D): centred on the text weight, as theirs
    c = z.pow(2).sum((2, 3)) / (k - 1)  # (E, N)
    ok = (c > 0).double()  # Z_i = 0: the authors' pinv(0) = 0, class i adds nothing to P
    c = torch.where(c > 0, c, torch.ones_like(c))
    # P mu_j = D / N * sum_i (Z_i^T Z_i + c_i I)^-1 mu_j, each inverse in Woodbury form:
    # (mu_j - Z_i^T (c_i I + Z_i Z_i^T)^-1 Z_i mu_j) / c_i; no (N, N, D) tensor is formed
    eye = torch.eye(k, dtype=z.dtype, device=z.device)
    gram = torch.matmul(z, z.transpose(2, 3)) + c[..., None, None] * eye  # (E, N, k, k)
    zmu = torch.einsum("eikd,ejd->eikj", z, mu)  # (E, N_i, k, N_j)
    inner = torch.cholesky_solve(zmu, torch.linalg.cholesky(gram)) * (ok / c)[..., None, None]
    back = torch.bmm(inner.reshape(E, N * k, N).transpose(1, 2), z.reshape(E, N * k, D))  # (E, N_j, D)
    pmu = D / N * ((ok / c).sum(1)[:, None, None] * mu - back)
    b = math.log(1.0 / N) - 0.5 * (mu * pmu).sum(-1)
    return pmu.float(), b.float()


class FittedGDA(FittedHead):
    """100 * q t^T + alpha * (q (P mu)^T + b) on embedded queries."""

    def __init__(self, weights: torch.Tensor, pmu: torch.Tensor, bias: torch.Tensor, alpha: float, embed) -> None:
        self.weights, self.pmu, self.bias, self.alpha, self.embed = weights, pmu, bias, float(alpha), embed

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        q = self.embed(query)
        text = TEXT_SCALE * torch.bmm(q, self.weights.transpose(1, 2))
        return text + self.alpha * (torch.bmm(q, self.pmu.transpose(1, 2)) + self.bias[:, None, :])


def search_alpha(
    task: Task | None, space, alphas, default: dict, rows: torch.Tensor | None = None
) -> tuple[Choice, tuple[torch.Tensor, torch.Tensor] | None]:
    """alpha by accuracy on ``task`` (text and GDA logits computed once; each alpha a weighted
    sum). ``rows``: the GDA's rows per class in place of the embedded support (stored views).
    Returns the choice and the GDA parameters (P mu, b) of the task's support."""
    if task is None or task.shot == 0:
        return grid_search([], lambda c: 0.0, None, default), None
    ts = space(task.support, task.classes)
    pmu, b = gda_params(ts.support if rows is None else rows)
    q = ts.embed(task.query)
    text = TEXT_SCALE * torch.bmm(q, ts.weights.transpose(1, 2))
    gda = torch.bmm(q, pmu.transpose(1, 2)) + b[:, None, :]
    choice = grid_search(
        [{"alpha": a} for a in alphas], lambda c: task.accuracy(text + c["alpha"] * gda), task, default
    )
    if choice.score == 0 and DEFAULT_ALPHA in alphas:  # no alpha beats their starting best (0%): they keep 0.1
        choice.params = {"alpha": DEFAULT_ALPHA}
    return choice, (pmu, b)


def transfer_rows(store, config, device: torch.device, views: torch.Tensor | None) -> tuple[torch.Tensor | None, str]:
    """Raw rows (R, D) a state keeps for classes with no shot: its all-way shots (every view, when
    the store has them) of the classes it learned from (the base classes), or None."""
    base = store.class_split("base") if "base" in store.attrs["class_split"] else []
    if config.shots < 1 or not len(base) or not store.has_split("train"):
        return None, "none (no shots or no base classes): classes with no shot are classified zero-shot"
    x, y, _ = allway_rows(store, config.shots, config.seed)
    keep = torch.from_numpy(np.isin(y, base))
    if views is not None:
        r = views[0][:, keep.to(views.device)]  # (V, R, D)
        out = r.reshape(-1, r.shape[-1])
    else:
        out = torch.from_numpy(x)[keep].to(device)
    return out, (
        f"the {len(out)} rows of the all-way shots of the {len(base)} base classes "
        f"({'every stored view' if views is not None else 'one row per shot'})"
    )


class GDA(AdaptMethod):
    """GDA with the authors' shrunk shared covariance, blended with zero-shot logits (alpha on validation)."""

    needs_text = True
    transfers_to_new_classes = True  # the authors' base-to-new rule: neighbours of the text weight among the shots

    name = "gda"
    options = GDAOptions

    def fit_state(self, f: Fit) -> None:
        store, config, opts, state = f.store, f.config, f.opts, f.state
        alphas = fixed_or(opts.alpha, ALPHA)
        default = {"alpha": DEFAULT_ALPHA if DEFAULT_ALPHA in alphas else alphas[0]}
        fixed = {"alpha"} if opts.alpha is not None else set()
        val = f.validation()
        ts = val.view_space()
        rows = view_rows(ts, val.views) if ts is not None else None
        ep, _ = search_alpha(val.ep_task, val.spaces[EPISODIC], alphas, default)
        aw, params = search_alpha(val.aw_task, val.spaces[ALLWAY], alphas, default, rows)
        record(state, EPISODIC, ep, fixed)
        record(state, ALLWAY, aw, fixed)
        state.hparams["normalisation"] = NORMALISATION
        state.selected_on["normalisation"] = "fixed (the authors' code normalises every encoded crop)"
        record_views(state, ALLWAY, val.views, val.why)
        keep, how = transfer_rows(store, config, f.device, val.views)
        state.hparams["new_classes"] = (
            f"{NEIGHBOURS} nearest rows + {TEXT_COPIES} copies of the text weight; the all-way alpha"
        )
        state.selected_on["new_classes"] = f"fixed (the authors' main_base2new.py); rows: {how}"
        if params is not None and not bool(params[0].abs().sum()):
            state.metrics["allway.gda"] = (
                "zero scatter (one row per class): P = 0 as the authors' pinv(0), the classifier is zero-shot"
            )
        if keep is not None:
            state.tensors[TRANSFER_ROWS] = keep.cpu().half()  # store features are float16: nothing lost
        if rows is not None and params is not None:  # the state's own shots: the GDA of their views
            keep_allway_head(state, val.aw_task, {"pmu": params[0], "bias": params[1]})

    def make_head(self, state: MethodState, store, device: torch.device):
        text, bridge = state_text(state, device)
        keep = state.tensors.get(TRANSFER_ROWS)
        new_rows = bridge.embed_images(keep.to(device).float()) if keep is not None else None
        aw_alpha = hp(state, ALLWAY, "alpha")

        def make(regime: str):
            alpha = hp(state, regime, "alpha")

            def fit(support, classes):
                E, N, K, _ = support.shape
                ts = regime_text_space(state, store, regime, support, classes, bridge, text)
                if K == 0 and regime == EPISODIC and new_rows is not None:  # classes with no shot
                    pmu, b = gda_new_classes(new_rows, ts.weights)
                    return FittedGDA(ts.weights, pmu, b, aw_alpha, ts.embed)
                if K == 0:  # nothing to estimate: the GDA term is a constant (zero-shot)
                    z = ts.weights.new_zeros(ts.weights.shape)
                    return FittedGDA(ts.weights, z, ts.weights.new_full((E, N), math.log(1.0 / N)), alpha, ts.embed)
                kept = kept_allway_head(state, support, classes) if regime == ALLWAY else None
                pmu, b = (kept["pmu"], kept["bias"]) if kept is not None else gda_params(ts.support)
                return FittedGDA(ts.weights, pmu, b, alpha, ts.embed)

            return fit

        return RegimeHead(self.name, learned_mask(store, device), make(EPISODIC), make(ALLWAY), needs_text=True)


METHODS.register("gda", GDA)
