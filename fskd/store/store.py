"""FeatureStore: open, create and read the Zarr feature store described in ``schema.py``.

Reads stream by row chunk; nothing here needs a whole split in memory (``gather`` returns only
the rows asked for).
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from fskd.errors import StoreError
from fskd.store import schema as S
from fskd.store.location import (
    ConditionFailed,
    Location,
    backend_errors,
    raise_if_backend,
    remote_errors,
)

if TYPE_CHECKING:
    from zarr.abc.codec import BytesBytesCodec
    from zarr.core.array_spec import ArrayConfigParams
    from zarr.core.common import AccessModeLiteral
    from zarr.types import AnyArray

    from fskd.store.view import StoreView


@dataclass
class SplitRows:
    """Rows of one sample split as written at creation (ids and labels known up front)."""

    sample_ids: list[str]
    labels: np.ndarray


def _compressor() -> list[BytesBytesCodec]:
    # byte-shuffled LZ4: float features compress a little and decompress faster than disk reads;
    # then a CRC-32C of the stored bytes, which zarr checks on every read of the chunk (schema.py)
    return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]


#: every other array: no compression, the same read-time CRC-32C (labels, ids, flags, text)
_CRC = [Crc32cCodec()]


#: every chunk a writer stores exists as an object, even one equal to the fill value (schema.py)
# (the ignore: zarr takes NotRequired from Python 3.11's typing, so mypy for 3.10 requires every key)
_ARRAY_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}  # type: ignore[typeddict-item, unused-ignore]


def _array(group: zarr.Group, name: str) -> AnyArray:
    """``group[name]``, one of the schema's arrays (:meth:`FeatureStore.validate` checked that it is one)."""
    return cast("AnyArray", group[name])


def _subgroup(group: zarr.Group, name: str) -> zarr.Group:
    """``group[name]``, one of the schema's groups (a split, ``text``, ``views``)."""
    return cast(zarr.Group, group[name])


def _list_keys(arr: AnyArray) -> set[str]:
    """The chunk keys stored for ``arr`` (relative to the array, e.g. ``c/3/0``)."""
    from zarr.core.sync import sync

    prefix = f"{arr.path}/" if arr.path else ""

    async def _ls() -> list[str]:
        return [k async for k in arr.store.list_prefix(prefix + "c/")]

    return {k[len(prefix) :] for k in sync(_ls())}


def _chunk_key(arr: AnyArray, coords: tuple[int, ...]) -> str:
    return arr.metadata.encode_chunk_key(coords)


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


def _fill_layout(
    root: zarr.Group,
    attrs: dict[str, Any],
    splits: dict[str, SplitRows],
    class_keys: list[str],
    class_names: list[str],
    prompts: list[str],
    class_embeddings: np.ndarray | None,
) -> None:
    """Every array of a new store (schema.py), features unwritten; the root attributes are the caller's."""
    cfg = _ARRAY_CONFIG
    dim, rows, dtype = attrs["dim"], attrs["chunk_rows"], attrs["dtype"]
    for split, r in splits.items():
        g = root.create_group(split)
        n = len(r.sample_ids)
        nc = S.n_chunks(n, rows)
        g.create_array(
            S.FEATURES,
            shape=(n, dim),
            chunks=(rows, dim),
            dtype=dtype,
            fill_value=0,
            compressors=_compressor(),
            config=cfg,
        )
        lab = g.create_array(
            S.LABELS, shape=(n,), chunks=(rows,), dtype="int32", fill_value=-1, compressors=_CRC, config=cfg
        )
        ids = g.create_array(S.SAMPLE_IDS, shape=(n,), chunks=(rows,), dtype=str, compressors=_CRC, config=cfg)
        # one object per flag and checksum: torchrun ranks (and nodes) write disjoint chunks concurrently
        g.create_array(
            S.CHECKSUMS, shape=(nc,), chunks=(1,), dtype="uint32", fill_value=0, compressors=_CRC, config=cfg
        )
        g.create_array(S.WRITTEN, shape=(nc,), chunks=(1,), dtype=bool, fill_value=False, compressors=_CRC)
        if n:
            lab[:] = r.labels
            ids[:] = np.asarray(r.sample_ids, dtype=object).astype(str)
    t = root.create_group(S.TEXT_GROUP)
    for name, values in ((S.CLASSNAMES, class_names), (S.CLASSKEYS, class_keys), (S.PROMPTS, prompts)):
        a = t.create_array(name, shape=(len(values),), dtype=str, compressors=_CRC, config=cfg)
        if len(values):
            a[:] = np.asarray(values, dtype=str)
    if class_embeddings is not None:
        e = t.create_array(
            S.CLASS_EMBEDDINGS, shape=class_embeddings.shape, dtype="float32", compressors=_CRC, config=cfg
        )
        e[:] = class_embeddings.astype(np.float32)


# -- creating a store on object storage (schema.py): the root claim ---------------------------------
def _group_json(attributes: dict[str, Any]) -> bytes:
    """A root group's ``zarr.json`` as zarr writes it (``GroupMetadata``), holding ``attributes``."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.group import GroupMetadata

    return GroupMetadata(attributes=attributes).to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def _json_attrs(data: bytes | None) -> dict[str, Any]:
    import json

    if data is None:
        return {}
    try:
        attrs = json.loads(data).get("attributes", {})
    except (TypeError, ValueError, AttributeError):
        return {}
    return attrs if isinstance(attrs, dict) else {}


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a process on this machine, from /proc (None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def _creator(token: str) -> dict[str, Any]:
    """Who is creating a store: written into the root marker, read by :func:`_creator_alive`."""
    import socket
    from datetime import datetime, timezone

    stat = _proc_stat(os.getpid())
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": stat[1] if stat else None,
        "token": token,
        "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _creator_alive(creator: dict[str, Any]) -> bool:
    """Whether the process named in a root marker still runs: only knowable on this machine (the
    same host name, a live pid with the same start time). A marker from another machine, from a
    process that is gone, or without a creator (an older fskd) is an interrupted creation."""
    import socket

    pid = creator.get("pid")
    if creator.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, start = stat
    return state not in ("Z", "X") and (creator.get("start") in (None, start))


def _claim_creation(loc: Location, token: str) -> str | None:
    """Put the root marker (``S.CREATING_FORMAT`` and this process as its creator): where no root
    exists with ``If-None-Match: *``, over an interrupted creation's marker with ``If-Match`` its
    ETag, so of two processes only one holds the claim. Returns the marker's ETag (for the
    commit). Raises StoreError for a complete store, another format, objects fskd did not write, or
    a creation a live process on this machine is running."""
    marker = _group_json({"format": S.CREATING_FORMAT, "creator": _creator(token)})
    for _ in range(5):
        data, etag = loc.root_object()
        if data is None:
            others = loc.first_objects()
            if others:
                if loc.root_object()[0] is not None:  # another process's root appeared meanwhile: look again
                    continue
                raise StoreError(
                    f"--store {loc} already holds objects fskd did not write ({', '.join(others)}, ...); "
                    f"choose an empty prefix (nothing was changed)"
                )
            try:
                return loc.put_root(marker, if_absent=True)
            except ConditionFailed:  # another process put a root meanwhile (or our retried PUT did): look again
                continue
        have = _json_attrs(data)
        fmt = have.get("format")
        if fmt == S.FORMAT:
            raise StoreError(
                f"{loc} already exists (created by another fskd extract meanwhile?); run the same "
                f"`fskd extract` again to resume into it"
            )
        if fmt != S.CREATING_FORMAT:
            raise StoreError(
                f"{loc} already exists and is not an fskd feature store (format {fmt!r}); fskd will not replace it"
            )
        creator = have.get("creator")
        if not isinstance(creator, dict):
            creator = {}
        if creator.get("token") == token:  # our own PUT landed though its answer was lost
            return etag
        if _creator_alive(creator):
            raise StoreError(
                f"another fskd extract (pid {creator.get('pid')} on this machine, since "
                f"{creator.get('since')}) is creating {loc}; rerun when it finishes (nothing was changed)"
            )
        logging.getLogger(__name__).info(
            "%s: its creation was interrupted (creator %s); making it again", loc, creator or "not recorded"
        )
        try:
            return loc.put_root(marker, if_etag=etag)
        except ConditionFailed:  # another rerun took it over first: look again
            continue
    raise StoreError(
        f"{loc}: its root object kept changing while this fskd extract tried to create the store "
        f"(other fskd extract processes?); rerun when they finish"
    )


def _commit_creation(loc: Location, attrs: dict[str, Any], etag: str | None) -> None:
    """The completion marker: the whole root attributes in one PUT, only over this process's own
    claim. A claim another process took over fails it (that process finishes the store)."""
    data = _group_json(attrs)
    try:
        loc.put_root(data, if_etag=etag)
    except ConditionFailed:
        now, _ = loc.root_object()
        if now is not None and _json_attrs(now) == _json_attrs(data):  # our own PUT landed, its answer was lost
            return
        raise StoreError(
            f"another fskd extract took over creating {loc} while this one was writing it (it saw "
            f"this creation as interrupted); rerun when it finishes"
        ) from None


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


class FeatureStore(LabelledReads):
    """A feature store on disk or on object storage (``location.py``). Use :meth:`open` or
    :meth:`create`. ``path`` is a Path for a local store and the URL (str) for a remote one."""

    def __init__(self, path: Path | str, group: zarr.Group, location: Location | None = None) -> None:
        self.location = location or _location(path)
        self.path: Path | str = self.location.local if self.location.local is not None else str(self.location)
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)

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
        return np.asarray(self._read(split, S.LABELS, slice(None)), dtype=np.int64)

    def _splits_or_default(self, splits: list[str] | tuple[str, ...] | None) -> list[str]:
        """The splits a read names, else all (a :class:`~fskd.store.view.StoreView` has its own default)."""
        return list(splits) if splits is not None else self.splits

    def sample_ids(self, split: str) -> np.ndarray:
        # via object: numpy 2 cannot cast zarr's StringDType straight to a fixed-width str dtype
        return np.asarray(self._read(split, S.SAMPLE_IDS, slice(None))).astype(object).astype(str)

    def written(self, split: str) -> np.ndarray:
        return np.asarray(self._read(split, S.WRITTEN, slice(None)), dtype=bool)

    def is_complete(self) -> bool:
        return all(self.written(s).all() for s in self.splits) and not self.missing_chunks()

    def skipped(self) -> dict[str, list[str]]:
        """Sample ids recorded as unreadable (label -1) per split, in written chunks."""
        out = {}
        for s in self.splits:
            lab = self._raw_labels(s)
            if (lab < 0).any():
                out[s] = self.sample_ids(s)[lab < 0].tolist()
        return out

    # -- integrity ---------------------------------------------------------------------------
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
            w[int(c)] = False

    def rewrite_sample_ids(self, split: str, sample_ids: list[str]) -> None:
        _array(self._split(split), S.SAMPLE_IDS)[:] = np.asarray(sample_ids, dtype=object).astype(str)

    # -- writing -----------------------------------------------------------------------------
    def write_chunk(self, split: str, chunk: int, features: np.ndarray, labels: np.ndarray) -> None:
        """Store one whole row chunk, then its checksum, then mark it written (schema.py's rule)."""
        from fskd.fsutil import fault_point

        g = self._split(split)
        start = chunk * self.chunk_rows
        stop = start + len(features)
        _refuse_non_finite(features, labels, f"{self.path}: {split} rows {start}-{stop - 1}")
        _array(g, S.FEATURES)[start:stop] = features
        _array(g, S.LABELS)[start:stop] = labels
        fault_point("store:chunk-data")
        _array(g, S.CHECKSUMS)[chunk] = S.chunk_checksum(features, labels)
        fault_point("store:chunk-checksum")
        _array(g, S.WRITTEN)[chunk] = True
        fault_point("store:chunk-written")

    # -- augmented views (schema.py: views/) ---------------------------------------------------
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
            r[:] = np.asarray(rows, dtype=np.int64)
            lab[:] = np.asarray(labels, dtype=np.int32)

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
        _array(g, S.FEATURES)[start : start + len(features)] = features
        _array(g, S.LABELS)[start : start + len(features)] = labels
        fault_point("store:views-data")
        _array(g, S.CHECKSUMS)[chunk] = S.chunk_checksum(features, labels)
        _array(g, S.WRITTEN)[chunk] = True
        fault_point("store:views-written")

    def mark_views_unwritten(self, chunks: Iterable[int]) -> None:
        w = _array(self._views(), S.WRITTEN)
        for c in chunks:
            w[int(c)] = False

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

    # -- reading -----------------------------------------------------------------------------
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
