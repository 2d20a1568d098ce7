"""Class splits (base/val/novel) for episodes and sample splits (train/val/test) for all-way.

Precedence for the class split: ``--class-split FILE`` > the dataset's standard split > a
seeded ratio split. For sample splits: the dataset's own train/val/test (val carved from train
when missing) unless ``--sample-split`` asks for a seeded per-class split, which is also used
when the dataset has a single pool of images. Whatever is used is stored in the feature store.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from fskd.datasets.base import DatasetListing, SampleList
from fskd.errors import ConfigError, DatasetError
from fskd.fsutil import parse_json_file

log = logging.getLogger(__name__)

CLASS_SPLITS = ("base", "val", "novel")
SAMPLE_SPLITS = ("train", "val", "test")
DEFAULT_SAMPLE_RATIOS = (0.5, 0.1, 0.4)
VAL_FROM_TRAIN = 0.1


def resolve_class_split(
    listing: DatasetListing,
    split_file: str | None = None,
    ratios: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> tuple[dict[str, list[int]], str]:
    """Return ``{base|val|novel: [class index, ...]}`` and a description of where it came from."""
    keys = listing.class_keys
    if split_file:
        return _class_split_from_file(listing, Path(split_file)), f"file {split_file}"
    if listing.standard_class_split:
        index = {k: i for i, k in enumerate(keys)}
        std = listing.standard_class_split
        unknown = [k for s in CLASS_SPLITS for k in std.get(s, []) if k not in index]
        if unknown:
            raise DatasetError(
                f"dataset {listing.name!r} under {listing.root}: its standard class split names classes "
                f"the files do not have: {', '.join(map(repr, unknown[:10]))}; the files are not the "
                f"release this dataset expects"
            )
        split = {s: sorted(index[k] for k in std.get(s, [])) for s in CLASS_SPLITS}
        return split, listing.class_split_source or "standard"
    order = np.random.default_rng(seed).permutation(len(keys))
    n_base = int(round(ratios[0] * len(keys)))
    n_val = int(round(ratios[1] * len(keys)))
    split = {
        "base": sorted(order[:n_base].tolist()),
        "val": sorted(order[n_base : n_base + n_val].tolist()),
        "novel": sorted(order[n_base + n_val :].tolist()),
    }
    return split, f"seeded ratio split {tuple(ratios)} seed {seed}"


def _class_split_from_file(listing: DatasetListing, path: Path) -> dict[str, list[int]]:
    try:
        data = parse_json_file(path, "--class-split")
    except ConfigError as e:
        raise DatasetError(str(e)) from None
    if not isinstance(data, dict) or set(data) - set(CLASS_SPLITS):
        raise DatasetError(
            f"--class-split file {path} must be a JSON object with keys {', '.join(CLASS_SPLITS)}"
            f" (lists of class names), got keys {sorted(data) if isinstance(data, dict) else type(data).__name__}"
        )
    for s, names in data.items():
        if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
            raise DatasetError(
                f"--class-split file {path}: {s!r} must be a list of class names (strings), got "
                f"{json.dumps(names)[:120]}"
            )
    lookup: dict[str, int] = {}
    for i, (k, n) in enumerate(zip(listing.class_keys, listing.class_names, strict=True)):
        lookup[k] = i
        lookup.setdefault(n, i)
    split: dict[str, list[int]] = {}
    seen: dict[int, str] = {}
    unknown: list[str] = []
    for s in CLASS_SPLITS:
        idx = []
        for name in data.get(s, []):
            if name not in lookup:
                unknown.append(name)
                continue
            i = lookup[name]
            if i in seen:
                raise DatasetError(f"--class-split file {path}: class {name!r} is in both {seen[i]!r} and {s!r}")
            seen[i] = s
            idx.append(i)
        split[s] = sorted(idx)
    if unknown:
        raise DatasetError(
            f"--class-split file {path} names classes not in dataset {listing.name!r}: "
            f"{', '.join(map(repr, unknown[:20]))}; known classes start with "
            f"{', '.join(map(repr, listing.class_keys[:5]))}"
        )
    missing = [listing.class_keys[i] for i in range(len(listing.class_keys)) if i not in seen]
    if missing:
        log.warning("--class-split %s leaves %d classes out of every split: %s", path, len(missing), missing[:10])
    return split


def _per_class_split(rows: SampleList, ratios: tuple[float, float, float], seed: int) -> dict[str, SampleList]:
    rng = np.random.default_rng(seed)
    assign = np.empty(len(rows), dtype=np.int8)
    for c in np.unique(rows.labels):
        idx = np.flatnonzero(rows.labels == c)
        perm = rng.permutation(idx)
        n_train = int(round(ratios[0] * len(idx)))
        n_val = int(round(ratios[1] * len(idx)))
        assign[perm[:n_train]] = 0
        assign[perm[n_train : n_train + n_val]] = 1
        assign[perm[n_train + n_val :]] = 2
    return {
        name: SampleList([rows.refs[i] for i in np.flatnonzero(assign == k)], rows.labels[assign == k])
        for k, name in enumerate(SAMPLE_SPLITS)
    }


def _concat(parts: list[SampleList]) -> SampleList:
    return SampleList([r for p in parts for r in p.refs], np.concatenate([p.labels for p in parts]))


def resolve_sample_splits(
    listing: DatasetListing, ratios: tuple[float, float, float] | None = None, seed: int = 0
) -> tuple[dict[str, SampleList], str]:
    """Return train/val/test rows and a description of the rule used."""
    own = listing.splits
    src = listing.sample_split_source or "dataset's own splits"
    if ratios is not None or set(own) == {"all"}:
        r = tuple(ratios) if ratios is not None else (listing.pool_ratios or DEFAULT_SAMPLE_RATIOS)
        pooled = _concat([own[s] for s in sorted(own)])
        why = f" ({src})" if listing.sample_split_source and ratios is None else ""
        return _per_class_split(pooled, r, seed), f"seeded per-class split {r} seed {seed}{why}"
    if "train" in own and "val" not in own:
        frac = listing.val_from_train or VAL_FROM_TRAIN
        carved = _per_class_split(own["train"], (1 - frac, frac, 0.0), seed)
        out = {"train": carved["train"], "val": carved["val"]}
        out.update({s: own[s] for s in own if s != "train"})
        return out, f"{src}; val = seeded {frac:.0%} of train per class"
    return dict(own), src
