"""The Zarr feature store: layout (``schema``), reading/writing (``FeatureStore``), ``extract``."""

from fskd.store.store import FeatureStore, SplitRows

__all__ = ["FeatureStore", "SplitRows"]
