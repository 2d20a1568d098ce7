"""Accuracy summaries, each saying which statistic it is.

- Episodes: mean and a 95% CI half-width by the normal approximation, 1.96 * s / sqrt(E) (the
  few-shot convention; E is in the hundreds).
- Seeds (the all-way protocol): mean, sample std, and a 95% CI half-width by Student's t with
  n - 1 degrees of freedom, t * s / sqrt(n) (for 3 seeds t = 4.30, about 2.5 x the std); with
  one seed there is no interval (None), never "± 0.00".
- Paired differences (two methods on the same episodes or seeds): the same two rules applied to
  the per-episode / per-seed differences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: how each summary's interval is computed, quoted in results and reports
EPISODE_CI = "95% CI, normal approximation over episodes (1.96 s / sqrt(E))"
SEED_CI = "95% CI, Student t over seeds (t(0.975, n-1) s / sqrt(n))"


def t975(dof: int) -> float:
    """Two-sided 95% Student t quantile."""
    from scipy import stats

    return float(stats.t.ppf(0.975, dof))


def mean_ci95(acc: np.ndarray) -> tuple[float, float]:
    """Mean and 95% CI half-width over episodes (normal approximation), in percent."""
    acc = np.asarray(acc, dtype=np.float64) * 100.0
    if len(acc) < 2:
        return float(acc.mean()), 0.0
    return float(acc.mean()), float(1.96 * acc.std(ddof=1) / np.sqrt(len(acc)))


def mean_std(acc: np.ndarray) -> tuple[float, float]:
    """Mean and sample std over seeds, in percent (std 0 for one seed)."""
    acc = np.asarray(acc, dtype=np.float64) * 100.0
    return float(acc.mean()), float(acc.std(ddof=1)) if len(acc) > 1 else 0.0


@dataclass(frozen=True)
class SeedSummary:
    """Mean, std and Student-t 95% CI half-width over seeds, in percent; None when n == 1."""

    mean: float
    std: float | None
    ci95: float | None
    n: int


def seed_summary(values) -> SeedSummary:
    """``values``: per-seed accuracies as fractions."""
    a = np.asarray(values, dtype=np.float64) * 100.0
    if len(a) == 0:
        raise ValueError("no values to summarise")
    if len(a) == 1:
        return SeedSummary(float(a[0]), None, None, 1)
    s = float(a.std(ddof=1))
    return SeedSummary(float(a.mean()), s, t975(len(a) - 1) * s / float(np.sqrt(len(a))), len(a))


def paired_difference(a, b, rule: str) -> dict:
    """Mean of ``a - b`` (fractions, paired by episode or seed) and its 95% CI, in percent.
    ``rule``: "episodes" (normal approximation) or "seeds" (Student t)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if rule == "episodes":
        mean, half = mean_ci95(d)
        how = EPISODE_CI
    else:
        s = seed_summary(d)
        mean, half, how = s.mean, s.ci95, SEED_CI
    out = {
        "difference": round(mean, 3),
        "ci95": None if half is None else round(half, 3),
        "n": int(len(d)),
        "statistic": f"paired difference; {how}",
    }
    out["excludes_zero"] = None if half is None else bool(abs(mean) > half)
    return out


def class_accuracies(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class accuracy (C,) of way-index predictions; NaN for a class with no rows."""
    total = np.bincount(truth, minlength=n_classes).astype(np.float64)
    hit = np.bincount(truth[pred == truth], minlength=n_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, hit / np.maximum(total, 1), np.nan)


#: equal-width confidence bins of the expected calibration error (Guo et al., 2017)
ECE_BINS = 15


def ece_bins(conf: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """The bin of each confidence in [0, 1]: bin b holds (b/bins, (b+1)/bins], as Guo et al.'s
    ECE; a confidence of exactly 0 is in bin 0."""
    uppers = np.arange(1, bins + 1) / bins
    return np.minimum(np.searchsorted(uppers, conf, side="left"), bins - 1)


class Calibration:
    """Expected calibration error (``ECE_BINS`` equal-width bins of the top-1 softmax
    probability: the row-weighted mean of |accuracy - confidence| per bin) and negative
    log-likelihood of the true class, accumulated over query batches of logits."""

    def __init__(self, bins: int = ECE_BINS) -> None:
        self.bins = bins
        self.count = np.zeros(bins)
        self.confidence = np.zeros(bins)
        self.correct = np.zeros(bins)
        self.nll = 0.0
        self.n = 0

    def add(self, logits, truth) -> None:
        """``logits`` (M, N) torch tensor of class scores, ``truth`` (M,) class positions."""
        import torch

        logp = torch.log_softmax(logits.double(), dim=-1)
        conf, pred = logp.max(-1)
        conf = conf.exp().cpu().numpy()
        t = truth.to(logp.device)
        hit = (pred == t).cpu().numpy()
        self.nll += float(-logp.gather(1, t[:, None]).sum())
        b = ece_bins(conf, self.bins)
        self.count += np.bincount(b, minlength=self.bins)
        self.confidence += np.bincount(b, weights=conf, minlength=self.bins)
        self.correct += np.bincount(b, weights=hit, minlength=self.bins)
        self.n += len(conf)

    def ece(self) -> float:
        """ECE as a fraction."""
        return float(np.abs(self.correct - self.confidence).sum() / max(self.n, 1))

    def mean_nll(self) -> float:
        return self.nll / max(self.n, 1)
