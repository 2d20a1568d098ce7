"""StoreView: what a protocol lets a method see of a feature store, without changing the store.

A view is immutable: a :class:`~fskd.store.store.FeatureStore`, optionally another base/val/novel
class split than the stored one (``--class-split``, ``--class-ratio``, a state's, base-to-new's
halves) and optionally per-split row masks (rows outside a mask read as label -1, so every reader
that honours labels skips them: ``labels``, ``gather``, ``valid_rows``, ``mean``, ``iter_chunks``)
with the splits a read uses when it names none and a description of the restriction. ``take``
and ``features`` read rows by index and are not masked, as on the store.

Build one with :meth:`FeatureStore.view` or :meth:`StoreView.of`; a view of a view composes (the
newer class split and default splits replace the older ones, masks of the same split are and-ed).
Everything else a method reads is delegated, read-only, to the store; nothing here writes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NoReturn, Union

import numpy as np
import numpy.typing as npt

from fskd.store.store import FeatureStore, LabelledReads

if TYPE_CHECKING:
    from fskd.store.location import Location

#: what a reader accepts: the store itself (every row, its own class split) or a view of it
StoreLike = Union[FeatureStore, "StoreView"]


def class_split_override(
    store: StoreLike, file: str | None = None, ratio: tuple[float, float, float] | None = None, seed: int = 0
) -> dict[str, Any] | None:
    """Another base/val/novel class split than the stored one: from a JSON file of class names
    (``--class-split``) or a seeded ratio split (``--class-ratio``); None when neither is given.
    The split carries its ``source`` ("override: ..."); pass it to :meth:`FeatureStore.view`."""
    if file is None and ratio is None:
        return None
    from fskd.datasets.base import DatasetListing
    from fskd.datasets.splits import resolve_class_split

    listing = DatasetListing(
        store.attrs["dataset"]["name"],
        str(store.attrs["dataset"].get("root", "")),
        store.class_keys,
        store.class_names,
        {},
    )
    if file is None:
        listing.standard_class_split = None
    split, source = resolve_class_split(listing, file, ratio or (0.6, 0.2, 0.2), seed)
    return {**split, "source": f"override: {source}"}


def _frozen(mask: npt.ArrayLike) -> np.ndarray:
    out = np.array(mask, dtype=bool)
    out.flags.writeable = False
    return out


class StoreView(LabelledReads):
    """A read-only view of a :class:`FeatureStore` (see the module docstring). ``attrs`` is the
    store's, with the view's class split and, for a row restriction, ``row_restriction`` (its
    description)."""

    _store: FeatureStore
    _keep: Mapping[str, np.ndarray]
    _default_splits: tuple[str, ...] | None
    _description: str | None
    _attrs: Mapping[str, Any]

    def __init__(
        self,
        store: FeatureStore,
        class_split: Mapping[str, Any] | None = None,
        keep: Mapping[str, npt.ArrayLike] | None = None,
        default_splits: Sequence[str] | None = None,
        description: str | None = None,
    ) -> None:
        masks = {s: _frozen(m) for s, m in (keep or {}).items()}
        for s, m in masks.items():
            if len(m) != store.n_rows(s):
                raise ValueError(f"StoreView: {s} mask has {len(m)} rows, the split has {store.n_rows(s)}")
        attrs = dict(store.attrs)
        if class_split is not None:
            attrs["class_split"] = dict(class_split)
        if description is not None:
            attrs["row_restriction"] = description
        set_ = object.__setattr__
        set_(self, "_store", store)
        set_(self, "_keep", MappingProxyType(masks))
        set_(self, "_default_splits", None if default_splits is None else tuple(default_splits))
        set_(self, "_description", description)
        set_(self, "_attrs", MappingProxyType(attrs))

    @classmethod
    def of(
        cls,
        store: StoreLike,
        class_split: Mapping[str, Any] | None = None,
        keep: Mapping[str, npt.ArrayLike] | None = None,
        default_splits: Sequence[str] | None = None,
        description: str | None = None,
    ) -> StoreView:
        """A view of ``store`` (a store, or a view: composed with it)."""
        if isinstance(store, FeatureStore):
            return cls(store, class_split, keep, default_splits, description)
        masks: dict[str, npt.ArrayLike] = dict(store._keep)
        for s, m in (keep or {}).items():
            mask = np.asarray(m, dtype=bool)
            masks[s] = mask & store._keep[s] if s in store._keep and len(mask) == len(store._keep[s]) else mask
        return cls(
            store._store,
            class_split if class_split is not None else store.attrs["class_split"],
            masks,
            default_splits if default_splits is not None else store._default_splits,
            description if description is not None else store._description,
        )

    @property
    def whole_store(self) -> FeatureStore:
        """The store this view reads: every row, its own class split."""
        return self._store

    def view(
        self,
        class_split: Mapping[str, Any] | None = None,
        keep: Mapping[str, npt.ArrayLike] | None = None,
        default_splits: Sequence[str] | None = None,
        description: str | None = None,
    ) -> StoreView:
        """A view of this view (composed: see :meth:`of`)."""
        return StoreView.of(self, class_split, keep, default_splits, description)

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError(f"a StoreView is read-only (cannot set {name!r}); build another with .view(...)")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"a StoreView is read-only (cannot delete {name!r})")

    def __repr__(self) -> str:
        return (
            f"StoreView({self.where!r}, masked splits {sorted(self._keep)}, default splits "
            f"{list(self._default_splits) if self._default_splits else 'all'})"
        )

    # -- what the view changes ---------------------------------------------------------------
    @property
    def attrs(self) -> Mapping[str, Any]:
        return self._attrs

    @property
    def restricted(self) -> bool:
        """Whether some rows are hidden."""
        return bool(self._keep)

    @property
    def description(self) -> str | None:
        """What the row restriction shows a fit (None without one)."""
        return self._description

    @property
    def default_splits(self) -> list[str]:
        """The splits a read that names none uses."""
        return self._splits_or_default(None)

    def row_mask(self, split: str) -> np.ndarray | None:
        """The (n,) bool rows of ``split`` this view shows (read-only), or None when all are."""
        return self._keep.get(split)

    def class_split(self, name: str) -> list[int]:
        """Class indices of the base, val or novel class split (the view's)."""
        from fskd.errors import StoreError

        split = self._attrs["class_split"]
        if name not in split:
            raise StoreError(f"{self.where}: no class split {name!r}; has {[k for k in split if k != 'source']}")
        return list(split[name])

    def labels(self, split: str) -> np.ndarray:
        """(n,) class index per row; -1 for an unreadable row, or one this view hides."""
        lab = self._store.labels(split)
        keep = self._keep.get(split)
        return lab if keep is None else np.where(keep, lab, -1)

    def _splits_or_default(self, splits: list[str] | tuple[str, ...] | None) -> list[str]:
        return list(splits) if splits is not None else (list(self._default_splits or ()) or self._store.splits)

    def iter_chunks(self, split: str) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        keep = self._keep.get(split)
        for start, f, lab in self._store.iter_chunks(split):
            yield start, f, lab if keep is None else np.where(keep[start : start + len(lab)], lab, -1)

    def _row_blocks(self, split: str, rows: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        return self._store._row_blocks(split, rows)

    def summary(self) -> dict[str, Any]:
        """The store's summary, with the view's class split."""
        out = self._store.summary()
        split = {k: v for k, v in self._attrs["class_split"].items() if k != "source"}
        names = self.class_names
        out.update(
            class_split={k: len(v) for k, v in split.items()},
            class_split_source=self._attrs["class_split"].get("source"),
            class_names={k: [names[i] for i in v] for k, v in split.items()},
        )
        return out

    # -- delegated, read-only ----------------------------------------------------------------
    @property
    def path(self) -> Path | str:
        return self._store.path

    @property
    def location(self) -> Location:
        return self._store.location

    @property
    def where(self) -> str:
        return self._store.where

    @property
    def fingerprint(self) -> str:
        return self._store.fingerprint

    @property
    def encoder_spec(self) -> str:
        return self._store.encoder_spec

    @property
    def dim(self) -> int:
        return self._store.dim

    @property
    def chunk_rows(self) -> int:
        return self._store.chunk_rows

    @property
    def read_span(self) -> int:
        return self._store.read_span

    @property
    def splits(self) -> list[str]:
        return self._store.splits

    @property
    def joint(self) -> bool:
        return self._store.joint

    @property
    def class_names(self) -> list[str]:
        return self._store.class_names

    @property
    def class_keys(self) -> list[str]:
        return self._store.class_keys

    @property
    def num_classes(self) -> int:
        return self._store.num_classes

    @property
    def views_info(self) -> dict[str, Any] | None:
        return self._store.views_info

    def text_embeddings(self) -> np.ndarray | None:
        return self._store.text_embeddings()

    def has_split(self, split: str) -> bool:
        return self._store.has_split(split)

    def n_rows(self, split: str) -> int:
        return self._store.n_rows(split)

    def sample_ids(self, split: str) -> np.ndarray:
        return self._store.sample_ids(split)

    def written(self, split: str) -> np.ndarray:
        return self._store.written(split)

    def is_complete(self) -> bool:
        return self._store.is_complete()

    def check_complete(self) -> None:
        self._store.check_complete()

    def missing_chunks(self) -> list[str]:
        return self._store.missing_chunks()

    def skipped(self) -> dict[str, list[str]]:
        return self._store.skipped()

    def take(self, split: str, rows: np.ndarray) -> np.ndarray:
        return self._store.take(split, rows)

    def features(self, split: str, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
        return self._store.features(split, dtype)

    def take_views(self, rows: np.ndarray) -> tuple[np.ndarray | None, str]:
        return self._store.take_views(rows)

    def view_rows(self) -> np.ndarray:
        return self._store.view_rows()

    def view_labels(self) -> np.ndarray:
        return self._store.view_labels()

    def views_written(self) -> np.ndarray:
        return self._store.views_written()

    def size_on_disk(self) -> int:
        return self._store.size_on_disk()
