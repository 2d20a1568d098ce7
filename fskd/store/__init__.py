"""The Zarr feature store: layout (``schema``), reading/writing (``FeatureStore``), ``extract``."""

from fskd.store.store import FeatureStore, SplitRows
from fskd.store.view import StoreLike, StoreView, class_split_override

__all__ = ["FeatureStore", "SplitRows", "StoreLike", "StoreView", "class_split_override"]
