"""A fitted state as a classifier of new images: ``fskd.api.load_classifier(state_dir)``.

The state names its store; the store names the encoder spec and preprocessing its features were
extracted with. :class:`Classifier` rebuilds that encoder (only when images must be encoded) and
the state's **all-way** head, fitted exactly as ``fskd eval --state DIR --protocol allway`` fits it
for the state's own seed: the state's K shots per class of the store's train split (``sample_shots``
with the state's seed), every class of the store. Its rows are what ``fskd predict`` writes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from fskd.errors import EncoderError, EvaluationError, StateError
from fskd.methods import kind_of
from fskd.methods.allway import AllwayHead
from fskd.methods.base import load_state
from fskd.runtime import autocast, num_workers, resolve_device
from fskd.store import FeatureStore

log = logging.getLogger(__name__)

#: rows scored per head call on cached features (the all-way protocol's query batch)
QUERY_BATCH = 8192


class Classifier:
    """The all-way head of the state in ``state_dir`` over its store's classes.

    ``store``: the state's store when it moved (checked by fingerprint); default ``state.store_path``.
    ``predict(inputs)`` takes image paths, PIL images, or a feature tensor (n, D) of the store's
    encoder and returns one dict per input: ``path``, ``prediction``, ``probability``, ``top1`` ..
    ``topK`` and ``top1_probability`` .. (the keys ``fskd predict`` writes).
    """

    def __init__(self, state_dir: str | os.PathLike, store: str | None = None, device: str = "auto") -> None:
        self.state_dir = str(state_dir)
        state = load_state(state_dir)
        if state.kind == "distill" or kind_of(state.method) == "distill":
            raise StateError(
                f"state {state_dir} is a distilled student ({state.method}): an encoder, not a classifier. Encode the "
                f"store's images with it (fskd extract --encoder student:{state_dir}), fit a head on that store "
                f"(fskd adapt --method tip-adapter --shots K) and predict with that state"
            )
        if state.config.get("base_to_new"):
            raise StateError(
                f"state {state_dir} was fitted for base-to-new on the base half of the classes only; "
                f"fit one on every class (without --base-to-new) to predict"
            )
        path = store or state.store_path
        if store is None and "://" not in path and not Path(path).exists():
            raise StateError(
                f"state {state_dir} was fitted on the store {path}, which is not there any more (moved or "
                f"deleted); pass --store NEW_PATH (fskd checks it is the same store by its fingerprint)"
            )
        self.store = FeatureStore.open(path)
        self.store.check_complete()
        self.state = state
        self.device = resolve_device(device)
        # the all-way head: one loading for predict, export and distill --teacher-state (fskd.methods.allway)
        self.allway = AllwayHead(state, state_dir, self.store, self.device)
        self.method = self.allway.method
        self.shots, self.seed = self.allway.shots, self.allway.seed
        self.class_names: list[str] = list(self.allway.class_names)
        self.encoder_spec: str = self.store.encoder_spec
        self._encoder = None
        self.head, self.fitted = self.allway.head, self.allway.fitted

    # -- the head -----------------------------------------------------------------------------
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Raw store-encoder features (n, D) -> class scores (n, C), in the order of ``class_names``."""
        return self.allway.logits(features)

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """(n, D) features -> (n, C) softmax of the head's scores (float32)."""
        return torch.softmax(self.logits(features), dim=-1)

    # -- the encoder ----------------------------------------------------------------------------
    @property
    def encoder(self):
        """The store's encoder, rebuilt from its spec on first use (images only)."""
        if self._encoder is None:
            self._encoder = rebuild_encoder(self.store, self.device, f"state {self.state_dir}")
        return self._encoder

    def encode(
        self, refs: Sequence[str], batch_size: int = 64, workers: int | None = None, skip_bad: bool = False, on_bad=None
    ) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """Yield ``(features (b, D) float32, positions (b,))`` of the readable images among ``refs``
        (paths), in order, batch by batch, with extract's loader and forward. An unreadable image
        raises DatasetError naming it; with ``skip_bad`` it is passed to ``on_bad(ref, message,
        position)`` (before the batch holding the next readable image is yielded)."""
        return encode_images(self.encoder, refs, self.device, batch_size, workers, skip_bad, on_bad)

    # -- rows ------------------------------------------------------------------------------------
    def rows(
        self, probs: torch.Tensor, paths: Sequence, top_k: int = 5, labels: Sequence[int] | None = None
    ) -> list[dict]:
        """One dict per row of ``probs`` (n, C): see :func:`prediction_rows`."""
        return prediction_rows(probs, paths, self.class_names, top_k, labels)

    def predict(self, inputs, top_k: int = 5, batch_size: int = 64, skip_bad: bool = False) -> list[dict]:
        """Rows for ``inputs``: a feature tensor or array (n, D) (``path`` None), a list of PIL
        images (``path`` None), or image paths (a list, or one path: a folder, an image, a list file).
        An unreadable path raises DatasetError naming it; with ``skip_bad`` every row gets an
        ``error`` key (None, or why the image could not be read, that row's prediction and
        probabilities None), as ``fskd predict --skip-bad`` writes them."""
        from PIL import Image

        from fskd.datasets.base import to_rgb

        if isinstance(inputs, np.ndarray):
            inputs = torch.from_numpy(inputs)
        if isinstance(inputs, torch.Tensor):
            if inputs.ndim != 2 or inputs.shape[1] != self.store.dim:
                raise EvaluationError(
                    f"features must be (n, {self.store.dim}) ({self.encoder_spec}), got {tuple(inputs.shape)}"
                )
            probs = (
                torch.cat([self.probabilities(inputs[s : s + QUERY_BATCH]) for s in range(0, len(inputs), QUERY_BATCH)])
                if len(inputs)
                else torch.zeros(0, len(self.class_names))
            )
            return self.rows(probs, [None] * len(inputs), top_k)
        if isinstance(inputs, Image.Image):
            inputs = [inputs]
        if isinstance(inputs, (str, os.PathLike)):
            from fskd.deploy.sources import image_paths

            inputs = list(image_paths(str(inputs)))
        inputs = list(inputs)
        if inputs and all(isinstance(x, Image.Image) for x in inputs):
            enc, out = self.encoder, []
            for s in range(0, len(inputs), batch_size):
                batch = torch.stack([enc.preprocess(to_rgb(im)) for im in inputs[s : s + batch_size]])
                with torch.inference_mode(), autocast(self.device):
                    feats = enc.encode_images(batch.to(self.device)).float()
                out += self.rows(self.probabilities(feats), [None] * len(batch), top_k)
            return out
        refs = [str(x) for x in inputs]
        out: list[tuple[int, dict]] = []
        keys = list(prediction_rows(torch.zeros(1, len(self.class_names)), [None], self.class_names, top_k)[0])

        def on_bad(ref: str, message: str, position: int) -> None:
            out.append((position, error_row(ref, message, keys + ["error"])))

        for feats, pos in self.encode(refs, batch_size, skip_bad=skip_bad, on_bad=on_bad):
            rows = self.rows(self.probabilities(feats), [refs[i] for i in pos], top_k)
            if skip_bad:
                for r in rows:
                    r["error"] = None
            out += zip(pos.tolist(), rows, strict=True)
        return [r for _, r in sorted(out, key=lambda t: t[0])]

    def describe(self) -> dict:
        """What this classifier is, for the metadata of an output."""
        st = self.state
        return {
            "state": str(Path(self.state_dir).absolute()),
            "method": st.method,
            "kind": st.kind,
            "shots": self.shots,
            "seed": self.seed,
            "store": str(self.store.path),
            "store_fingerprint": self.store.fingerprint,
            "encoder": self.encoder_spec,
            "classes": len(self.class_names),
        }


def prediction_rows(
    probs: torch.Tensor, paths: Sequence, names: Sequence[str], top_k: int = 5, labels: Sequence[int] | None = None
) -> list[dict]:
    """(n, C) probabilities -> n dicts: ``path`` (+ ``label``), ``prediction``, ``probability``,
    then ``topI`` / ``topI_probability`` for I = 1..min(top_k, C)."""
    k = max(1, min(int(top_k), probs.shape[1]))
    p, idx = probs.float().topk(k, dim=-1)
    p, idx = p.cpu().numpy(), idx.cpu().numpy()
    out = []
    for r in range(len(p)):
        row = {"path": paths[r]}
        if labels is not None:
            row["label"] = names[int(labels[r])]
        row["prediction"], row["probability"] = names[int(idx[r, 0])], float(p[r, 0])
        for i in range(k):
            row[f"top{i + 1}"], row[f"top{i + 1}_probability"] = names[int(idx[r, i])], float(p[r, i])
        out.append(row)
    return out


def error_row(path: str, message: str, columns: Sequence[str]) -> dict:
    """The row of an image that could not be read (``--skip-bad``): its path, the reason in
    ``error``, every other column None (empty in CSV, null in JSON Lines and Parquet)."""
    row = {c: None for c in columns}
    row["path"], row["error"] = path, message
    return row


def rebuild_encoder(store: FeatureStore, device: torch.device, who: str):
    """The encoder ``store`` was extracted with, rebuilt from its spec (frozen, eval mode); refused,
    naming the spec and what to do, when it cannot be built here or its weights changed since."""
    from fskd.encoders import build_encoder
    from fskd.encoders.base import weights_identity

    spec = store.encoder_spec
    try:
        enc = build_encoder(spec, device)
    except EncoderError as e:
        raise EncoderError(
            f"{who}: cannot rebuild the encoder {spec!r} that {store.path} was extracted with: {e}. "
            f"Install what it names (or put its files back), then run again"
        ) from None
    had = store.attrs.get("inputs", {}).get("encoder_weights")
    if had is not None and had != weights_identity(spec):
        raise EncoderError(
            f"{who}: the weights of encoder {spec!r} changed since {store.path} was extracted (their "
            f"content hash differs); its features and this encoder's would disagree. Re-extract the "
            f"store, refit, and predict again"
        )
    stored = store.attrs.get("encoder", {}).get("preprocess")
    now = json.loads(json.dumps(enc.preprocess_info()))
    if stored is not None and stored != now:
        log.warning(
            "%s: the preprocessing of %s differs from the one stored with %s (%s, stored %s); predictions may "
            "differ from the store's features",
            who,
            spec,
            store.path,
            now,
            stored,
        )
    return enc


def encode_images(
    encoder,
    refs: Sequence[str],
    device: torch.device,
    batch_size: int = 64,
    workers: int | None = None,
    skip_bad: bool = False,
    on_bad=None,
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """Extract's loader (``ImageRows``: decode, preprocess, the error of an unreadable file) and forward
    (channels-last and autocast on CUDA) over image paths; yields ``(features, positions)``."""
    from torch.utils.data import DataLoader

    from fskd.deploy.sources import PathSource
    from fskd.errors import DatasetError
    from fskd.store.extract import (  # the very loader and blank image of extract
        ImageRows,
        blank_image,
    )

    if not refs:
        return
    w = num_workers(workers)
    loader = DataLoader(
        ImageRows(PathSource(), list(refs), encoder.preprocess, encoder.preprocess(blank_image())),
        batch_size=batch_size,
        shuffle=False,
        num_workers=w,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if w > 0 else None,
    )
    channels_last = device.type == "cuda"
    if channels_last:
        for m in encoder.modules():
            m.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        for images, idx, ok, errors in loader:
            okn = ok.numpy().astype(bool)
            if not okn.all():
                bad = [e for e, o in zip(errors, okn.tolist(), strict=True) if not o]
                if not skip_bad:
                    raise DatasetError(
                        f"cannot read image {bad[0]} (pass --skip-bad to record unreadable files and go on)"
                    )
                for i, e in zip(idx.numpy()[~okn], bad, strict=True):
                    if on_bad is not None:
                        on_bad(refs[int(i)], e, int(i))
                log.warning("skipping %d unreadable file(s): %s", len(bad), bad[:5])
                if not okn.any():
                    continue
                images, idx = images[torch.from_numpy(okn)], idx[torch.from_numpy(okn)]
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                feats = encoder.encode_images(images)
            yield feats.float(), idx.numpy()
