"""Synthetic feature stores with known structure, for tests and benchmarks.

Class means are drawn in a latent space; image features are the means mapped into an image
space plus noise; class text features are the same means mapped into a text space by another
linear map (so a bridge is learnable), plus a shared offset (the modality gap). With
``joint=True`` the text features live in the image space itself (an aligned, CLIP-like pair).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fskd.store.store import FeatureStore


def synthetic_features(
    n_classes: int = 20,
    per_class: int = 30,
    dim: int = 32,
    text_dim: int = 16,
    latent: int = 8,
    noise: float = 0.6,
    gap: float = 0.5,
    joint: bool = False,
    seed: int = 0,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Return ``({train|val|test: (features, labels)}, text (C, d_t))``; half the rows of each class
    go to train, a sixth to val, the rest to test."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n_classes, latent))
    a = rng.normal(size=(latent, dim)) / np.sqrt(latent)
    means = z @ a
    labels = np.repeat(np.arange(n_classes), per_class)
    x = means[labels] + noise * rng.normal(size=(len(labels), dim))
    if joint:
        text = means + gap * rng.normal(size=(1, dim))
    else:
        b = rng.normal(size=(latent, text_dim)) / np.sqrt(latent)
        text = z @ b + gap * rng.normal(size=(1, text_dim))
    text = (text / np.linalg.norm(text, axis=1, keepdims=True)).astype(np.float32)
    pos = np.concatenate([rng.permutation(per_class) for _ in range(n_classes)])
    n_tr, n_va = per_class // 2, per_class // 6
    parts = {"train": pos < n_tr, "val": (pos >= n_tr) & (pos < n_tr + n_va), "test": pos >= n_tr + n_va}
    return {s: (x[m].astype(np.float32), labels[m]) for s, m in parts.items()}, text


def make_synthetic_store(
    path: str | Path,
    n_classes: int = 20,
    joint: bool = False,
    seed: int = 0,
    split: tuple[int, int, int] | None = None,
    **kwargs: Any,
) -> FeatureStore:
    """A complete store of :func:`synthetic_features`; classes split base/val/novel in halves/quarters."""
    splits, text = synthetic_features(n_classes=n_classes, joint=joint, seed=seed, **kwargs)
    nb, nv, _ = split or (n_classes // 2, n_classes // 4, n_classes - n_classes // 2 - n_classes // 4)
    order = np.random.default_rng(seed + 1).permutation(n_classes)
    class_split = {
        "base": sorted(order[:nb].tolist()),
        "val": sorted(order[nb : nb + nv].tolist()),
        "novel": sorted(order[nb + nv :].tolist()),
    }
    return FeatureStore.from_arrays(
        path,
        splits,
        [f"class {i}" for i in range(n_classes)],
        class_split,
        text_embeddings=text,
        encoder={"spec": f"synthetic-features:{'joint' if joint else 'pair'}", "joint": joint},
        dataset="synthetic",
        chunk_rows=64,
    )
