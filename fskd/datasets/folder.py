"""``folder``: one sub-folder per class, optionally under train/ val/ test/ (ImageNet style)."""

from __future__ import annotations

from PIL import Image

from fskd.datasets.base import (
    DATASETS,
    DatasetListing,
    ImageDataset,
    SampleList,
    list_class_folders,
    open_rgb,
    pretty_name,
    report_ignored,
)
from fskd.errors import DatasetError

SPLIT_DIRS = ("train", "val", "test")


def folder_listing(dataset: ImageDataset, root, names: dict[str, str] | None = None) -> DatasetListing:
    """List ``root/<class>/*`` or ``root/{train,val,test}/<class>/*``; refs are relative to root."""
    subdirs = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    ignored: dict[str, list[str]] = {}
    if "train" in subdirs and subdirs <= set(SPLIT_DIRS):
        per_split = {s: list_class_folders(root / s, dataset.name, ignored) for s in SPLIT_DIRS if s in subdirs}
        keys = sorted({c for classes, _ in per_split.values() for c in classes})
    else:
        per_split = {"all": list_class_folders(root, dataset.name, ignored)}
        keys = per_split["all"][0]
    index = {k: i for i, k in enumerate(keys)}
    splits = {}
    for s, (classes, files) in per_split.items():
        prefix = "" if s == "all" else f"{s}/"
        refs = [prefix + f for fs in files for f in fs]
        labels = [index[c] for c, fs in zip(classes, files, strict=True) for _ in fs]
        splits[s] = SampleList(refs, labels)
    names = names or {}
    listing = DatasetListing(
        name=dataset.name,
        root=str(root),
        class_keys=keys,
        class_names=[names.get(k, pretty_name(k)) for k in keys],
        splits=splits,
    )
    report_ignored(listing, ignored)
    return listing


@DATASETS.register("folder")
class FolderDataset(ImageDataset):
    """One sub-folder per class (root/<class>/*.jpg), or root/train|val|test/<class>/*.jpg."""

    name = "folder"

    def listing(self) -> DatasetListing:
        root = self.require_root("a folder with one sub-folder of images per class")
        if self.download:
            raise DatasetError("dataset 'folder' cannot be downloaded; pass --root to a local folder")
        return folder_listing(self, root)

    def open(self, ref: str) -> Image.Image:
        return open_rgb(self.root / ref)
