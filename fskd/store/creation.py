"""Creating a store's layout (``schema.py``): every array of a new store, and on object storage
(no rename) the root claim and completion marker that make one creation win. ``FeatureStore.create``
(``store.py``) calls these."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from fskd.errors import StoreError
from fskd.store import schema as S
from fskd.store.arrays import _ARRAY_CONFIG, _CRC, _compressor, write
from fskd.store.location import ConditionFailed, Location


@dataclass
class SplitRows:
    """Rows of one sample split as written at creation (ids and labels known up front)."""

    sample_ids: list[str]
    labels: np.ndarray


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
            write(lab, slice(None), r.labels)
            write(ids, slice(None), np.asarray(r.sample_ids, dtype=object).astype(str))
    t = root.create_group(S.TEXT_GROUP)
    for name, values in ((S.CLASSNAMES, class_names), (S.CLASSKEYS, class_keys), (S.PROMPTS, prompts)):
        a = t.create_array(name, shape=(len(values),), dtype=str, compressors=_CRC, config=cfg)
        if len(values):
            write(a, slice(None), np.asarray(values, dtype=str))
    if class_embeddings is not None:
        e = t.create_array(
            S.CLASS_EMBEDDINGS, shape=class_embeddings.shape, dtype="float32", compressors=_CRC, config=cfg
        )
        write(e, slice(None), class_embeddings.astype(np.float32))


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
