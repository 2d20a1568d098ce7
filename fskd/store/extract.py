"""Encode a dataset once into a feature store: batched, streaming, resumable, shardable.

- Rows are processed in the store's row chunks; a chunk is written whole and only then marked
  written, so a killed run resumes at the first unwritten chunk and never trusts a partial one.
- Batches never cross a chunk boundary, so a resumed or sharded run feeds the model the very
  same batches as an uninterrupted single-process run: the stores are identical.
- Under ``torchrun`` every rank takes the chunks ``c % world_size == rank``; rank 0 creates the
  store (atomically) before the others open it. A single process locks (flock) the parent
  folder while it creates the store and the store folder while it fills it, so a second
  ``fskd extract`` of the same store waits, then finds it complete (or resumes it).
- The fingerprint covers the dataset listing (names, labels), the size and modification time of
  every image file, and, with ``--content-hash``, a SHA-256 of every file: an image replaced after
  extraction is noticed, not served stale.
- An existing store is verified before it is reused: chunks marked written whose data is missing,
  undecodable or fails its checksum are encoded again (a repair), see ``schema.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fskd import __version__
from fskd.config import ExtractConfig
from fskd.datasets import build_dataset
from fskd.datasets.base import (
    FRAMES_INFO,
    DatasetListing,
    ImageDataset,
    SampleList,
    fs_text,
    text_bytes,
)
from fskd.datasets.splits import resolve_class_split, resolve_sample_splits
from fskd.encoders import Encoder, build_encoder
from fskd.encoders.base import weights_identity
from fskd.encoders.prompts import (
    class_prompts,
    encode_class_texts,
    load_descriptions,
    load_templates,
)
from fskd.errors import DatasetError, Interrupted, StoreError
from fskd.fsutil import check_writable, dir_lock, sha256_file
from fskd.runtime import DistInfo, autocast, barrier, init_distributed, num_workers, resolve_device
from fskd.store import schema as S
from fskd.store.creation import SplitRows
from fskd.store.location import Location, backend_errors
from fskd.store.store import FeatureStore

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

#: progress(split, rows_done, rows_total, images_per_second)
Progress = Callable[[str, int, int, float], None]
#: an encoder's preprocessing: PIL image -> input tensor
Preprocess = Callable[["Image.Image"], torch.Tensor]
#: what the image datasets below give per item: (image tensor, item, ok, error or note)
Item = tuple[torch.Tensor, int, bool, str]


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
    repaired: dict[str, dict[int, str]] = field(default_factory=dict)  # split -> chunk -> why re-encoded
    ignored: dict[str, int] = field(default_factory=dict)  # files the dataset listing left out, by reason
    views_encoded: int = 0  # augmented views encoded by this run (--augment-views)
    views_rows: int = 0  # train rows the store's views cover


class ImageRows(Dataset[Item]):
    """(image tensor, row index, ok, message) for the rows of one split: the error when not ok,
    else a note ("PATH (N frames)": only the first frame of a multi-frame file is encoded) or ""."""

    def __init__(self, source: ImageDataset, refs: list[str], preprocess: Preprocess, blank: torch.Tensor) -> None:
        self.source, self.refs, self.preprocess, self.blank = source, refs, preprocess, blank

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> Item:
        try:
            image = self.source.open(self.refs[i])
            frames = image.info.get(FRAMES_INFO, 1)
            note = f"{self.source.path_of(self.refs[i])} ({frames} frames)" if frames > 1 else ""
            return self.preprocess(image), i, True, note
        except Exception as e:  # any decoder error: report which file, let the caller decide
            return self.blank, i, False, f"{self.source.path_of(self.refs[i])}: {type(e).__name__}: {e}"


def _chunk_batches(chunks: list[int], n: int, chunk_rows: int, batch: int) -> list[list[int]]:
    out = []
    for c in chunks:
        stop = min(n, (c + 1) * chunk_rows)
        out += [list(range(s, min(stop, s + batch))) for s in range(c * chunk_rows, stop, batch)]
    return out


def _fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def file_digest(source: ImageDataset, refs: list[str], contents: bool = False) -> str:
    """Hash of the size and modification time (and, with ``contents``, the SHA-256) of every file
    the rows are read from; rows with no file of their own (arrays, generated data) add nothing."""
    h = hashlib.sha256()
    seen: set[str] = set()
    # keys relative to the root, so the digest does not depend on how --root is spelled (string
    # slicing: a Path method per row costs seconds at ImageNet's 1.28M rows)
    prefix = f"{source.root}{os.sep}" if source.root else None
    for ref in refs:
        path = source.source_file(ref)
        if path is None:
            continue
        p = str(path)
        key = p[len(prefix) :] if prefix and p.startswith(prefix) else p
        if key in seen:
            continue
        seen.add(key)
        try:
            st = os.stat(path)
        except OSError:
            h.update(text_bytes(f"{key}\0missing\n"))
            continue
        h.update(text_bytes(f"{key}\0{st.st_size}\0{st.st_mtime_ns}\n"))
        if contents:
            h.update(sha256_file(Path(path)).encode())
    return h.hexdigest()[:32]


_DIFF_HINTS = {
    "files": "the size or modification time of image files changed since extraction",
    "contents": "the content of image files changed since extraction",
    "listing": "the list of images, classes or labels changed",
}


def _check_existing(store: FeatureStore, cfg: ExtractConfig, fingerprint: str, parts: dict[str, Any]) -> None:
    """An existing store must come from the same inputs; otherwise say what differs, touch nothing."""
    if store.encoder_spec != cfg.encoder:
        raise StoreError(
            f"{store.path} was extracted with encoder {store.encoder_spec!r}, not {cfg.encoder!r}; "
            f"use another --store path (the existing store is left untouched)"
        )
    old = store.attrs.get("inputs", {})
    diff = sorted(k for k in set(old) | set(parts) if k != "contents" and old.get(k) != parts.get(k))
    if parts.get("contents") and old.get("contents") and old["contents"] != parts["contents"]:
        diff.append("contents")
    if store.fingerprint != fingerprint or diff:
        why = "; ".join(f"{k}: {_DIFF_HINTS[k]}" if k in _DIFF_HINTS else k for k in diff) or "fingerprint"
        raise StoreError(
            f"{store.path} was extracted from different inputs (differs in: {why}); "
            f"use another --store path (the existing store is left untouched)"
        )


def _repair(store: FeatureStore, sample_splits: dict[str, SampleList]) -> dict[str, dict[int, str]]:
    """Verify every written chunk; clear the flags of the damaged ones (encoded again below) and
    rewrite missing id chunks from the listing. Text arrays cannot be repaired in place."""
    missing = store.missing_chunks()
    text = [m for m in missing if m.startswith(f"{S.TEXT_GROUP}/")]
    if text:
        raise StoreError(
            f"{store.path} is damaged beyond repair in place ({', '.join(text[:5])} missing); "
            f"re-extract into a new --store path"
        )
    for split in {m.split("/", 1)[0] for m in missing if f"/{S.SAMPLE_IDS} " in m}:
        store.rewrite_sample_ids(split, [fs_text(r) for r in sample_splits[split].refs])
    damaged = store.damaged_chunks(verify=True, missing=missing)
    for split, chunks in damaged.items():
        log.warning(
            "%s: re-encoding %d damaged chunk(s) of %s: %s",
            store.path,
            len(chunks),
            split,
            "; ".join(f"chunk {c}: {why}" for c, why in list(chunks.items())[:5]),
        )
        store.mark_unwritten(split, list(chunks))
    return damaged


def extract(cfg: ExtractConfig, progress: Progress | None = None, source: ImageDataset | None = None) -> ExtractResult:
    """Run ``fskd extract``: see the module docstring. ``source`` replaces the registered dataset
    ``cfg.dataset`` with a dataset object (benchmarks use an in-memory one). On object storage, a
    storage error at any step (a timeout after the bounded retries, a refused request) is one
    StoreError naming the URL."""
    try:
        with backend_errors(cfg.store):
            return _extract(cfg, progress, source)
    except KeyboardInterrupt:
        raise Interrupted(_interrupted(cfg.store)) from None


def _interrupted(store: str) -> str:
    """What an interrupted extract kept (whole row chunks are its unit of resume), and how to go on."""
    try:
        st = FeatureStore.open(store)
        kept = []
        for s in st.splits:
            w = st.written(s)
            rows = min(int(w.sum()) * st.chunk_rows, st.n_rows(s))
            kept.append(f"{s} {int(w.sum())}/{len(w)} chunks (~{rows:,}/{st.n_rows(s):,} rows)")
    except Exception:  # interrupted before the store existed, or while it was made
        return f"fskd extract was interrupted before any features of {store} were stored; run the same command again"
    return (
        f"fskd extract was interrupted; {store} keeps what was finished: {', '.join(kept)}. Run the same "
        f"command again to resume from there (--chunk-rows sets how much work one chunk holds)"
    )


def _extract(cfg: ExtractConfig, progress: Progress | None, source: ImageDataset | None) -> ExtractResult:
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    dist = init_distributed(device)
    source = source if source is not None else build_dataset(cfg.dataset, cfg.root, cfg.download)
    listing = source.listing()
    class_split, split_source = resolve_class_split(listing, cfg.class_split, cfg.class_ratio, cfg.split_seed)
    sample_splits, sample_rule = resolve_sample_splits(listing, cfg.sample_split, cfg.split_seed)
    templates = load_templates(cfg.templates) if cfg.templates or not listing.templates else tuple(listing.templates)
    templates_source = (
        f"--templates {cfg.templates}"
        if cfg.templates
        else f"dataset {listing.name!r} default (CoOp / Tip-Adapter)"
        if listing.templates
        else "fskd default"
    )
    descriptions = (
        load_descriptions(cfg.descriptions, listing.class_keys, listing.class_names) if cfg.descriptions else None
    )
    parts = {
        "schema_version": S.SCHEMA_VERSION,
        "dataset": listing.name,
        "listing": listing.fingerprint(),
        "encoder": cfg.encoder,
        "files": file_digest(source, [r for sl in sample_splits.values() for r in sl.refs]),
        "encoder_weights": weights_identity(cfg.encoder),
        "dtype": cfg.dtype,
        "chunk_rows": cfg.chunk_rows,
        "class_split": class_split,
        "sample_split": {
            s: hashlib.sha256(text_bytes("\n".join(r.refs))).hexdigest()[:16] for s, r in sample_splits.items()
        },
        "templates": list(templates),
        "descriptions": descriptions,
    }
    fingerprint = _fingerprint(parts)
    if cfg.content_hash:  # checked on top of the fingerprint, so stores made without it stay valid
        parts["contents"] = file_digest(source, [r for sl in sample_splits.values() for r in sl.refs], contents=True)
    ignored = dict(getattr(listing, "extra", {}).get("ignored", {}))
    single = dist.world_size == 1
    loc = Location(cfg.store)
    store_path = loc.local  # None on object storage
    if listing.root and store_path is not None:
        root = Path(listing.root).resolve()
        sp = store_path.expanduser().resolve()
        if sp == root or sp.is_relative_to(root) or root.is_relative_to(sp):
            raise StoreError(
                f"--store {cfg.store} overlaps the dataset root {listing.root}; a store inside the "
                f"dataset would change the dataset (write it somewhere else)"
            )
    if store_path is None:
        loc.probe()  # the bucket, the credentials and the endpoint, before any encoding
    elif single:
        check_writable(store_path, "--store")
        store_path.absolute().parent.mkdir(parents=True, exist_ok=True)
    encoder: Encoder | None = None

    def get_encoder() -> Encoder:  # built only when something must be encoded
        nonlocal encoder
        if encoder is None:
            encoder = build_encoder(cfg.encoder, device)
        return encoder

    # Two locks, no lock files (a single process on a local path; torchrun ranks coordinate with
    # barriers; object storage has no locks, schema.py): the parent folder while the store is
    # created, then the store folder while it is verified and filled. A second `fskd extract` of
    # the same store waits, then finds it complete or resumes.
    waiting = f"another fskd extract is writing {cfg.store}; waiting for it to finish"
    locked = store_path if single else None
    with dir_lock(locked.absolute().parent, waiting, log) if locked is not None else contextlib.nullcontext():
        # every rank must take the same branch: look at the path only between two barriers
        barrier()
        # on object storage a root still marked as being created is fskd's unfinished creation: made again
        exists = loc.exists() and (
            store_path is not None or (loc.root_attrs() or {}).get("format") != S.CREATING_FORMAT
        )
        barrier()
        if not exists:
            if dist.is_main:
                try:
                    _create(
                        cfg,
                        listing,
                        class_split,
                        split_source,
                        sample_splits,
                        sample_rule,
                        (templates, templates_source),
                        descriptions,
                        parts,
                        fingerprint,
                        ignored,
                        get_encoder(),
                    )
                except StoreError:
                    # object storage: another `fskd extract` completed the store meanwhile; resume into it
                    # (its inputs are checked like any existing store's)
                    if store_path is not None or (loc.root_attrs() or {}).get("format") != S.FORMAT:
                        raise
                    log.info("%s was created by another fskd extract meanwhile; resuming into it", cfg.store)
            barrier()
    with dir_lock(locked, waiting, log) if locked is not None else contextlib.nullcontext():
        result = _fill(cfg, progress, source, sample_splits, parts, fingerprint, ignored, get_encoder, device, dist, t0)
        if cfg.augment_views:
            result.views_encoded, result.views_rows = _fill_views(
                cfg, source, sample_splits.get("train"), get_encoder, device, dist, progress
            )
            if result.views_encoded:
                result.reused = False
            result.seconds = time.perf_counter() - t0
        return result


def _create(
    cfg: ExtractConfig,
    listing: DatasetListing,
    class_split: dict[str, list[int]],
    split_source: str,
    sample_splits: dict[str, SampleList],
    sample_rule: str,
    text: tuple[tuple[str, ...], str],
    descriptions: list[list[str]] | None,
    parts: dict[str, Any],
    fingerprint: str,
    ignored: dict[str, int],
    encoder: Encoder,
) -> None:
    templates, templates_source = text
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
        "dataset": {
            "name": listing.name,
            "root": listing.root,
            "fingerprint": listing.fingerprint(),
            "ignored": ignored,
        },
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
            "templates_source": templates_source,
        },
        "config": cfg.to_dict(),
    }
    FeatureStore.create(
        cfg.store,
        attrs=attrs,
        splits={
            s: SplitRows([fs_text(x) for x in r.refs], r.labels) for s, r in sample_splits.items()
        },  # ids: UTF-8 text
        class_keys=listing.class_keys,
        class_names=listing.class_names,
        prompts=list(templates),
        class_embeddings=emb,
    )


def _fill(
    cfg: ExtractConfig,
    progress: Progress | None,
    source: ImageDataset,
    sample_splits: dict[str, SampleList],
    parts: dict[str, Any],
    fingerprint: str,
    ignored: dict[str, int],
    get_encoder: Callable[[], Encoder],
    device: torch.device,
    dist: DistInfo,
    t0: float,
) -> ExtractResult:
    """Verify (and repair) the store, then encode every chunk not yet written."""
    store = FeatureStore.open(cfg.store, mode="r+")
    _check_existing(store, cfg, fingerprint, parts)
    repaired: dict[str, dict[int, str]] = {}
    if dist.is_main:
        repaired = _repair(store, sample_splits)
        if parts.get("contents") and not store.attrs.get("inputs", {}).get("contents"):
            store.group.attrs["inputs"] = {**store.attrs.get("inputs", {}), "contents": parts["contents"]}
    barrier()
    store = FeatureStore.open(cfg.store, mode="r+")
    if store.is_complete():
        log.info("store %s is complete; nothing to encode", cfg.store)
        return ExtractResult(
            cfg.store,
            fingerprint,
            True,
            0,
            time.perf_counter() - t0,
            0.0,
            {s: store.n_rows(s) for s in store.splits},
            store.skipped(),
            dist.rank,
            dist.world_size,
            repaired,
            ignored,
        )
    encoder = get_encoder()
    encoded = processed = 0
    t_enc = time.perf_counter()
    multi: list[str] = []
    for split in store.splits:
        rows, bad = _extract_split(
            store, split, source, sample_splits[split], encoder, cfg, device, dist, progress, multi
        )
        processed += rows
        encoded += rows - bad
    _warn_multi_frame(multi)
    barrier()
    seconds = time.perf_counter() - t0
    rate = processed / max(time.perf_counter() - t_enc, 1e-9)
    store = FeatureStore.open(cfg.store)
    return ExtractResult(
        cfg.store,
        fingerprint,
        False,
        encoded,
        seconds,
        rate,
        {s: store.n_rows(s) for s in store.splits},
        store.skipped(),
        dist.rank,
        dist.world_size,
        repaired,
        ignored,
    )


def _extract_split(
    store: FeatureStore,
    split: str,
    source: ImageDataset,
    sample_list: SampleList,
    encoder: Encoder,
    cfg: ExtractConfig,
    device: torch.device,
    dist: DistInfo,
    progress: Progress | None,
    multi: list[str] | None = None,
) -> tuple[int, int]:
    """Encode this rank's unwritten chunks of ``split``: returns (rows processed, rows skipped).
    Multi-frame files are added to ``multi`` (None: warned about here)."""
    refs = sample_list.refs
    n, rows = len(refs), store.chunk_rows
    done = store.written(split)
    todo = [c for c in range(len(done)) if not done[c] and c % dist.world_size == dist.rank]
    if not todo or n == 0:
        return 0, 0
    blank = encoder.preprocess(blank_image())
    loader = DataLoader(
        ImageRows(source, refs, encoder.preprocess, blank),
        batch_sampler=_chunk_batches(todo, n, rows, cfg.batch_size),
        num_workers=num_workers(cfg.workers),
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers(cfg.workers) > 0 else None,
    )
    labels_all = np.asarray(sample_list.labels)  # from the listing: a damaged labels chunk is rewritten right
    mine = sum(min(n, (c + 1) * rows) - c * rows for c in todo)
    channels_last = device.type == "cuda"
    if channels_last:
        for m in encoder.modules():
            m.to(memory_format=torch.channels_last)
    chunk: int | None = None
    buf, lab = np.zeros((0, 0), np.float32), np.zeros(0, np.int32)  # the chunk being filled: made by its first batch
    filled = count = n_bad = 0
    notes: list[str] = [] if multi is None else multi  # multi-frame files: one warning, not one per image
    t0 = time.perf_counter()
    with torch.inference_mode():
        for images, idx, ok, errors in loader:
            notes += [e for e, o in zip(errors, ok.tolist(), strict=True) if o and e]
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
            n_bad += int((~okn).sum())
            buf[local[~okn]] = 0.0
            lab[local[~okn]] = -1
            filled += len(idx)
            count += len(idx)
            if filled == len(buf):
                store.write_chunk(split, c, buf.astype(S.FEATURE_DTYPES[store.attrs["dtype"]]), lab)
            if progress is not None:
                progress(split, count, mine, count / max(time.perf_counter() - t0, 1e-9))
    if multi is None:
        _warn_multi_frame(notes)
    return count, n_bad


def _warn_multi_frame(notes: list[str]) -> None:
    if notes:
        log.warning(
            "%d multi-frame image file(s) (animated GIF/PNG/WebP, multi-page TIFF): only the first frame "
            "of each was encoded, e.g. %s",
            len(notes),
            ", ".join(notes[:3]),
        )


# -- augmented views (schema.py: views/) -----------------------------------------------------------
#: RandomResizedCrop's aspect-ratio range (torchvision's default, the references' too)
VIEW_RATIO = (3 / 4, 4 / 3)
VIEW_FLIP = 0.5


def view_seed(seed: int, row: int, view: int) -> int:
    """The seed of one view: a function of (seed, train row, view) only, so a resumed, sharded or
    repeated extraction cuts the very same crops."""
    return int(np.random.SeedSequence([seed, row, view]).generate_state(1)[0])


def random_view(image: Image.Image, seed: int, size: int, scale: tuple[float, float]) -> Image.Image:
    """torchvision's RandomResizedCrop(size, scale, ratio 3/4-4/3, bicubic) + RandomHorizontalFlip(0.5)
    with its parameters drawn from ``seed``: a square PIL image of ``size`` px that the encoder's own
    preprocessing (resize, centre crop, normalise) then turns into its input unchanged in framing."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode, RandomResizedCrop
    from torchvision.transforms import functional as TF

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        top, left, h, w = RandomResizedCrop.get_params(image, list(scale), list(VIEW_RATIO))
        flip = bool(torch.rand(()) < VIEW_FLIP)
    out: Image.Image = TF.resized_crop(image, top, left, h, w, [size, size], InterpolationMode.BICUBIC)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out


class _Views(Dataset[Item]):
    """(image tensor, item, ok, error) for item = position * V + view of the views' rows."""

    def __init__(
        self,
        source: ImageDataset,
        refs: list[str],
        rows: np.ndarray,
        views: int,
        size: int,
        scale: tuple[float, float],
        seed: int,
        preprocess: Preprocess,
        blank: torch.Tensor,
    ) -> None:
        self.source, self.refs, self.rows, self.views = source, refs, rows, views
        self.size, self.scale, self.seed, self.preprocess, self.blank = size, scale, seed, preprocess, blank

    def __len__(self) -> int:
        return len(self.rows) * self.views

    def __getitem__(self, j: int) -> Item:
        pos, view = divmod(j, self.views)
        row = int(self.rows[pos])
        try:
            image = self.source.open(self.refs[row])
            return (
                self.preprocess(random_view(image, view_seed(self.seed, row, view), self.size, self.scale)),
                j,
                True,
                "",
            )
        except Exception as e:  # any decoder error: report which file, let the caller decide
            return self.blank, j, False, f"{self.source.path_of(self.refs[row])}: {type(e).__name__}: {e}"


def _views_request(cfg: ExtractConfig) -> dict[str, Any]:
    """What ``--augment-*`` asks for, in the views group's attributes (the crop size is the encoder's)."""
    rows = (
        {"rule": "all"}
        if not cfg.augment_shots
        else {"rule": "shots", "shots": int(cfg.augment_shots), "seeds": [int(s) for s in cfg.augment_seeds]}
    )
    return {
        "split": "train",
        "views": int(cfg.augment_views),
        "rows": rows,
        "transform": {
            "name": "RandomResizedCrop+RandomHorizontalFlip",
            "scale": [float(v) for v in cfg.augment_scale],
            "ratio": list(VIEW_RATIO),
            "flip": VIEW_FLIP,
            "interpolation": "bicubic",
            "seed": int(cfg.augment_seed),
        },
    }


def _views_differ(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    out = [k for k in ("split", "views", "rows") if have.get(k) != want[k]]
    ht = {k: v for k, v in have.get("transform", {}).items() if k != "size"}
    out += [f"transform.{k}" for k in want["transform"] if ht.get(k) != want["transform"][k]]
    return out


def view_rows_for(store: FeatureStore, cfg: ExtractConfig) -> np.ndarray:
    """The train rows that get views (ascending): every readable one, or the union over
    ``--augment-seeds`` of the all-way ``--augment-shots``-shot draws (the K-shot draw of a seed
    holds its draws of fewer shots, so every K' <= K is covered)."""
    from fskd.errors import ConfigError
    from fskd.store.sampling import allway_shot_rows

    if not cfg.augment_shots:
        return store.valid_rows("train")
    return np.unique(
        np.concatenate(
            [
                allway_shot_rows(store, cfg.augment_shots, s, ConfigError, "--augment-shots")[0]
                for s in cfg.augment_seeds
            ]
        )
    )


def _fill_views(
    cfg: ExtractConfig,
    source: ImageDataset,
    train: SampleList | None,
    get_encoder: Callable[[], Encoder],
    device: torch.device,
    dist: DistInfo,
    progress: Progress | None,
) -> tuple[int, int]:
    """Create (rank 0) the views group if absent, verify it, encode this rank's unwritten view chunks.
    Returns (views encoded, rows covered)."""
    if train is None:
        raise StoreError(f"--augment-views makes views of train rows; {cfg.store} has no train split")
    want = _views_request(cfg)
    store = FeatureStore.open(cfg.store, mode="r+")
    have = store.views_info
    differ = _views_differ(have, want) if have is not None else []
    if have is not None and differ:
        raise StoreError(
            f"{cfg.store} already has augmented views made differently (differs in: {', '.join(differ)}; "
            f"it has {have['views']} views of {have['rows']}); ask for the same ones, or remove {cfg.store}/views "
            f"(fskd made it; the features of the splits are kept) and run again"
        )
    if dist.is_main:
        if have is None:
            rows = view_rows_for(store, cfg)
            want["transform"]["size"] = int(get_encoder().preprocess(blank_image()).shape[-1])
            store.create_views(want, rows, store.labels("train")[rows])
        else:
            bad = store.views_damaged(verify=True)
            if bad:
                log.warning(
                    "%s: re-encoding %d damaged view chunk(s): %s",
                    cfg.store,
                    len(bad),
                    "; ".join(f"chunk {c}: {why}" for c, why in list(bad.items())[:5]),
                )
                store.mark_views_unwritten(list(bad))
    barrier()
    store = FeatureStore.open(cfg.store, mode="r+")
    info, rows, done = store.views_info, store.view_rows(), store.views_written()
    assert info is not None  # view_rows() raised StoreError if the store had no views
    todo = [c for c in range(len(done)) if not done[c] and c % dist.world_size == dist.rank]
    if not todo:
        barrier()
        return 0, len(rows)
    encoder = get_encoder()
    v, per, m = int(info["views"]), store.chunk_rows, len(rows)
    blank = encoder.preprocess(blank_image())
    t = info["transform"]
    loader = DataLoader(
        _Views(
            source, train.refs, rows, v, int(t["size"]), tuple(t["scale"]), int(t["seed"]), encoder.preprocess, blank
        ),
        batch_sampler=_chunk_batches(todo, m * v, per * v, cfg.batch_size),
        num_workers=num_workers(cfg.workers),
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers(cfg.workers) > 0 else None,
    )
    labels = store.view_labels()
    total = sum((min(m, (c + 1) * per) - c * per) * v for c in todo)
    chunk: int | None = None
    buf, lab = np.zeros((0, 0), np.float32), np.zeros(0, np.int32)  # the chunk being filled: made by its first batch
    filled = count = 0
    t0 = time.perf_counter()
    dtype = S.FEATURE_DTYPES[store.attrs["dtype"]]
    with torch.inference_mode():
        for images, idx, ok, errors in loader:
            if not bool(ok.all()):
                unread = [e for e, o in zip(errors, ok.tolist(), strict=True) if not o]
                if not cfg.skip_bad:
                    raise DatasetError(
                        f"cannot read image {unread[0]} for its augmented views (pass --skip-bad to "
                        f"record it and go on; view chunks already written are kept)"
                    )
                log.warning("skipping %d unreadable file(s) for views: %s", len(unread), unread)
            images = images.to(device, non_blocking=True)
            with autocast(device):
                feats = encoder.encode_images(images).float().cpu().numpy()
            idx = idx.numpy()
            c = int(idx[0]) // (per * v)
            if c != chunk:
                chunk, filled = c, 0
                size = min(m, (c + 1) * per) - c * per
                buf = np.zeros((size * v, feats.shape[1]), np.float32)
                lab = labels[c * per : c * per + size].copy()
            local = idx - c * per * v
            buf[local] = feats
            bad_rows = local[~ok.numpy()] // v
            buf.reshape(len(lab), v, -1)[bad_rows] = 0.0
            lab[bad_rows] = -1
            filled += len(idx)
            count += len(idx)
            if filled == len(buf):
                store.write_view_chunk(c, buf.reshape(len(lab), v, -1).astype(dtype), lab)
            if progress is not None:
                progress("views", count, total, count / max(time.perf_counter() - t0, 1e-9))
    barrier()
    return count, m


def blank_image() -> Image.Image:
    from PIL import Image

    return Image.new("RGB", (32, 32))
