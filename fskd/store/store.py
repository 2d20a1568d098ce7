"""FeatureStore: open, create and read the Zarr feature store described in ``schema.py``.

Reads stream by row chunk; nothing here needs a whole split in memory (``gather`` returns only
the rows asked for). The store's other parts are files of their own: its integrity checks and
repair (``integrity.py``), its augmented views (``augmented.py``), the layout and root claim of a
new store (``creation.py``) and the zarr arrays' codecs and access (``arrays.py``).
"""

from __future__ import annotations

import os
import secrets
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import zarr

from fskd.errors import StoreError
from fskd.store import schema as S
from fskd.store.arrays import _array, _subgroup, write
from fskd.store.augmented import AugmentedViews
from fskd.store.creation import SplitRows, _claim_creation, _commit_creation, _fill_layout
from fskd.store.integrity import IntegrityMixin, _refuse_non_finite
from fskd.store.location import Location, raise_if_backend, remote_errors

if TYPE_CHECKING:
    from zarr.core.common import AccessModeLiteral

    from fskd.store.view import StoreView


def _nearby(path: Path, limit: int = 5) -> str:
    """``; stores nearby: ...``: the fskd stores in the folder ``path`` names (or the nearest one
    that exists) and in ``runs/demo``, for a mistyped ``--store``. Looks at a bounded number of entries."""
    from fskd.fsutil import first_existing, is_store_dir

    found: list[str] = []
    for folder in dict.fromkeys((first_existing(path.expanduser().absolute().parent), Path("runs/demo"))):
        if not folder.is_dir():
            continue
        for i, entry in enumerate(os.scandir(folder)):
            if i >= 1000 or len(found) >= limit:
                break
            if entry.name.endswith(".zarr") and is_store_dir(Path(entry.path)):
                found.append(str(Path(folder) / entry.name) if folder != Path(".") else entry.name)
    return f"; stores nearby: {', '.join(sorted(found))}" if found else ""


def _location(path: str | Path | Location) -> Location:
    return path if isinstance(path, Location) else Location(path)


class LabelledReads(ABC):
    """The reads that honour a split's labels (a label -1 is a row nobody reads) and the splits a
    read uses when it names none: :class:`FeatureStore` (every readable row, every split) and
    :class:`~fskd.store.view.StoreView` (the rows and class split a protocol lets a method see)
    share them."""

    @property
    @abstractmethod
    def dim(self) -> int: ...

    @property
    @abstractmethod
    def num_classes(self) -> int: ...

    @property
    @abstractmethod
    def splits(self) -> list[str]: ...

    @property
    @abstractmethod
    def where(self) -> str:
        """The store's path or URL, for messages."""

    @abstractmethod
    def labels(self, split: str) -> np.ndarray:
        """(n,) class index per row of ``split``; -1 for a row no read returns."""

    @abstractmethod
    def _splits_or_default(self, splits: list[str] | tuple[str, ...] | None) -> list[str]:
        """The splits a read names, else the default ones."""

    @abstractmethod
    def _row_blocks(self, split: str, rows: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """For ascending unique ``rows`` of ``split``: ``(lo, hi, features of rows[lo:hi])`` float32."""

    @abstractmethod
    def iter_chunks(self, split: str) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(start_row, features (r, dim) float32, labels (r,))`` one row chunk at a time."""

    def gather(
        self,
        classes: list[int] | np.ndarray | None = None,
        splits: list[str] | tuple[str, ...] | None = None,
        max_per_class: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows whose label is in ``classes`` (all valid rows when None), from ``splits`` (all by
        default), read chunk by chunk: returns (features (n, dim) float32, labels (n,) int64).
        ``max_per_class``: keep at most that many rows of each class over the splits (a fixed
        seeded choice, the same every call), so a method learning from 600 base classes of
        ImageNet holds 600 x 600 rows, not 800,000; classes with fewer rows keep them all."""
        splits = self._splits_or_default(splits)
        wanted = None if classes is None else np.asarray(sorted(set(int(c) for c in classes)))
        masks = {}
        for s in splits:
            lab_all = self.labels(s)
            masks[s] = lab_all >= 0 if wanted is None else np.isin(lab_all, wanted)
        if max_per_class is not None:
            masks = self._thin(masks, max_per_class)
        feats, labs = [], []
        for s in splits:
            lab_all = self.labels(s)
            rows = np.flatnonzero(masks[s])
            for lo, hi, block in self._row_blocks(s, rows):
                feats.append(block)
                labs.append(lab_all[rows[lo:hi]])
        if not feats:
            return np.zeros((0, self.dim), np.float32), np.zeros((0,), np.int64)
        return np.concatenate(feats), np.concatenate(labs)

    def _thin(self, masks: dict[str, np.ndarray], cap: int) -> dict[str, np.ndarray]:
        """At most ``cap`` selected rows per class over all ``masks`` (seeded: the same every call)."""
        labels = np.concatenate([self.labels(s) for s in masks])
        keep = np.concatenate(list(masks.values()))
        counts = np.bincount(labels[keep], minlength=self.num_classes)
        if not len(counts) or counts.max() <= cap:
            return masks
        from fskd.store.sampling import first_per_class

        thinned = np.zeros(len(labels), bool)
        thinned[first_per_class(np.where(keep, labels, -1), keep, cap, np.random.default_rng(20260601))] = True
        out, start = {}, 0
        for s, m in masks.items():
            out[s] = thinned[start : start + len(m)]
            start += len(m)
        return out

    def valid_rows(self, split: str, classes: Iterable[int] | None = None) -> np.ndarray:
        """Indices of ``split``'s rows with a label (in ``classes`` when given), in split order: the
        rows :meth:`gather` returns for that split."""
        lab = self.labels(split)
        keep = lab >= 0 if classes is None else np.isin(lab, np.asarray(list(classes), dtype=lab.dtype))
        return np.flatnonzero(keep)

    def mean(self, classes: list[int] | None = None, splits: list[str] | None = None) -> np.ndarray:
        """Mean feature over rows of ``classes`` (streamed; used for base-mean centring)."""
        total = np.zeros(self.dim, np.float64)
        count = 0
        wanted = None if classes is None else np.asarray(sorted(classes))
        for s in self._splits_or_default(splits or None):
            for _, f, lab in self.iter_chunks(s):
                keep = lab >= 0 if wanted is None else np.isin(lab, wanted)
                total += f[keep].sum(0, dtype=np.float64)
                count += int(keep.sum())
        if count == 0:
            raise StoreError(f"{self.where}: no rows for classes {classes} in splits {splits or self.splits}")
        return (total / count).astype(np.float32)


class FeatureStore(LabelledReads, IntegrityMixin, AugmentedViews):
    """A feature store on disk or on object storage (``location.py``). Use :meth:`open` or
    :meth:`create`. ``path`` is a Path for a local store and the URL (str) for a remote one.
    Integrity checks and repair come from :class:`~fskd.store.integrity.IntegrityMixin`, the
    augmented views from :class:`~fskd.store.augmented.AugmentedViews`."""

    def __init__(self, path: Path | str, group: zarr.Group, location: Location | None = None) -> None:
        self.location = location or _location(path)
        self.path: Path | str = self.location.local if self.location.local is not None else str(self.location)
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        # labels per split, read once when the store is opened read-only (nothing can change them then)
        self._labels: dict[str, np.ndarray] | None = {} if group.read_only else None

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path | Location, mode: AccessModeLiteral = "r") -> FeatureStore:
        """Open and validate a store (a path or a URL); raises StoreError naming it and what is wrong."""
        loc = _location(path)
        if loc.is_remote:
            return cls._open_remote(loc, mode)
        path = loc.local_path
        if not path.exists():
            raise StoreError(f"feature store {path} does not exist (create it with `fskd extract`){_nearby(path)}")
        try:
            group = zarr.open_group(str(path), mode=mode)
        except Exception as e:  # zarr raises several types for a non-store folder
            raise StoreError(f"{path} is not a Zarr store: {e}") from None
        store = cls(path, group, loc)
        store.validate()
        return store

    @classmethod
    def _open_remote(cls, loc: Location, mode: AccessModeLiteral) -> FeatureStore:
        if not loc.exists():
            loc.probe()  # a missing bucket or bad credentials say so, not "does not exist"
            raise StoreError(f"feature store {loc} does not exist (create it with `fskd extract`)")
        if (loc.root_attrs() or {}).get("format") == S.CREATING_FORMAT:
            raise StoreError(
                f"{loc}: the store is being created, or its creation was interrupted (no completion "
                f"marker); run the same `fskd extract` again"
            )
        try:
            with remote_errors(loc):
                group = zarr.open_group(loc.zarr_store(read_only=mode == "r"), mode=mode)
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(f"{loc} is not a Zarr store: {e}") from None
        store = cls(loc.remote_url, group, loc)
        store.validate()
        return store

    def validate(self) -> None:
        try:
            self._validate()
        except StoreError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:  # attrs edited or damaged
            raise StoreError(
                f"{self.path}: the store's attributes or arrays are damaged ({type(e).__name__}: {e}); "
                f"re-extract into a new --store path"
            ) from None

    def _validate(self) -> None:
        a = self.attrs
        if a.get("format") != S.FORMAT:
            raise StoreError(f"{self.path} is not an fskd feature store (attrs.format={a.get('format')!r})")
        if a.get("schema_version") != S.SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {a.get('schema_version')!r}; this fskd reads version "
                f"{S.SCHEMA_VERSION} (version 3 checks every chunk on read). Re-extract into a new --store path."
            )
        missing = [k for k in S.ROOT_ATTRS if k not in a]
        if missing:
            raise StoreError(f"{self.path}: missing attributes {missing}")
        dim, dtype = a["dim"], S.FEATURE_DTYPES[a["dtype"]]
        for split in a["splits"]:
            g = self._group(split)
            n = None
            for name in (S.FEATURES, S.LABELS, S.SAMPLE_IDS, S.WRITTEN, S.CHECKSUMS):
                if name not in g:
                    raise StoreError(f"{self.path}: array {split}/{name} is missing")
            f = _array(g, S.FEATURES)
            n = f.shape[0]
            if f.ndim != 2 or f.shape[1] != dim or f.dtype != dtype:
                raise StoreError(
                    f"{self.path}: {split}/features has shape {f.shape} {f.dtype}, expected (n, {dim}) {dtype}"
                )
            nc = S.n_chunks(n, a["chunk_rows"])
            for name, want in ((S.LABELS, (n,)), (S.SAMPLE_IDS, (n,)), (S.WRITTEN, (nc,)), (S.CHECKSUMS, (nc,))):
                if _array(g, name).shape != want:
                    raise StoreError(f"{self.path}: {split}/{name} has shape {_array(g, name).shape}, expected {want}")
        if self._has_views():
            self._validate_views()
        t = self._group(S.TEXT_GROUP)
        for name in (S.CLASSNAMES, S.CLASSKEYS, S.PROMPTS):
            if name not in t:
                raise StoreError(f"{self.path}: array text/{name} is missing")
        if a["text"].get("available"):
            if S.CLASS_EMBEDDINGS not in t:
                raise StoreError(f"{self.path}: array text/class_embeddings is missing")
            if _array(t, S.CLASS_EMBEDDINGS).shape != (_array(t, S.CLASSNAMES).shape[0], a["text"]["dim"]):
                raise StoreError(f"{self.path}: text/class_embeddings has shape {_array(t, S.CLASS_EMBEDDINGS).shape}")

    def _group(self, name: str) -> zarr.Group:
        try:
            return _subgroup(self.group, name)
        except KeyError:
            raise self._missing(f"group {name!r}") from None
        except Exception as e:  # a remote that stopped answering: the network, named as such
            raise_if_backend(self.location, e)
            raise

    def _missing(self, what: str) -> StoreError:
        """The error for a group or array that is not there: the whole store removed while in use
        (a KeyError deep in zarr otherwise), or the part missing from a store that is there."""
        try:
            gone = not self.location.exists()
        except Exception:  # noqa: BLE001 - a remote that does not answer: say what is missing
            gone = False
        if gone:
            return StoreError(f"feature store {self.path} was removed (or moved) while in use: {what} is gone")
        return StoreError(f"{self.path}: {what} is missing")

    # -- creation ----------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        attrs: dict[str, Any],
        splits: dict[str, SplitRows],
        class_keys: list[str],
        class_names: list[str],
        prompts: list[str],
        class_embeddings: np.ndarray | None,
    ) -> FeatureStore:
        """Create an empty store (features unwritten). Built beside ``path`` and renamed into
        place, so a kill during creation never leaves a half-made store at ``path``; on object
        storage (no rename) the root attributes are written last (``schema.py``)."""
        loc = _location(path)
        if loc.is_remote:
            cls._create_remote(loc, attrs, splits, class_keys, class_names, prompts, class_embeddings)
            return cls.open(loc, mode="r+")
        path = loc.local_path
        if path.exists():
            raise StoreError(f"{path} already exists")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            root = zarr.open_group(str(tmp), mode="w")
            _fill_layout(root, attrs, splits, class_keys, class_names, prompts, class_embeddings)
            root.attrs.update(attrs)
            try:
                os.rename(tmp, path)  # atomic; fails when another process created the store first
            except OSError:
                if not path.exists():
                    raise
                raise StoreError(
                    f"{path} was created by another process meanwhile; run the command again to resume into it"
                ) from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(path, mode="r+")

    @classmethod
    def _create_remote(
        cls,
        loc: Location,
        attrs: dict[str, Any],
        splits: dict[str, SplitRows],
        class_keys: list[str],
        class_names: list[str],
        prompts: list[str],
        class_embeddings: np.ndarray | None,
    ) -> None:
        """Object storage has no rename (``schema.py``): claim the root ``zarr.json`` with a
        conditional PUT of the ``S.CREATING_FORMAT`` marker, remove what an interrupted creation
        left, write every group and array, then the root attributes with a PUT conditional on the
        claim (the completion marker). A prefix holding objects fskd did not write is refused; a
        creation by a live process on this machine is refused; an interrupted one is made again."""
        from fskd.fsutil import fault_point

        loc.probe()
        token = secrets.token_hex(8)
        etag = _claim_creation(loc, token)
        fault_point("store:create-claimed")
        with remote_errors(loc):
            loc.remove_all_but_root()  # fskd's own unfinished creation: the claim says only fskd wrote here
            store = loc.zarr_store(read_only=False)
            store.fs.invalidate_cache()  # zarr's own (async) filesystem instance: no listing from before the removal
            try:
                root = zarr.open_group(store, mode="r+")
                _fill_layout(root, attrs, splits, class_keys, class_names, prompts, class_embeddings)
            except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
                raise StoreError(
                    f"{loc}: another fskd extract wrote into the store while this one created it (it "
                    f"took the creation over); rerun when it finishes"
                ) from None
            fault_point("store:create-arrays")
            _commit_creation(loc, attrs, etag)

    @classmethod
    def from_arrays(
        cls,
        path: str | Path,
        splits: dict[str, tuple[np.ndarray, np.ndarray]],
        class_names: list[str],
        class_split: dict[str, list[int]],
        text_embeddings: np.ndarray | None = None,
        encoder: dict[str, Any] | None = None,
        dataset: str = "arrays",
        dtype: str = "float32",
        chunk_rows: int = 1024,
    ) -> FeatureStore:
        """A complete store from in-memory features: ``splits = {name: (features (n, d), labels (n,))}``.

        For features computed elsewhere (import them once, then use every fskd method), synthetic
        benchmarks and tests. ``encoder`` describes where the features came from (spec, joint, ...).
        """
        import hashlib
        import json
        from datetime import datetime, timezone

        from fskd import __version__

        dim = int(next(iter(splits.values()))[0].shape[1])
        enc = {
            "spec": f"arrays:{dataset}",
            "image_dim": dim,
            "joint": False,
            "web_scale": False,
            "preprocess": {},
            "text_dim": None if text_embeddings is None else int(text_embeddings.shape[1]),
        }
        enc.update(encoder or {})
        h = hashlib.sha256()
        for name in sorted(splits):
            h.update(name.encode())
            h.update(np.ascontiguousarray(splits[name][0], dtype=np.float32).tobytes())
            h.update(np.asarray(splits[name][1], dtype=np.int64).tobytes())
        if text_embeddings is not None:
            h.update(np.ascontiguousarray(text_embeddings, dtype=np.float32).tobytes())
        h.update(json.dumps([class_names, class_split, enc], sort_keys=True).encode())
        attrs = {
            "format": S.FORMAT,
            "schema_version": S.SCHEMA_VERSION,
            "fskd_version": __version__,
            "fingerprint": h.hexdigest()[:32],
            "inputs": {"arrays": True},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "encoder": enc,
            "dataset": {"name": dataset, "root": "", "fingerprint": h.hexdigest()[:32]},
            "class_split": {**{k: [int(c) for c in v] for k, v in class_split.items()}, "source": "given"},
            "sample_split": {"rule": "given", "sizes": {s: len(v[1]) for s, v in splits.items()}},
            "splits": list(splits),
            "dim": dim,
            "dtype": dtype,
            "chunk_rows": chunk_rows,
            "text": {
                "available": text_embeddings is not None,
                "dim": enc["text_dim"],
                "source": "given",
                "templates": [],
            },
            "config": {},
        }
        store = cls.create(
            path,
            attrs=attrs,
            splits={s: SplitRows([f"{s}/{i}" for i in range(len(y))], np.asarray(y)) for s, (_, y) in splits.items()},
            class_keys=list(class_names),
            class_names=list(class_names),
            prompts=[],
            class_embeddings=text_embeddings,
        )
        for s, (x, y) in splits.items():
            for c in range(S.n_chunks(len(y), chunk_rows)):
                rows = slice(c * chunk_rows, min(len(y), (c + 1) * chunk_rows))
                store.write_chunk(
                    s, c, np.asarray(x[rows], dtype=S.FEATURE_DTYPES[dtype]), np.asarray(y[rows], dtype=np.int32)
                )
        return cls.open(path)

    # -- metadata ----------------------------------------------------------------------------
    @property
    def where(self) -> str:
        return str(self.path)

    @property
    def fingerprint(self) -> str:
        return str(self.attrs["fingerprint"])

    @property
    def encoder_spec(self) -> str:
        return str(self.attrs["encoder"]["spec"])

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def chunk_rows(self) -> int:
        return int(self.attrs["chunk_rows"])

    @property
    def splits(self) -> list[str]:
        return list(self.attrs["splits"])

    @property
    def joint(self) -> bool:
        return bool(self.attrs["encoder"]["joint"])

    @property
    def class_names(self) -> list[str]:
        return [str(s) for s in np.asarray(_array(self._group(S.TEXT_GROUP), S.CLASSNAMES)[:])]

    @property
    def class_keys(self) -> list[str]:
        return [str(s) for s in np.asarray(_array(self._group(S.TEXT_GROUP), S.CLASSKEYS)[:])]

    @property
    def num_classes(self) -> int:
        return int(_array(self._group(S.TEXT_GROUP), S.CLASSNAMES).shape[0])

    def class_split(self, name: str) -> list[int]:
        """Class indices of the base, val or novel class split."""
        split = self.attrs["class_split"]
        if name not in split:
            raise StoreError(f"{self.path}: no class split {name!r}; has {[k for k in split if k != 'source']}")
        return list(split[name])

    def view(
        self,
        class_split: Mapping[str, Any] | None = None,
        keep: Mapping[str, npt.ArrayLike] | None = None,
        default_splits: Sequence[str] | None = None,
        description: str | None = None,
    ) -> StoreView:
        """A read-only :class:`~fskd.store.view.StoreView` of this store: another class split than
        the stored one, rows outside ``keep`` (split -> (n,) bool) hidden, the splits a read that
        names none uses, and what the restriction shows. The store itself is not changed."""
        from fskd.store.view import StoreView

        return StoreView(self, class_split, keep, default_splits, description)

    def text_embeddings(self) -> np.ndarray | None:
        """(C, text_dim) float32 class text features, or None when the encoder has no text tower."""
        t = self._group(S.TEXT_GROUP)
        return np.asarray(_array(t, S.CLASS_EMBEDDINGS)[:], dtype=np.float32) if S.CLASS_EMBEDDINGS in t else None

    def has_split(self, split: str) -> bool:
        return split in self.attrs["splits"]

    def _split(self, split: str) -> zarr.Group:
        if split not in self.attrs["splits"]:
            raise StoreError(f"{self.path} has no sample split {split!r}; it has {self.splits}")
        return self._group(split)

    def n_rows(self, split: str) -> int:
        return int(_array(self._split(split), S.FEATURES).shape[0])

    def labels(self, split: str) -> np.ndarray:
        """(n,) class index per row; -1 for an unreadable row. What a method may see of a store is a
        :class:`~fskd.store.view.StoreView` (:meth:`view`), which hides rows as -1; a store never changes."""
        return self._raw_labels(split)

    def _raw_labels(self, split: str) -> np.ndarray:
        if self._labels is None:
            return np.asarray(self._read(split, S.LABELS, slice(None)), dtype=np.int64)
        if split not in self._labels:
            self._labels[split] = np.asarray(self._read(split, S.LABELS, slice(None)), dtype=np.int64)
        labels: np.ndarray = self._labels[split].copy()  # the caller's to change
        return labels

    def _splits_or_default(self, splits: list[str] | tuple[str, ...] | None) -> list[str]:
        """The splits a read names, else all (a :class:`~fskd.store.view.StoreView` has its own default)."""
        return list(splits) if splits is not None else self.splits

    def sample_ids(self, split: str) -> np.ndarray:
        # via object: numpy 2 cannot cast zarr's StringDType straight to a fixed-width str dtype
        return np.asarray(self._read(split, S.SAMPLE_IDS, slice(None))).astype(object).astype(str)

    def written(self, split: str) -> np.ndarray:
        return np.asarray(self._read(split, S.WRITTEN, slice(None)), dtype=bool)

    def skipped(self) -> dict[str, list[str]]:
        """Sample ids recorded as unreadable (label -1) per split, in written chunks."""
        out = {}
        for s in self.splits:
            lab = self._raw_labels(s)
            if (lab < 0).any():
                out[s] = self.sample_ids(s)[lab < 0].tolist()
        return out

    # -- writing -----------------------------------------------------------------------------
    def write_chunk(self, split: str, chunk: int, features: np.ndarray, labels: np.ndarray) -> None:
        """Store one whole row chunk, then its checksum, then mark it written (schema.py's rule)."""
        from fskd.fsutil import fault_point

        g = self._split(split)
        start = chunk * self.chunk_rows
        stop = start + len(features)
        _refuse_non_finite(features, labels, f"{self.path}: {split} rows {start}-{stop - 1}")
        write(_array(g, S.FEATURES), slice(start, stop), features)
        write(_array(g, S.LABELS), slice(start, stop), labels)
        fault_point("store:chunk-data")
        write(_array(g, S.CHECKSUMS), chunk, S.chunk_checksum(features, labels))
        fault_point("store:chunk-checksum")
        write(_array(g, S.WRITTEN), chunk, True)
        fault_point("store:chunk-written")

    # -- reading -----------------------------------------------------------------------------
    def _read(self, split: str, name: str, sel: slice, chunk: int | None = None) -> np.ndarray:
        """Read ``split/name[sel]``; a chunk that cannot be decoded, fails its CRC-32C, or (features)
        holds non-finite values is a StoreError naming it. ``chunk``: the first chunk ``sel`` reads."""
        group = self._split(split) if split != S.TEXT_GROUP else self._group(S.TEXT_GROUP)
        try:
            arr = _array(group, name)
        except KeyError:
            raise self._missing(f"array {split}/{name}") from None
        except Exception as e:
            raise_if_backend(self.location, e)
            raise
        try:
            out = np.asarray(arr[sel])
        except Exception as e:  # codec errors (CRC-32C mismatch included) come as RuntimeError, ValueError, ...
            raise_if_backend(self.location, e)
            chunk = self._failing_chunk(arr, sel, chunk)
            where = f"chunk {chunk}" if chunk is not None else "a chunk"
            raise StoreError(
                f"{self.path}: cannot read {split}/{name} {where} ({type(e).__name__}: {e}); the store is damaged. "
                f"`fskd info --check {self.path}` lists the damage; the same `fskd extract` re-encodes it"
            ) from None
        if name == S.FEATURES:
            self._check_finite(out, f"{split}/features", chunk)
        return out

    @property
    def read_span(self) -> int:
        """Row chunks asked of zarr in one read: 1 for a local store; for a remote one the bound on
        requests in flight (``location.max_requests``), which zarr fetches concurrently."""
        if not self.location.is_remote:
            return 1
        from fskd.store.location import max_requests

        return max_requests()

    def iter_chunks(self, split: str) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(start_row, features (r, dim) float32, labels (r,))`` one row chunk at a time
        (read :attr:`read_span` chunks at a time)."""
        n, rows = self.n_rows(split), self.chunk_rows
        lab = self.labels(split)
        step = rows * self.read_span
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            block = np.asarray(self._read(split, S.FEATURES, slice(lo, hi), lo // rows), dtype=np.float32)
            for start in range(lo, hi, rows):
                stop = min(hi, start + rows)
                yield start, block[start - lo : stop - lo], lab[start:stop]

    def features(self, split: str, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
        """A whole split (n, dim) as ``dtype`` (``store.attrs["dtype"]`` keeps the stored precision at
        half the memory of float32 for a float16 store). Prefer ``take`` / ``gather`` for big splits."""
        n, rows = self.n_rows(split), self.chunk_rows
        out = np.empty((n, self.dim), dtype)
        step = rows * self.read_span
        for start in range(0, n, step):
            out[start : start + step] = self._read(split, S.FEATURES, slice(start, min(n, start + step)), start // rows)
        return out

    def _row_blocks(self, split: str, rows: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """For ascending unique ``rows`` of ``split``: yield ``(lo, hi, features of rows[lo:hi])``
        (float32), reading only the chunks that hold them, :attr:`read_span` chunks per read."""
        if not len(rows):
            return
        cr, n, span = self.chunk_rows, self.n_rows(split), self.read_span
        chunk = rows // cr
        firsts = np.flatnonzero(np.r_[True, chunk[1:] != chunk[:-1]])
        arr = _array(self._split(split), S.FEATURES)
        for g in range(0, len(firsts), span):
            lo = int(firsts[g])
            hi = int(firsts[g + span]) if g + span < len(firsts) else len(rows)
            part, c = rows[lo:hi], int(chunk[lo])
            if span == 1:  # one chunk: a slice read, then numpy picks the rows
                start = c * cr
                block = self._read(split, S.FEATURES, slice(start, min(n, start + cr)), c)[part - start]
            else:  # zarr fetches the chunks of these rows concurrently (at most span requests)
                try:
                    block = np.asarray(arr.get_orthogonal_selection((part, slice(None))))
                except Exception as e:
                    raise_if_backend(self.location, e)
                    for cc in np.unique(chunk[lo:hi]):  # name the chunk: read them one at a time
                        self._read(split, S.FEATURES, slice(int(cc) * cr, min(n, (int(cc) + 1) * cr)), int(cc))
                    raise StoreError(
                        f"{self.path}: cannot read {split}/features chunks {c}..{int(chunk[hi - 1])} "
                        f"({type(e).__name__}: {e}); `fskd info --check {self.path}` lists the damage"
                    ) from None
                self._check_finite(block, f"{split}/features", c, rows=part)
            yield lo, hi, np.asarray(block, dtype=np.float32)

    def take(self, split: str, rows: np.ndarray) -> np.ndarray:
        """Features (len(rows), dim) float32 of ``rows`` (indices into ``split``, any order, repeats
        allowed), in that order; reads only the chunks that hold them, one chunk at a time, so
        gathering 16 shots x 1,000 classes never holds the split in memory."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.dim), np.float32)
        if not len(rows):
            return out
        n = self.n_rows(split)
        if rows.min() < 0 or rows.max() >= n:
            raise IndexError(
                f"{self.path}: row {int(rows.max() if rows.max() >= n else rows.min())} is outside {split} (0..{n - 1})"
            )
        uniq, inverse = np.unique(rows, return_inverse=True)
        feats = np.empty((len(uniq), self.dim), np.float32)
        for lo, hi, block in self._row_blocks(split, uniq):
            feats[lo:hi] = block
        out[:] = feats[inverse.reshape(-1)]
        return out

    def size_on_disk(self) -> int:
        return self.location.size()

    def summary(self) -> dict[str, Any]:
        a = self.attrs
        names = self.class_names
        split = {k: v for k, v in a["class_split"].items() if k != "source"}
        return {
            "path": str(self.path),
            "encoder": a["encoder"]["spec"],
            "joint": bool(a["encoder"].get("joint")),
            "web_scale": bool(a["encoder"].get("web_scale")),
            "dataset": a["dataset"]["name"],
            "root": a["dataset"].get("root"),
            "created": a.get("created"),
            "fskd_version": a.get("fskd_version"),
            "dim": a["dim"],
            "dtype": a["dtype"],
            "chunk_rows": a["chunk_rows"],
            "size_bytes": self.size_on_disk(),
            "classes": self.num_classes,
            "class_split": {k: len(v) for k, v in split.items()},
            "class_split_source": a["class_split"].get("source"),
            "class_names": {k: [names[i] for i in v] for k, v in split.items()},
            "sample_split": a["sample_split"].get("rule"),
            "rows": {s: self.n_rows(s) for s in self.splits},
            "complete": all(self.written(s).all() for s in self.splits),
            "missing_chunks": self.missing_chunks(),
            "skipped": {s: len(v) for s, v in self.skipped().items()},
            "ignored_files": a["dataset"].get("ignored", {}),
            "text": a["text"].get("available", False),
            "text_source": a["text"].get("source"),
            "templates": list(a["text"].get("templates", [])),
            "templates_source": a["text"].get("templates_source", "fskd default"),
            "views": self._views_summary(),
        }
