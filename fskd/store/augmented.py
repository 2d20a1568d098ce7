"""A store's augmented views (``schema.py``: ``views/``, ``fskd extract --augment-views V``): V
random-resized-crop + flip views of train rows, created whole or not at all, written and checked
chunk by chunk like a split. :class:`AugmentedViews` is a part of
:class:`~fskd.store.store.FeatureStore`."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from fskd.errors import StoreError
from fskd.store import schema as S
from fskd.store.arrays import _ARRAY_CONFIG, _CRC, _array, _chunk_key, _compressor, _list_keys, _subgroup, write
from fskd.store.integrity import _refuse_non_finite, _verify_chunks
from fskd.store.location import Location, raise_if_backend, remote_errors


def _views_rows_text(info: dict[str, Any]) -> str:
    r = info["rows"]
    return (
        "every readable train row"
        if r.get("rule") == "all"
        else f"the {r['shots']}-shot all-way shots of seeds {', '.join(map(str, r['seeds']))}"
    )


def describe_views(info: dict[str, Any]) -> str:
    """One line naming a views group: how many views, of which rows, made how."""
    t = info["transform"]
    return (
        f"{info['views']} augmented views per shot from the store (RandomResizedCrop {t['size']} px, scale "
        f"{t['scale'][0]:g}-{t['scale'][1]:g}, {t['interpolation']}, horizontal flip p {t['flip']:g}, seed {t['seed']}; "
        f"rows: {_views_rows_text(info)})"
    )


class AugmentedViews:
    """The augmented views of a :class:`~fskd.store.store.FeatureStore` (schema.py: views/)."""

    # what the store provides (FeatureStore, IntegrityMixin)
    location: Location
    path: Path | str
    group: zarr.Group
    attrs: dict[str, Any]

    if TYPE_CHECKING:

        @property
        def dim(self) -> int: ...

        @property
        def chunk_rows(self) -> int: ...

        def _check_finite(
            self, block: np.ndarray, array: str, chunk: int | None, rows: np.ndarray | None = None
        ) -> None: ...

    @property
    def views_info(self) -> dict[str, Any] | None:
        """The views group's attributes (``S.VIEWS_ATTRS``), or None when the store has none."""
        return dict(_subgroup(self.group, S.VIEWS_GROUP).attrs) if self._has_views() else None

    def _has_views(self) -> bool:
        """A views group exists and is finished (on object storage, one still marked as being
        created counts as absent: schema.py)."""
        if S.VIEWS_GROUP not in self.group:
            return False
        return _subgroup(self.group, S.VIEWS_GROUP).attrs.get("format") != S.VIEWS_CREATING

    def _views(self) -> zarr.Group:
        if not self._has_views():
            raise StoreError(f"{self.path} has no augmented views (add them with `fskd extract ... --augment-views V`)")
        return _subgroup(self.group, S.VIEWS_GROUP)

    def create_views(self, attrs: dict[str, Any], rows: np.ndarray, labels: np.ndarray) -> None:
        """Add an empty views group (features unwritten) for train ``rows``: built under a temporary
        name inside the store and renamed into place, so it exists whole or not at all. Leftovers
        of a killed creation (``.views.tmp-*`` groups fskd made) are removed first. On object
        storage the group's attributes are written last instead (schema.py)."""
        from fskd.fsutil import fault_point

        if self._has_views():
            raise StoreError(f"{self.path} already has a views group")
        if self.location.is_remote:
            with remote_errors(self.location):
                # clears fskd's own unfinished views group, if any (only fskd writes VIEWS_CREATING)
                g = self.group.create_group(S.VIEWS_GROUP, overwrite=True, attributes={"format": S.VIEWS_CREATING})
                self._views_arrays(g, attrs, rows, labels)
                fault_point("store:views-created")
                g.attrs.put({"format": S.VIEWS_FORMAT, **attrs})
            self._validate_views()
            return
        path = self.location.local_path
        for old in path.glob(f".{S.VIEWS_GROUP}.tmp-*"):
            if (old / "zarr.json").is_file():
                shutil.rmtree(old, ignore_errors=True)
        tmp = path / f".{S.VIEWS_GROUP}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            g = zarr.open_group(str(tmp), mode="w")
            self._views_arrays(g, attrs, rows, labels)
            g.attrs.update({"format": S.VIEWS_FORMAT, **attrs})
            fault_point("store:views-created")
            os.rename(tmp, path / S.VIEWS_GROUP)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self._validate_views()

    def _views_arrays(self, g: zarr.Group, attrs: dict[str, Any], rows: np.ndarray, labels: np.ndarray) -> None:
        m, v, rows_per = len(rows), int(attrs["views"]), self.chunk_rows
        nc = S.n_chunks(m, rows_per)
        g.create_array(
            S.FEATURES,
            shape=(m, v, self.dim),
            chunks=(rows_per, v, self.dim),
            dtype=self.attrs["dtype"],
            fill_value=0,
            compressors=_compressor(),
            config=_ARRAY_CONFIG,
        )
        r = g.create_array(
            S.VIEW_ROWS,
            shape=(m,),
            chunks=(rows_per,),
            dtype="int64",
            fill_value=-1,
            compressors=_CRC,
            config=_ARRAY_CONFIG,
        )
        lab = g.create_array(
            S.LABELS,
            shape=(m,),
            chunks=(rows_per,),
            dtype="int32",
            fill_value=-1,
            compressors=_CRC,
            config=_ARRAY_CONFIG,
        )
        g.create_array(
            S.CHECKSUMS, shape=(nc,), chunks=(1,), dtype="uint32", fill_value=0, compressors=_CRC, config=_ARRAY_CONFIG
        )
        g.create_array(S.WRITTEN, shape=(nc,), chunks=(1,), dtype=bool, fill_value=False, compressors=_CRC)
        if m:
            write(r, slice(None), np.asarray(rows, dtype=np.int64))
            write(lab, slice(None), np.asarray(labels, dtype=np.int32))

    def view_rows(self) -> np.ndarray:
        return np.asarray(_array(self._views(), S.VIEW_ROWS)[:], dtype=np.int64)

    def view_labels(self) -> np.ndarray:
        return np.asarray(_array(self._views(), S.LABELS)[:], dtype=np.int32)

    def views_written(self) -> np.ndarray:
        return np.asarray(_array(self._views(), S.WRITTEN)[:], dtype=bool)

    def write_view_chunk(self, chunk: int, features: np.ndarray, labels: np.ndarray) -> None:
        """Store one row chunk of views (r, V, dim), then its checksum, then its flag (schema.py)."""
        from fskd.fsutil import fault_point

        g = self._views()
        start = chunk * self.chunk_rows
        _refuse_non_finite(features, labels, f"{self.path}: views rows {start}-{start + len(features) - 1}")
        write(_array(g, S.FEATURES), slice(start, start + len(features)), features)
        write(_array(g, S.LABELS), slice(start, start + len(features)), labels)
        fault_point("store:views-data")
        write(_array(g, S.CHECKSUMS), chunk, S.chunk_checksum(features, labels))
        write(_array(g, S.WRITTEN), chunk, True)
        fault_point("store:views-written")

    def mark_views_unwritten(self, chunks: Iterable[int]) -> None:
        w = _array(self._views(), S.WRITTEN)
        for c in chunks:
            write(w, int(c), False)

    def views_damaged(self, verify: bool = True) -> dict[int, str]:
        """``{chunk: reason}`` for view chunks marked written that cannot be trusted (as
        :meth:`damaged_chunks` for a split): an object missing, undecodable, or a checksum mismatch."""
        g = self._views()
        written = self.views_written()
        bad: dict[int, str] = {}
        for name in (S.FEATURES, S.LABELS, S.CHECKSUMS):
            arr = _array(g, name)
            have = _list_keys(arr)
            for c in np.flatnonzero(written):
                coords = (int(c), 0, 0) if arr.ndim == 3 else (int(c),)
                if _chunk_key(arr, coords) not in have:
                    bad.setdefault(int(c), f"{name} chunk object missing")
        if verify:
            _verify_chunks(
                _array(g, S.FEATURES),
                _array(g, S.LABELS),
                np.asarray(_array(g, S.CHECKSUMS)[:]),
                written,
                self.chunk_rows,
                bad,
                self.location,
            )
        return dict(sorted(bad.items()))

    def take_views(self, rows: np.ndarray) -> tuple[np.ndarray | None, str]:
        """Augmented views (len(rows), V, dim) float32 of train ``rows``, and a description; or
        (None, why) when the store has no views, or some of the rows have none (not among the views'
        rows, their chunk not written yet, or their image unreadable when the views were made)."""
        info = self.views_info
        if info is None:
            return None, "no augmented views in the store"
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        have = self.view_rows()
        pos = np.searchsorted(have, rows)
        ok = (
            (pos < len(have)) & (have[np.minimum(pos, max(len(have) - 1, 0))] == rows)
            if len(have)
            else np.zeros(len(rows), bool)
        )
        if not ok.all():
            return None, (
                f"the store's views cover {len(have)} train rows ({_views_rows_text(info)}); "
                f"{int((~ok).sum())} of these {len(rows)} rows have none"
            )
        g = self._views()
        chunk = pos // self.chunk_rows
        written = self.views_written()
        if not written[np.unique(chunk)].all():
            return (
                None,
                "the store's views are incomplete (run the same `fskd extract --augment-views` again to finish)",
            )
        lab = np.asarray(_array(g, S.LABELS)[:])
        if (lab[pos] < 0).any():
            return None, f"{int((lab[pos] < 0).sum())} of these rows' images could not be read when the views were made"
        v = int(info["views"])
        out = np.empty((len(rows), v, self.dim), np.float32)
        order = np.argsort(pos, kind="stable")
        srt, bounds = pos[order], np.flatnonzero(np.diff(chunk[order])) + 1
        m = len(have)
        for part in np.split(np.arange(len(srt)), bounds):
            c = int(srt[part[0]] // self.chunk_rows)
            start = c * self.chunk_rows
            try:
                block = np.asarray(_array(g, S.FEATURES)[start : min(m, start + self.chunk_rows)])
            except Exception as e:
                raise_if_backend(self.location, e)
                raise StoreError(
                    f"{self.path}: cannot read views/features chunk {c} ({type(e).__name__}: {e}); "
                    f"`fskd info --check {self.path}` lists the damage"
                ) from None
            self._check_finite(block, "views/features", c)
            out[order[part]] = np.asarray(block[srt[part] - start], dtype=np.float32)
        return out, describe_views(info)

    def _validate_views(self) -> None:
        g = _subgroup(self.group, S.VIEWS_GROUP)
        a: dict[str, Any] = dict(g.attrs)
        if a.get("format") != S.VIEWS_FORMAT or any(k not in a for k in S.VIEWS_ATTRS):
            raise StoreError(
                f"{self.path}: group views/ is not fskd's augmented-views group (attrs {sorted(a)}); "
                f"expected {list(S.VIEWS_ATTRS)}"
            )
        for name in (S.VIEW_ROWS, S.LABELS, S.FEATURES, S.CHECKSUMS, S.WRITTEN):
            if name not in g:
                raise StoreError(f"{self.path}: array views/{name} is missing")
        m, v = _array(g, S.VIEW_ROWS).shape[0], int(a["views"])
        f = _array(g, S.FEATURES)
        if f.shape != (m, v, self.dim) or f.dtype != S.FEATURE_DTYPES[self.attrs["dtype"]]:
            raise StoreError(
                f"{self.path}: views/features has shape {f.shape} {f.dtype}, expected ({m}, {v}, {self.dim}) "
                f"{self.attrs['dtype']}"
            )
        nc = S.n_chunks(m, self.chunk_rows)
        for name, want in ((S.LABELS, (m,)), (S.CHECKSUMS, (nc,)), (S.WRITTEN, (nc,))):
            if _array(g, name).shape != want:
                raise StoreError(f"{self.path}: views/{name} has shape {_array(g, name).shape}, expected {want}")

    def _views_summary(self) -> dict[str, Any] | None:
        info = self.views_info
        if info is None:
            return None
        return {
            "views": int(info["views"]),
            "rows": int(_array(self._views(), S.VIEW_ROWS).shape[0]),
            "complete": bool(self.views_written().all()),
            "description": describe_views(info),
        }
