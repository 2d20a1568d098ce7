"""The store's integrity: what is missing or damaged (every chunk's CRC-32 against the checksum
stored at write time), the checks that refuse a damaged or incomplete store, and the repairs
(``fskd extract`` re-encodes the chunks marked unwritten). :class:`IntegrityMixin` is a part of
:class:`~fskd.store.store.FeatureStore`."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from fskd.errors import StoreError
from fskd.store import schema as S
from fskd.store.arrays import _array, _chunk_key, _list_keys, _subgroup, write
from fskd.store.location import Location, backend_errors, raise_if_backend

if TYPE_CHECKING:
    from zarr.types import AnyArray


def _verify_chunks(
    features: AnyArray,
    labels: AnyArray,
    sums: np.ndarray,
    written: np.ndarray,
    rows: int,
    bad: dict[int, str],
    location: Location,
) -> None:
    """Re-compute the CRC-32 of every written row chunk not already in ``bad``; add the ones that
    cannot be decoded or do not match their stored checksum to ``bad`` (chunk -> reason)."""
    n = features.shape[0]
    for i in np.flatnonzero(written):
        c = int(i)
        if c in bad:
            continue
        sl = slice(c * rows, min(n, (c + 1) * rows))
        try:
            crc = S.chunk_checksum(features[sl], labels[sl])
        except Exception as e:  # undecodable chunk (a storage timeout is not damage: raised as such)
            raise_if_backend(location, e)
            bad[c] = f"cannot be decoded ({type(e).__name__}: {e})"
            continue
        if crc != int(sums[c]):
            bad[c] = f"checksum mismatch (stored {int(sums[c]):08x}, read {crc:08x})"


#: the exponent bits of each float dtype: all set is inf or NaN
_EXPONENT = {
    np.dtype(np.float16): (np.uint16, 0x7C00),
    np.dtype(np.float32): (np.uint32, 0x7F800000),
    np.dtype(np.float64): (np.uint64, 0x7FF0000000000000),
}


def _has_non_finite(block: np.ndarray) -> bool:
    """Whether ``block`` holds NaN or inf: one integer test of the exponent bits (np.isfinite on
    float16 costs as much as converting the block to float32, on every read)."""
    kind = _EXPONENT.get(block.dtype)
    if kind is None or not block.flags.c_contiguous:
        return not bool(np.isfinite(block).all())
    uint, mask = kind
    return bool(((block.view(uint) & uint(mask)) == uint(mask)).any())


def _refuse_non_finite(features: np.ndarray, labels: np.ndarray, where: str) -> None:
    """Never store NaN or inf features for a readable row (the encoder diverged: fp16 overflow, a
    broken checkpoint); the rows stay unwritten, so a rerun retries them."""
    bad = ~np.isfinite(features).reshape(len(features), -1).all(axis=1) & (np.asarray(labels) >= 0)
    if bad.any():
        raise StoreError(
            f"{where}: the encoder produced non-finite features (NaN or inf) for {int(bad.sum())} "
            f"row(s), the first at offset {int(np.flatnonzero(bad)[0])}; nothing was written for them. "
            f"Check the encoder"
        )


def _unrepairable_here(missing: str) -> bool:
    """A missing text or sample-id chunk: not fixed by encoding row chunks again."""
    return missing.startswith(f"{S.TEXT_GROUP}/") or f"/{S.SAMPLE_IDS} " in missing


class IntegrityMixin:
    """Integrity checks and repair of a :class:`~fskd.store.store.FeatureStore` (its splits, and
    its augmented views in :meth:`check_report`)."""

    # what the store provides (FeatureStore, AugmentedViews)
    location: Location
    path: Path | str
    group: zarr.Group

    if TYPE_CHECKING:

        @property
        def splits(self) -> list[str]: ...

        @property
        def chunk_rows(self) -> int: ...

        @property
        def views_info(self) -> dict[str, Any] | None: ...

        def _split(self, split: str) -> zarr.Group: ...

        def _read(self, split: str, name: str, sel: slice, chunk: int | None = None) -> np.ndarray: ...

        def n_rows(self, split: str) -> int: ...

        def written(self, split: str) -> np.ndarray: ...

        def views_written(self) -> np.ndarray: ...

        def views_damaged(self, verify: bool = True) -> dict[int, str]: ...

    def is_complete(self) -> bool:
        return all(self.written(s).all() for s in self.splits) and not self.missing_chunks()

    def _failing_chunk(self, arr: AnyArray, sel: slice, first: int | None) -> int | None:
        """The row chunk that fails to read among those a slice ``sel`` of rows spans (a read of
        several chunks at once, on object storage, does not say which one failed)."""
        if not isinstance(sel, slice) or arr.ndim == 0:
            return first
        rows = arr.chunks[0]
        start, stop, _ = sel.indices(arr.shape[0])
        for c in range(start // rows, -(-stop // rows)):
            try:
                arr[c * rows : min(stop, (c + 1) * rows)]
            except Exception as e:
                raise_if_backend(self.location, e)
                return c
        return first

    def _check_finite(self, block: np.ndarray, array: str, chunk: int | None, rows: np.ndarray | None = None) -> None:
        """Refuse features holding NaN or inf (a decodable chunk of garbage would otherwise score at
        chance with exit 0), naming the array and chunk. ``rows``: the rows ``block`` holds, when
        not consecutive rows from the start of ``chunk``."""
        if not _has_non_finite(block):
            return
        finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
        first = int(np.flatnonzero(~finite)[0])
        row = int(rows[first]) if rows is not None else (chunk or 0) * self.chunk_rows + first
        raise StoreError(
            f"{self.path}: {array} chunk {row // self.chunk_rows} holds non-finite values (NaN or inf, first at row "
            f"{row}); the store is damaged. `fskd info --check {self.path}` lists the damage; the same `fskd extract` "
            f"re-encodes it"
        )

    def missing_chunks(self) -> list[str]:
        """Chunk objects that should exist and do not, as ``split/array chunk i`` strings: written
        feature chunks, and every chunk of the labels, ids, checksums (written) and text arrays.
        Cheap: one listing per array, no data read. A remote that stops answering is a StoreError
        naming the URL, never a list of missing chunks."""
        with backend_errors(self.location):
            return self._missing_chunks()

    def _missing_chunks(self) -> list[str]:
        out: list[str] = []
        for split in self.splits:
            g = self._split(split)
            written = self.written(split)
            done = np.flatnonzero(written)
            for name, chunks in (
                (S.FEATURES, done),
                (S.CHECKSUMS, done),
                (S.LABELS, range(len(written))),
                (S.SAMPLE_IDS, range(len(written))),
            ):
                arr = _array(g, name)
                have = _list_keys(arr)
                coords = [(int(c), 0) if arr.ndim == 2 else (int(c),) for c in chunks]
                out += [f"{split}/{name} chunk {c[0]}" for c in coords if _chunk_key(arr, c) not in have]
        t = _subgroup(self.group, S.TEXT_GROUP)
        for name in (S.CLASSNAMES, S.CLASSKEYS, S.PROMPTS, S.CLASS_EMBEDDINGS):
            if name not in t or _array(t, name).size == 0:
                continue
            arr = _array(t, name)
            have = _list_keys(arr)
            for c in itertools.product(*(range(k) for k in arr.cdata_shape)):
                if _chunk_key(arr, c) not in have:
                    out.append(f"text/{name} chunk {c[0]}")
        return out

    def damaged_chunks(self, verify: bool = True, missing: list[str] | None = None) -> dict[str, dict[int, str]]:
        """``{split: {chunk: reason}}`` for row chunks marked written that cannot be trusted: their
        features/labels/checksum object is missing, or (``verify``) they cannot be decoded or their
        CRC-32 differs from the one stored at write time. Reads every written chunk when verifying.
        ``missing``: :meth:`missing_chunks` when the caller listed them already."""
        with backend_errors(self.location):
            return self._damaged_chunks(verify, missing)

    def _damaged_chunks(self, verify: bool, missing: list[str] | None) -> dict[str, dict[int, str]]:
        out: dict[str, dict[int, str]] = {}
        missing = self.missing_chunks() if missing is None else missing
        for split in self.splits:
            bad: dict[int, str] = {}
            for m in missing:
                sp, rest = m.split("/", 1)
                name, _, c = rest.partition(" chunk ")
                if sp == split and name in (S.FEATURES, S.LABELS, S.CHECKSUMS):
                    bad.setdefault(int(c), f"{name} chunk object missing")
            if verify:
                g = self._split(split)
                _verify_chunks(
                    _array(g, S.FEATURES),
                    _array(g, S.LABELS),
                    np.asarray(self._read(split, S.CHECKSUMS, slice(None))),
                    self.written(split),
                    self.chunk_rows,
                    bad,
                    self.location,
                )
            if bad:
                out[split] = dict(sorted(bad.items()))
        return out

    def check_integrity(self, verify: bool = False) -> None:
        """Raise StoreError naming every damaged chunk (``verify``: re-compute the checksums too)."""
        missing = self.missing_chunks()
        problems = [m for m in missing if _unrepairable_here(m)]
        for s, d in self.damaged_chunks(verify, missing).items():
            for c, why in d.items():
                rows = f"rows {c * self.chunk_rows}-{min(self.n_rows(s), (c + 1) * self.chunk_rows) - 1}"
                name, _, rest = why.partition(" chunk object ")
                problems.append(
                    f"{s}/{name} chunk {c} ({rows}) is {rest}" if rest else f"{s}/features chunk {c} ({rows}) {why}"
                )
        if problems:
            more = f" and {len(problems) - 8} more" if len(problems) > 8 else ""
            raise StoreError(
                f"{self.path} is damaged: {'; '.join(problems[:8])}{more}. Run the same `fskd extract` again to "
                f"re-encode the damaged chunks (text or id arrays: re-extract into a new --store)"
            )

    def check_complete(self) -> None:
        todo = {s: int((~self.written(s)).sum()) for s in self.splits}
        if any(todo.values()):
            raise StoreError(
                f"{self.path} is incomplete ({todo} row chunks not written): run the same `fskd extract` again to resume"
            )
        self.check_integrity(verify=False)

    def mark_unwritten(self, split: str, chunks: list[int]) -> None:
        """Clear the written flags of ``chunks`` so that extraction encodes them again (repair)."""
        w = _array(self._split(split), S.WRITTEN)
        for c in chunks:
            write(w, int(c), False)

    def rewrite_sample_ids(self, split: str, sample_ids: list[str]) -> None:
        write(_array(self._split(split), S.SAMPLE_IDS), slice(None), np.asarray(sample_ids, dtype=object).astype(str))

    def check_report(self) -> dict[str, Any]:
        """``fskd info --check``: every chunk verified against its checksum."""
        missing = self.missing_chunks()
        damaged = self.damaged_chunks(verify=True, missing=missing)
        other = [m for m in missing if _unrepairable_here(m)]
        verified = {s: int(self.written(s).sum()) for s in self.splits}
        if self.views_info is not None:
            views = self.views_damaged(verify=True)
            if views:
                damaged = {**damaged, S.VIEWS_GROUP: views}
            verified[S.VIEWS_GROUP] = int(self.views_written().sum())
        return {
            "ok": not damaged and not other,
            "chunks_verified": verified,
            "damaged": {s: {str(c): why for c, why in d.items()} for s, d in damaged.items()},
            "missing": other,
        }
