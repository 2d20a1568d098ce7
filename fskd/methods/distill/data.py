"""Images for distillation: decode once into memory, augment in batches, sample shots and episodes.

On a small machine the student's epoch must not pay for JPEG decoding: every image is decoded
once (shorter side resized to the stored square, centre square kept) into one uint8 tensor
(n, 3, S, S), and training views are cut from it with batched tensor ops (a random resized crop
through ``roi_align`` and a horizontal flip). Validation and extraction use the same centre view
(:func:`fskd.encoders.student.center_view`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fskd.datasets import build_dataset
from fskd.encoders.student import decode_square
from fskd.errors import ConfigError, DatasetError, StoreError
from fskd.store import sampling
from fskd.store.sampling import Episodes

log = logging.getLogger(__name__)

#: decoded image tensors kept for the life of the process: (dataset, root, size, refs digest) -> tensor
_CACHE: dict[tuple, torch.Tensor] = {}
_CACHE_MAX = 4


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


def decode_images(source, refs: list[str], size: int, threads: int = 2) -> torch.Tensor:
    """(n, 3, size, size) uint8 for ``refs`` of ``source``; memoised per process."""
    digest = hashlib.sha256("\n".join(refs).encode()).hexdigest()[:16]
    key = (source.name, str(source.root), size, digest)
    if key in _CACHE:
        return _CACHE[key]

    def one(ref: str) -> torch.Tensor:
        try:
            return decode_square(source.open(ref), size)
        except Exception as e:  # name the file: the user has to fix or re-extract
            raise DatasetError(f"cannot read image {source.path_of(ref)}: {type(e).__name__}: {e}") from None

    out = torch.empty((len(refs), 3, size, size), dtype=torch.uint8)
    with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL decodes outside the GIL
        for i, t in enumerate(pool.map(one, refs)):
            out[i] = t
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = out
    return out


def random_boxes(b: int, generator: torch.Generator, scale: tuple[float, float],
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[torch.Tensor, torch.Tensor]:
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
    return torch.nn.functional.interpolate(images, size=(out_size, out_size), mode="bilinear", antialias=True,
                                           align_corners=False)


def sample_shots(labels: np.ndarray, classes: list[int], shots: int, seed: int, names: list[str] | None = None,
                 split: str = "train") -> np.ndarray:
    """Sorted row indices of ``shots`` labelled samples per class: the shots the all-way protocol
    draws for the same seed; a short class is a ConfigError naming it and its count."""
    rows = sampling.sample_shots(labels, np.asarray(classes), shots, seed, names, split, option="--shots",
                                 error=ConfigError)
    return np.sort(rows.reshape(-1))


def sample_val_episodes(labels: np.ndarray, classes: list[int], way: int, shot: int, query: int, episodes: int,
                        seed: int) -> Episodes:
    """Seeded validation episodes over the ``classes`` that have shot + query rows."""
    counts = sampling.class_counts(labels, classes)
    usable = [c for c, n in zip(classes, counts, strict=True) if n >= shot + query]
    if len(usable) < way:
        raise ConfigError(f"validation episodes need {way} classes with >= {shot + query} rows; "
                          f"only {len(usable)} of {len(classes)} have that many")
    return sampling.sample_episodes(labels, usable, way, shot, query, episodes, seed, error=ConfigError)


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
