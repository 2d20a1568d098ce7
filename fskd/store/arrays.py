"""The zarr side of the store's arrays (``schema.py``): the codecs every array is written with, and
typed access to a group's arrays, subgroups and stored chunk objects. Used by every file of the store."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

if TYPE_CHECKING:
    from zarr.abc.codec import BytesBytesCodec
    from zarr.core.array_spec import ArrayConfigParams
    from zarr.types import AnyArray


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


def write(arr: AnyArray, selection: int | slice, value: Any) -> None:
    """``arr[selection] = value`` (a basic selection), bounded as a whole on object storage
    (:func:`fskd.store.location.call_timeout`; a local store has no bound): zarr's own
    ``Array.__setitem__`` waits on its uploads with no bound, and an upload an endpoint stopped
    reading gets none from the backend either. A write past the bound is cancelled (its requests
    closed) and raises ``location.StalledWrite`` (a TimeoutError), named as the storage that
    stopped answering. Every write of the store goes through here."""
    import asyncio

    from zarr.core.sync import sync

    from fskd.store.location import StalledWrite, store_call_timeout

    timeout = store_call_timeout(arr.store)

    async def bounded() -> None:
        try:
            await asyncio.wait_for(arr.async_array.setitem(selection, value), timeout)
        except asyncio.TimeoutError:  # not the builtin one before Python 3.11
            raise StalledWrite(f"a write to {arr.path} failed to finish within {timeout} s") from None

    sync(bounded())


def _list_keys(arr: AnyArray) -> set[str]:
    """The chunk keys stored for ``arr`` (relative to the array, e.g. ``c/3/0``)."""
    from zarr.core.sync import sync

    prefix = f"{arr.path}/" if arr.path else ""

    async def _ls() -> list[str]:
        return [k async for k in arr.store.list_prefix(prefix + "c/")]

    return {k[len(prefix) :] for k in sync(_ls())}


def _chunk_key(arr: AnyArray, coords: tuple[int, ...]) -> str:
    return arr.metadata.encode_chunk_key(coords)
