"""Datasets: one file per family, each registering itself in ``DATASETS``.

Modules in this package are discovered automatically, so a new dataset is one new file with
one ``@DATASETS.register(...)`` line.
"""

from __future__ import annotations

import importlib
import pkgutil

from fskd.datasets.base import DATASETS, DatasetListing, ImageDataset, SampleList

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base", "splits"):
        importlib.import_module(f"{__name__}.{_m.name}")


def build_dataset(name: str, root: str | None = None, download: bool = False) -> ImageDataset:
    """Instantiate the dataset registered as ``name`` (unknown names list the valid ones)."""
    return DATASETS.get(name)(root, download=download)


__all__ = ["DATASETS", "DatasetListing", "ImageDataset", "SampleList", "build_dataset"]
