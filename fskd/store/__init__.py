"""The Zarr feature store: layout (``schema``), reading/writing (``FeatureStore``), ``extract``."""

from fskd.store.creation import SplitRows
from fskd.store.store import FeatureStore
from fskd.store.view import StoreLike, StoreView, class_split_override

__all__ = ["FeatureStore", "SplitRows", "StoreLike", "StoreView", "class_split_override"]
