"""``digits``: scikit-learn's bundled 8x8 handwritten digits (no network, no --root)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from fskd.datasets.base import DATASETS, DatasetListing, ImageDataset, SampleList, to_rgb

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@DATASETS.register("digits")
class DigitsDataset(ImageDataset):
    """1,797 8x8 digit images bundled with scikit-learn; digits 0-3 base, 4 val, 5-9 novel."""

    name = "digits"

    def __init__(self, root: str | None = None, download: bool = False) -> None:
        super().__init__(None, download)
        self._images: np.ndarray | None = None

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        d = load_digits()
        self._images = (d.images * (255.0 / 16.0)).astype(np.uint8)
        return self._images, d.target

    def listing(self) -> DatasetListing:
        images, target = self._load()
        keys = [str(i) for i in range(10)]
        return DatasetListing(
            name=self.name,
            root="sklearn.datasets.load_digits",
            class_keys=keys,
            class_names=[f"the digit {n}" for n in NAMES],
            splits={"all": SampleList([str(i) for i in range(len(images))], target)},
            standard_class_split={"base": keys[:4], "val": keys[4:5], "novel": keys[5:]},
            class_split_source="fskd fixed split: digits 0-3 base, 4 val, 5-9 novel",
        )

    def open(self, ref: str) -> Image.Image:
        if self._images is None:
            self._load()
        return to_rgb(Image.fromarray(self._images[int(ref)], mode="L"))

    def path_of(self, ref: str) -> str:
        return f"sklearn digits [{ref}]"
