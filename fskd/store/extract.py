"""Encode a dataset once into a feature store: batched, streaming, resumable, shardable.

- Rows are processed in the store's row chunks; a chunk is written whole and only then marked
  written, so a killed run resumes at the first unwritten chunk and never trusts a partial one.
- Batches never cross a chunk boundary, so a resumed or sharded run feeds the model the very
  same batches as an uninterrupted single-process run: the stores are identical.
- Under ``torchrun`` every rank takes the chunks ``c % world_size == rank``; rank 0 creates the
  store (atomically) before the others open it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fskd import __version__
from fskd.config import ExtractConfig
from fskd.datasets import build_dataset
from fskd.datasets.base import ImageDataset
from fskd.datasets.splits import resolve_class_split, resolve_sample_splits
from fskd.encoders import Encoder, build_encoder
from fskd.encoders.base import weights_identity
from fskd.encoders.prompts import (
    class_prompts,
    encode_class_texts,
    load_descriptions,
    load_templates,
)
from fskd.errors import DatasetError, StoreError
from fskd.runtime import autocast, barrier, init_distributed, num_workers, resolve_device
from fskd.store import schema as S
from fskd.store.store import FeatureStore, SplitRows

log = logging.getLogger(__name__)

#: progress(split, rows_done, rows_total, images_per_second)
Progress = Callable[[str, int, int, float], None]


@dataclass
class ExtractResult:
    store: str
    fingerprint: str
    reused: bool
    encoded: int
    seconds: float
    images_per_s: float
    rows: dict[str, int]
    skipped: dict[str, list[str]] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1


class _Rows(Dataset):
    """(image tensor, row index, ok, error message) for the rows of one split."""

    def __init__(self, source: ImageDataset, refs: list[str], preprocess, blank: torch.Tensor) -> None:
        self.source, self.refs, self.preprocess, self.blank = source, refs, preprocess, blank

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        try:
            return self.preprocess(self.source.open(self.refs[i])), i, True, ""
        except Exception as e:  # any decoder error: report which file, let the caller decide
            return self.blank, i, False, f"{self.source.path_of(self.refs[i])}: {type(e).__name__}: {e}"


def _chunk_batches(chunks: list[int], n: int, chunk_rows: int, batch: int) -> list[list[int]]:
    out = []
    for c in chunks:
        stop = min(n, (c + 1) * chunk_rows)
        out += [list(range(s, min(stop, s + batch))) for s in range(c * chunk_rows, stop, batch)]
    return out


def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _check_existing(store: FeatureStore, cfg: ExtractConfig, fingerprint: str, parts: dict) -> None:
    """An existing store must come from the same inputs; otherwise say what differs, touch nothing."""
    if store.encoder_spec != cfg.encoder:
        raise StoreError(
            f"{store.path} was extracted with encoder {store.encoder_spec!r}, not {cfg.encoder!r}; "
            f"use another --store path (the existing store is left untouched)"
        )
    if store.fingerprint != fingerprint:
        old = store.attrs.get("inputs", {})
        diff = sorted(k for k in set(old) | set(parts) if old.get(k) != parts.get(k))
        raise StoreError(
            f"{store.path} was extracted from different inputs (differs in: {', '.join(diff) or 'fingerprint'}); "
            f"use another --store path (the existing store is left untouched)"
        )


def extract(cfg: ExtractConfig, progress: Progress | None = None, source: ImageDataset | None = None) -> ExtractResult:
    """Run ``fskd extract``: see the module docstring. ``source`` replaces the registered dataset
    ``cfg.dataset`` with a dataset object (benchmarks use an in-memory one)."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    dist = init_distributed(device)
    source = source if source is not None else build_dataset(cfg.dataset, cfg.root, cfg.download)
    listing = source.listing()
    class_split, split_source = resolve_class_split(listing, cfg.class_split, cfg.class_ratio, cfg.split_seed)
    sample_splits, sample_rule = resolve_sample_splits(listing, cfg.sample_split, cfg.split_seed)
    templates = load_templates(cfg.templates)
    descriptions = (
        load_descriptions(cfg.descriptions, listing.class_keys, listing.class_names) if cfg.descriptions else None
    )
    parts = {
        "schema_version": S.SCHEMA_VERSION,
        "dataset": listing.name,
        "listing": listing.fingerprint(),
        "encoder": cfg.encoder,
        "encoder_weights": weights_identity(cfg.encoder),
        "dtype": cfg.dtype,
        "chunk_rows": cfg.chunk_rows,
        "class_split": class_split,
        "sample_split": {s: hashlib.sha256("\n".join(r.refs).encode()).hexdigest()[:16] for s, r in sample_splits.items()},
        "templates": list(templates),
        "descriptions": descriptions,
    }
    fingerprint = _fingerprint(parts)

    # every rank must take the same branch below: look at the path only between two barriers,
    # before rank 0 may create the store
    barrier()
    exists = Path(cfg.store).exists()
    barrier()
    store = None
    if exists:
        store = FeatureStore.open(cfg.store, mode="r+")
        _check_existing(store, cfg, fingerprint, parts)
        if store.is_complete():
            log.info("store %s is complete; nothing to encode", cfg.store)
            return ExtractResult(cfg.store, fingerprint, True, 0, time.perf_counter() - t0, 0.0,
                                 {s: store.n_rows(s) for s in store.splits}, store.skipped(), dist.rank, dist.world_size)

    encoder = build_encoder(cfg.encoder, device)
    if store is None:
        if dist.is_main:
            prompts = class_prompts(listing.class_names, templates, descriptions)
            emb = encode_class_texts(encoder, prompts).numpy() if encoder.has_text else None
            attrs = {
                "format": S.FORMAT,
                "schema_version": S.SCHEMA_VERSION,
                "fskd_version": __version__,
                "fingerprint": fingerprint,
                "inputs": parts,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "encoder": encoder.describe(),
                "dataset": {"name": listing.name, "root": listing.root, "fingerprint": listing.fingerprint()},
                "class_split": {**class_split, "source": split_source},
                "sample_split": {"rule": sample_rule, "sizes": {s: len(r) for s, r in sample_splits.items()}},
                "splits": list(sample_splits),
                "dim": encoder.image_dim,
                "dtype": cfg.dtype,
                "chunk_rows": cfg.chunk_rows,
                "text": {
                    "available": emb is not None,
                    "dim": encoder.text_dim,
                    "source": "templates+descriptions" if descriptions else "templates",
                    "templates": list(templates),
                },
                "config": cfg.to_dict(),
            }
            FeatureStore.create(
                cfg.store,
                attrs=attrs,
                splits={s: SplitRows(r.refs, r.labels) for s, r in sample_splits.items()},
                class_keys=listing.class_keys,
                class_names=listing.class_names,
                prompts=list(templates),
                class_embeddings=emb,
            )
        barrier()
        store = FeatureStore.open(cfg.store, mode="r+")

    encoded = 0
    t_enc = time.perf_counter()
    for split in store.splits:
        encoded += _extract_split(store, split, source, sample_splits[split].refs, encoder, cfg, device, dist, progress)
    barrier()
    seconds = time.perf_counter() - t0
    rate = encoded / max(time.perf_counter() - t_enc, 1e-9)
    store = FeatureStore.open(cfg.store)
    return ExtractResult(cfg.store, fingerprint, False, encoded, seconds, rate,
                         {s: store.n_rows(s) for s in store.splits}, store.skipped(), dist.rank, dist.world_size)


def _extract_split(
    store: FeatureStore,
    split: str,
    source: ImageDataset,
    refs: list[str],
    encoder: Encoder,
    cfg: ExtractConfig,
    device: torch.device,
    dist,
    progress: Progress | None,
) -> int:
    n, rows = len(refs), store.chunk_rows
    done = store.written(split)
    todo = [c for c in range(len(done)) if not done[c] and c % dist.world_size == dist.rank]
    if not todo or n == 0:
        return 0
    blank = encoder.preprocess(_blank_image())
    loader = DataLoader(
        _Rows(source, refs, encoder.preprocess, blank),
        batch_sampler=_chunk_batches(todo, n, rows, cfg.batch_size),
        num_workers=num_workers(cfg.workers),
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers(cfg.workers) > 0 else None,
    )
    labels_all = store.labels(split)
    mine = sum(min(n, (c + 1) * rows) - c * rows for c in todo)
    channels_last = device.type == "cuda"
    if channels_last:
        for m in encoder.modules():
            m.to(memory_format=torch.channels_last)
    chunk, buf, lab, filled, count = None, None, None, 0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for images, idx, ok, errors in loader:
            if not bool(ok.all()):
                bad = [e for e, o in zip(errors, ok.tolist(), strict=True) if not o]
                if not cfg.skip_bad:
                    raise DatasetError(
                        f"cannot read image {bad[0]} (pass --skip-bad to record unreadable files and go on; "
                        f"chunks already written are kept)"
                    )
                log.warning("skipping %d unreadable file(s): %s", len(bad), bad)
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                feats = encoder.encode_images(images)
            feats = feats.float().cpu().numpy()
            idx = idx.numpy()
            c = int(idx[0]) // rows
            if c != chunk:
                chunk, filled = c, 0
                size = min(n, (c + 1) * rows) - c * rows
                buf = np.zeros((size, feats.shape[1]), np.float32)
                lab = labels_all[c * rows : c * rows + size].astype(np.int32).copy()
            local = idx - c * rows
            buf[local] = feats
            okn = ok.numpy()
            buf[local[~okn]] = 0.0
            lab[local[~okn]] = -1
            filled += len(idx)
            count += len(idx)
            if filled == len(buf):
                store.write_chunk(split, c, buf.astype(S.FEATURE_DTYPES[store.attrs["dtype"]]), lab)
            if progress is not None:
                progress(split, count, mine, count / max(time.perf_counter() - t0, 1e-9))
    return count


def _blank_image():
    from PIL import Image

    return Image.new("RGB", (32, 32))
