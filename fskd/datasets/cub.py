"""``cub``: Caltech-UCSD Birds (CUB-200-2011 layout: root/images/<NNN.Name>/*.jpg)."""

from __future__ import annotations

from PIL import Image

from fskd.datasets.base import (
    DATASETS,
    LIST_FILE_LIMIT,
    DatasetListing,
    ImageDataset,
    SampleList,
    open_rgb,
)
from fskd.datasets.folder import folder_listing
from fskd.errors import DatasetError
from fskd.fsutil import read_small_file


def _read(path) -> str:
    return read_small_file(path, "dataset 'cub': split file", LIST_FILE_LIMIT, "text file", DatasetError)


def chen_class_split(keys: list[str]) -> dict[str, list[str]]:
    """The CUB few-shot split of Chen et al. (2019, "A Closer Look at Few-shot Classification"):
    over the sorted class folders, index i is base when i % 2 == 0, val when i % 4 == 1 and
    novel when i % 4 == 3 (100/50/50 on all 200 species)."""
    return {
        "base": [k for i, k in enumerate(keys) if i % 2 == 0],
        "val": [k for i, k in enumerate(keys) if i % 4 == 1],
        "novel": [k for i, k in enumerate(keys) if i % 4 == 3],
    }


@DATASETS.register("cub")
class CubDataset(ImageDataset):
    """CUB-200-2011 birds (or a subset in the same layout); Chen et al. base/val/novel split."""

    name = "cub"
    urls = ("https://data.caltech.edu/records/65de6-vzc19/files/CUB_200_2011.tgz",)

    def listing(self) -> DatasetListing:
        if self.download and (self.root is None or not (self.root / "images").is_dir()):
            self.check_download()
            from torchvision.datasets.utils import download_and_extract_archive

            if self.root is None:
                raise DatasetError("dataset 'cub': --download needs --root (where to put the files)")
            download_and_extract_archive(self.urls[0], str(self.root), remove_finished=True)
            if (self.root / "CUB_200_2011").is_dir():
                self.root = self.root / "CUB_200_2011"
        root = self.require_root("the CUB_200_2011 folder (with images/<NNN.Species>/), or use --download")
        images = root / "images"
        if not images.is_dir():
            raise DatasetError(f"dataset 'cub': {images} does not exist; --root must hold images/<NNN.Species>/")
        listing = folder_listing(self, images)
        # refs relative to root (images/...) so the official split files can be matched
        for rows in listing.splits.values():
            rows.refs = [f"images/{r}" for r in rows.refs]
        listing.root = str(root)
        listing.standard_class_split = chen_class_split(listing.class_keys)
        listing.class_split_source = "Chen et al. 2019 (i%2==0 base, i%4==1 val, i%4==3 novel)"
        official = self._official_split(root, listing)
        if official:
            listing.splits = official
        return listing

    @staticmethod
    def _official_split(root, listing: DatasetListing) -> dict[str, SampleList] | None:
        """train/test from images.txt + train_test_split.txt when both exist."""
        names, flags = root / "images.txt", root / "train_test_split.txt"
        if not (names.exists() and flags.exists()):
            return None
        id_to_ref = dict(line.split(maxsplit=1) for line in _read(names).splitlines() if line.strip())
        is_train = dict(line.split() for line in _read(flags).splitlines() if line.strip())
        ref_train = {f"images/{id_to_ref[i].strip()}": is_train[i] == "1" for i in id_to_ref}
        rows = listing.splits["all"]
        out = {}
        for name, want in (("train", True), ("test", False)):
            keep = [j for j, r in enumerate(rows.refs) if ref_train.get(r, False) == want]
            out[name] = SampleList([rows.refs[j] for j in keep], rows.labels[keep])
        return out

    def open(self, ref: str) -> Image.Image:
        return open_rgb(self.root / ref)
