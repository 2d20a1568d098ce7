"""``linear-probe``'s published recipe (the default; the method is registered in
``linear_probe.py``): the linear probe as the CLIP few-shot papers run it.

- **All-way** (CoOp's ``lpclip``, Zhou et al., IJCV 2022, after Radford et al. 2021):
  scikit-learn's multinomial logistic regression (L-BFGS, 1,000 iterations, L2 penalty, an
  unpenalised bias) on the raw store features of the K shots per class. Its inverse
  regularisation strength C is searched as ``lpclip`` searches it, on the val rows (CoOp's
  min(K, 4) per class): the 7 values 1e6, 1e4, ..., 1e-6, then 8 rounds of bisection in log10 C
  between a tenth and ten times the best, each round keeping the better end (ties: the lower C)
  and halving the interval toward it; the last round's winner is the probe. The state keeps that
  probe for its own shots (``fskd eval`` with the fit's seed scores exactly it); other seeds'
  shots are refitted at the chosen C.
- **Episodic** (Tian et al., ECCV 2020, "Rethinking few-shot image classification", whose code
  fits this per episode): the same logistic regression on the L2-normalised support of each
  episode at a fixed C (their 1.0, ``--set episodic_c``). One scikit-learn fit per episode, so
  evaluation loops over episodes (600 5-way 1-shot episodes: a few seconds).

``benchmarks/parity.py`` holds the all-way probe to a re-derivation of ``lpclip``'s search.
fskd's own probe (prototype initialisation, Adam, weight decay and steps chosen on
validation, batched over episodes) is the ``tuned`` recipe (``--set recipe=tuned``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fskd.methods.adapt.method import AdaptMethod, AdaptOptions, Fit
from fskd.methods.adapt.regimes import (
    ALLWAY,
    EPISODIC,
    FittedWeights,
    RegimeHead,
    keep_allway_head,
    kept_allway_head,
    learned_mask,
    require_shots,
)
from fskd.methods.adapt.validation import hp
from fskd.methods.base import MethodState

#: lpclip's first search: C from 1e6 down to 1e-6 in steps of 100
C_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)
#: lpclip's bisection rounds after the grid
ROUNDS = 8
#: scikit-learn's default C, used when there are no val rows to search on
DEFAULT_C = 1.0


@dataclass(frozen=True)
class LPClipOptions(AdaptOptions):
    c: float | None = None  # all-way inverse L2 strength (None: lpclip's search on the val rows)
    rounds: int = ROUNDS  # bisection rounds of the search after the 7-value grid (lpclip's 8)
    episodic_c: float = 1.0  # episodic inverse L2 strength (RFS's fixed 1.0)
    max_iter: int = 1000  # L-BFGS iterations per fit (lpclip's and RFS's 1,000)

    RANGES = {"c": (">", 0), "rounds": (">=", 0), "episodic_c": (">", 0), "max_iter": (">=", 1)}


def logistic_regression(
    x: np.ndarray, y: np.ndarray, n: int, c: float, max_iter: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """scikit-learn's L-BFGS logistic regression of rows ``x`` (S, D) on way labels ``y`` in
    0..n-1 (every way present): (weights (n, D), bias (n,), 1 when it stopped at ``max_iter``)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf = LogisticRegression(solver="lbfgs", max_iter=max_iter, C=c).fit(x, y)
    capped = int(any(issubclass(w.category, ConvergenceWarning) for w in caught))
    if clf.coef_.shape[0] == 1:  # two ways: one decision function w.x + b for way 1 against way 0
        w = np.concatenate([np.zeros_like(clf.coef_), clf.coef_])
        b = np.concatenate([np.zeros(1, clf.intercept_.dtype), clf.intercept_])
    else:
        w, b = clf.coef_, clf.intercept_
    if n != len(clf.classes_):
        raise AssertionError(f"{n} ways, {len(clf.classes_)} in the labels")
    return w.astype(np.float32), b.astype(np.float32), capped


@dataclass
class Search:
    c: float
    weights: np.ndarray
    bias: np.ndarray
    score: float
    table: list  # [{"c": ..., "val_acc": ...}] in the order fitted
    capped: int  # fits that stopped at max_iter


def lpclip_search(
    x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, n: int, rounds: int = ROUNDS, max_iter: int = 1000
) -> Search:
    """CoOp's lpclip search of C on val rows ``xv`` / ``yv`` (way labels): the 7-value grid, then
    ``rounds`` rounds of log10 bisection around its best; the last round's winner (the grid's
    best when ``rounds`` is 0). A C met twice is fitted once (L-BFGS is deterministic)."""
    fits: dict[float, tuple] = {}
    table = []

    def fit(c: float):
        if c not in fits:
            w, b, capped = logistic_regression(x, y, n, c, max_iter)
            acc = float(np.mean((xv @ w.T + b).argmax(1) == yv))
            fits[c] = (w, b, acc, capped)
            table.append({"c": float(f"{c:.6g}"), "val_acc": round(100 * acc, 2)})
        return fits[c]

    accs = [fit(c)[2] for c in C_GRID]
    best = C_GRID[int(np.argmax(accs))]
    final = best
    left, right = 0.1 * best, 10.0 * best
    for _ in range(rounds):
        acc_l, acc_r = fit(left)[2], fit(right)[2]
        mid = 10 ** (0.5 * (math.log10(left) + math.log10(right)))
        if acc_l < acc_r:
            final, left = right, mid
        else:
            final, right = left, mid
    w, b, acc, _ = fits[final]
    return Search(final, w, b, acc, table, sum(f[3] for f in fits.values()))


def fit_episodes(support: torch.Tensor, c: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(E, N, K, D) support -> weights (E, N, D), bias (E, N): one fit per episode (scikit-learn
    has no batched solver); the count of fits that stopped at ``max_iter``."""
    E, N, K, D = support.shape
    x = support.detach().float().cpu().numpy().reshape(E, N * K, D)
    y = np.repeat(np.arange(N), K)
    out = [logistic_regression(x[e], y, N, c, max_iter) for e in range(E)]
    w = torch.from_numpy(np.stack([o[0] for o in out])).to(support.device)
    b = torch.from_numpy(np.stack([o[1] for o in out])).to(support.device)
    return w, b, sum(o[2] for o in out)


def _raw(x: torch.Tensor) -> torch.Tensor:
    return x


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


class LPClip(AdaptMethod):
    """CoOp's linear probe (lpclip: L-BFGS logistic regression, C searched on val) all-way;
    RFS's per episode (C = 1).

    ``linear-probe``'s published recipe (the default)."""

    name = "linear-probe"
    options = LPClipOptions
    uses_device = False  # scikit-learn fits on the CPU

    def fit_state(self, f: Fit) -> None:
        config, opts, state = f.config, f.opts, f.state
        state.hparams.update(
            {
                "episodic.c": opts.episodic_c,
                "episodic.features": "L2-normalised",
                "allway.features": "raw store features",
                "normalisation": "all-way: none (lpclip fits the raw features); episodic: L2 per row (RFS); "
                "stored views not used",
                "max_iter": opts.max_iter,
                "rounds": opts.rounds,
            }
        )
        state.selected_on.update(
            {
                "episodic.c": "fixed (RFS's C = 1)" if opts.episodic_c == 1.0 else "fixed (--set option)",
                "max_iter": "fixed (lpclip's 1,000)" if opts.max_iter == 1000 else "fixed (--set option)",
                "rounds": "fixed (lpclip's 8)" if opts.rounds == ROUNDS else "fixed (--set option)",
                "allway.features": "fixed (lpclip's)",
                "episodic.features": "fixed (RFS's)",
                "normalisation": "fixed (the authors' code: lpclip, RFS)",
            }
        )
        task = f.allway_task() if config.shots > 0 else None
        if opts.c is not None or task is None:
            c = opts.c if opts.c is not None else DEFAULT_C
            state.hparams["allway.c"] = c
            state.selected_on["allway.c"] = (
                "fixed (--set option)" if opts.c is not None else "default (no val rows): C = 1, scikit-learn's default"
            )
            return
        _, N, K, D = task.support.shape
        x = task.support[0].reshape(N * K, D).numpy()
        y = np.repeat(np.arange(N), K)
        s = lpclip_search(x, y, task.query[0].numpy(), task.truth[0].numpy(), N, opts.rounds, opts.max_iter)
        state.hparams["allway.c"] = s.c
        state.selected_on["allway.c"] = task.on
        state.metrics["allway.val_acc"] = round(100 * s.score, 2)
        state.metrics["allway.val_task"] = task.description
        state.metrics["allway.c_search"] = s.table
        state.metrics["allway.fits_at_max_iter"] = s.capped
        keep_allway_head(
            state, task, {"weights": torch.from_numpy(s.weights)[None], "bias": torch.from_numpy(s.bias)[None]}
        )

    def make_head(self, state: MethodState, store, device: torch.device):
        max_iter = int(state.hparams["max_iter"])

        def allway(support, classes):
            require_shots(support, self.name)
            kept = kept_allway_head(state, support, classes)
            if kept is not None:
                return FittedWeights(kept["weights"], _raw, kept["bias"])
            w, b, _ = fit_episodes(support, float(hp(state, ALLWAY, "c")), max_iter)
            return FittedWeights(w, _raw, b)

        def episodic(support, classes):
            require_shots(support, self.name)
            w, b, _ = fit_episodes(_unit(support), float(hp(state, EPISODIC, "c")), max_iter)
            return FittedWeights(w, _unit, b)

        return RegimeHead(self.name, learned_mask(store, device), episodic, allway)
