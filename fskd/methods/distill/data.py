"""Images for distillation: decoded once into a cache file on disk, read by rows, augmented in
batches; sample shots and episodes.

An epoch must not pay for JPEG decoding, and memory must not grow with the dataset (1.28M
ImageNet images at 72 px are 20 GB). Every image is decoded once (shorter side resized to the
stored square, centre square kept) into one uint8 file of (n, 3, S, S) rows on disk
(:class:`ImageCache`, written once and reused by later runs), and each batch reads its rows from
it; training views are cut from a batch with batched tensor ops (a random resized crop through
``roi_align`` and a horizontal flip). Validation and extraction use the same centre view
(:func:`fskd.encoders.student.center_view`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fskd.datasets import build_dataset
from fskd.datasets.base import fs_path, text_bytes
from fskd.encoders.student import decode_square
from fskd.errors import ConfigError, DatasetError, StoreError
from fskd.fsutil import atomic_write_text
from fskd.protocols.episodic import Episodes, sample_episodes
from fskd.store import sampling

log = logging.getLogger(__name__)


def dataset_of(store, root: str | None):
    """The dataset a store was extracted from (``root`` overrides a moved root)."""
    ds = store.attrs.get("dataset", {})
    name, stored_root = ds.get("name"), ds.get("root")
    if not name or name == "arrays" or (not stored_root and not root):
        raise StoreError(
            f"{store.path} was not extracted from an image dataset (dataset {name!r}, root {stored_root!r}); "
            f"distillation trains the student on the images: extract the store with `fskd extract`"
        )
    root = root or stored_root
    if not Path(root).exists():
        raise DatasetError(
            f"the images of {store.path} were at {root}, which does not exist; pass --root to where the "
            f"{name!r} dataset is now"
        )
    return build_dataset(name, root)


#: bump when the decoding changes: cache files of another version are not reused
#: (2: EXIF orientation, 16-bit scaling and transparency on white, datasets.base.to_rgb)
DECODE_VERSION = 2
#: images decoded per block while a cache file is written (memory: block x 3 x S x S bytes)
WRITE_BLOCK = 1024


def cache_dir(option: str = "") -> Path:
    """Where decoded-image caches live: ``option`` (``--set image_cache=DIR``), else
    ``$FSKD_CACHE_DIR/images``, else ``$XDG_CACHE_HOME/fskd/images`` (``~/.cache/fskd/images``)."""
    if option:
        return Path(option)
    if os.environ.get("FSKD_CACHE_DIR"):
        return Path(os.environ["FSKD_CACHE_DIR"]) / "images"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fskd" / "images"


class ImageCache:
    """(n, 3, S, S) uint8 images in one file, read by rows: ``cache[rows]`` -> uint8 tensor.

    The file is memory-mapped and the pages a read touched are released after it (the kernel's
    page cache keeps them warm), so resident memory is one batch, whatever n is."""

    def __init__(self, path: Path, n: int, size: int) -> None:
        self.path, self.n, self.size = Path(path), n, size
        self.row_bytes = 3 * size * size
        self._map: mmap.mmap | None = None
        self._rows: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.n, 3, self.size, self.size)

    def _view(self) -> np.ndarray:
        if self._map is None:
            with open(self.path, "rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if self.n else None
            self._rows = (
                np.frombuffer(self._map, np.uint8).reshape(self.n, self.row_bytes)
                if self.n
                else np.zeros((0, self.row_bytes), np.uint8)
            )
        return self._rows

    def __getitem__(self, idx) -> torch.Tensor:
        rows = self._view()
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        out = np.array(rows[idx]) if isinstance(idx, slice) else rows[np.asarray(idx, dtype=np.int64)]  # a copy
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)  # drop the mapped pages from this process (not from disk)
        return torch.from_numpy(out.reshape(-1, 3, self.size, self.size))

    def __getstate__(self) -> dict:  # DataLoader workers / pickling: reopen the map there
        return {"path": self.path, "n": self.n, "size": self.size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["n"], state["size"])


def decode_images(source, refs: list[str], size: int, threads: int = 2, directory: str = "") -> ImageCache:
    """The decoded images of ``refs`` of ``source`` at ``size`` px: a cache file reused when a
    complete one for the same dataset, root, refs and size exists, else decoded now (in blocks of
    :data:`WRITE_BLOCK` images, ``threads`` decoding) into a temporary file renamed into place and
    then committed by its ``.json`` (a killed run leaves no cache that looks complete)."""
    h = hashlib.sha256(json.dumps([DECODE_VERSION, source.name, str(source.root), size]).encode())
    h.update(text_bytes("\n".join(refs)))
    key = h.hexdigest()[:24]
    folder = cache_dir(directory)
    path = folder / f"{source.name}-{size}px-{key}.u8"
    meta_path = path.with_name(path.name + ".json")
    meta = {
        "version": DECODE_VERSION,
        "dataset": source.name,
        "root": str(source.root),
        "size": size,
        "n": len(refs),
        "key": key,
    }
    row_bytes = 3 * size * size
    try:
        if json.loads(meta_path.read_text()) == meta and path.stat().st_size == len(refs) * row_bytes:
            log.info("decoded images: reusing %s", path)
            return ImageCache(path, len(refs), size)
    except (OSError, ValueError):
        pass

    def one(ref: str) -> np.ndarray:
        try:
            return decode_square(source.open(fs_path(ref)), size).numpy()  # refs: the store's ids (text)
        except Exception as e:  # name the file: the user has to fix or re-extract
            raise DatasetError(f"cannot read image {source.path_of(ref)}: {type(e).__name__}: {e}") from None

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"cannot create the decoded-image cache folder {folder} ({e.strerror}); set "
            f"FSKD_CACHE_DIR or --set image_cache=DIR to a writable folder"
        ) from None
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh, ThreadPoolExecutor(max(1, threads)) as pool:  # PIL decodes outside the GIL
            for start in range(0, len(refs), WRITE_BLOCK):
                block = list(pool.map(one, refs[start : start + WRITE_BLOCK]))
                fh.write(np.stack(block).tobytes() if block else b"")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        atomic_write_text(meta_path, json.dumps(meta))  # the commit: the data is complete before this exists
    except OSError as e:
        raise ConfigError(
            f"cannot write the decoded-image cache {path} ({e.strerror}: {len(refs) * row_bytes / 2**30:.1f} "
            f"GiB needed); set FSKD_CACHE_DIR or --set image_cache=DIR to a folder with room"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    log.info("decoded %d images into %s", len(refs), path)
    return ImageCache(path, len(refs), size)


def random_boxes(
    b: int, generator: torch.Generator, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop boxes for a batch of square images, in relative coordinates.

    Returns (boxes (b, 4) as x0, y0, x1, y1 in [0, 1], flips (b,) bool); the same boxes cut the
    student's view and, with an online teacher, the teacher's view of one image.
    """
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=generator)
    ar = torch.exp(torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator))
    w = torch.sqrt(area * ar).clamp(max=1.0)
    h = torch.sqrt(area / ar).clamp(max=1.0)
    x0 = torch.rand(b, generator=generator) * (1 - w)
    y0 = torch.rand(b, generator=generator) * (1 - h)
    flips = torch.rand(b, generator=generator) < 0.5
    return torch.stack([x0, y0, x0 + w, y0 + h], 1), flips


def crop_views(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, out_size: int) -> torch.Tensor:
    """Cut and resize the boxes out of a batch, in one batched call.

    images (B, 3, S, S) uint8 or [0, 1] float; boxes (B, 4) relative; flips (B,) ->
    (B, 3, out_size, out_size) float in [0, 1].
    """
    from torchvision.ops import roi_align

    b, s = images.shape[0], images.shape[-1]
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    rois = torch.cat([torch.arange(b, dtype=torch.float32)[:, None], boxes.float() * s], 1).to(x.device)
    # sampling_ratio 2: each output pixel averages 2x2 samples, a cheap anti-aliasing when shrinking
    out = roi_align(x, rois, output_size=(out_size, out_size), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return torch.where(flips.to(x.device)[:, None, None, None], out.flip(-1), out)


def resize_views(images: torch.Tensor, out_size: int) -> torch.Tensor:
    """(B, 3, S, S) [0, 1] float -> (B, 3, out_size, out_size), antialiased bilinear."""
    if images.shape[-1] == out_size:
        return images
    return torch.nn.functional.interpolate(
        images, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False
    )


def sample_shots(
    labels: np.ndarray, classes: list[int], shots: int, seed: int, names: list[str] | None = None, split: str = "train"
) -> np.ndarray:
    """Sorted row indices of ``shots`` labelled samples per class: the shots the all-way protocol
    draws for the same seed; a short class is a ConfigError naming it and its count."""
    rows = sampling.sample_shots(
        labels, np.asarray(classes), shots, seed, names, split, option="--shots", error=ConfigError
    )
    return np.sort(rows.reshape(-1))


def sample_val_episodes(
    labels: np.ndarray, classes: list[int], way: int, shot: int, query: int, episodes: int, seed: int
) -> Episodes:
    """Seeded validation episodes over the ``classes`` that have shot + query rows."""
    counts = sampling.class_counts(labels, classes)
    usable = [c for c, n in zip(classes, counts, strict=True) if n >= shot + query]
    if len(usable) < way:
        raise ConfigError(
            f"validation episodes need {way} classes with >= {shot + query} rows; "
            f"only {len(usable)} of {len(classes)} have that many"
        )
    return sample_episodes(labels, usable, way, shot, query, episodes, seed, error=ConfigError)


def episode_accuracy(feats: torch.Tensor, eps: Episodes, center: torch.Tensor | None) -> float:
    """Mean accuracy of nearest normalised prototype over the episodes (one batched matmul)."""
    f = feats - center if center is not None else feats
    f = torch.nn.functional.normalize(f, dim=-1)
    sup = torch.from_numpy(eps.support).to(f.device)
    qry = torch.from_numpy(eps.query).to(f.device)
    protos = torch.nn.functional.normalize(f[sup].mean(2), dim=-1)  # (E, N, D)
    e, n, q = qry.shape
    scores = torch.bmm(f[qry].reshape(e, n * q, -1), protos.transpose(1, 2))  # (E, NQ, N)
    truth = torch.arange(n, device=f.device).repeat_interleave(q)
    return float((scores.argmax(-1) == truth).float().mean())
