"""Accuracy summaries: mean with a 95% confidence interval, mean and std over seeds."""

from __future__ import annotations

import numpy as np


def mean_ci95(acc: np.ndarray) -> tuple[float, float]:
    """Mean and 95% CI half-width (normal approximation, 1.96 * std / sqrt(n)), in percent."""
    acc = np.asarray(acc, dtype=np.float64) * 100.0
    if len(acc) < 2:
        return float(acc.mean()), 0.0
    return float(acc.mean()), float(1.96 * acc.std(ddof=1) / np.sqrt(len(acc)))


def mean_std(acc: np.ndarray) -> tuple[float, float]:
    """Mean and sample std over seeds, in percent."""
    acc = np.asarray(acc, dtype=np.float64) * 100.0
    return float(acc.mean()), float(acc.std(ddof=1)) if len(acc) > 1 else 0.0
