"""``csv``: miniImageNet-style split files (``filename,label`` rows in train/val/test.csv)."""

from __future__ import annotations

import csv
import io

from PIL import Image

from fskd.datasets.base import (
    DATASETS,
    LIST_FILE_LIMIT,
    DatasetListing,
    ImageDataset,
    SampleList,
    open_rgb,
    pretty_name,
    safe_ref,
)
from fskd.errors import DatasetError
from fskd.fsutil import read_small_file

SPLIT_FILES = {"train": "base", "val": "val", "test": "novel"}


@DATASETS.register("csv")
class CsvSplitDataset(ImageDataset):
    """miniImageNet-style: root/{train,val,test}.csv (filename,label) + root/images/<filename>."""

    name = "csv"

    def listing(self) -> DatasetListing:
        root = self.require_root("a folder with train.csv, val.csv, test.csv and images/")
        present = [s for s in SPLIT_FILES if (root / f"{s}.csv").exists()]
        if not present:
            raise DatasetError(f"dataset 'csv': no train.csv, val.csv or test.csv in {root}")
        images = root / "images" if (root / "images").is_dir() else root
        rows: dict[str, list[tuple[str, str]]] = {}
        seen: dict[str, str] = {}  # normalised file -> "file line n" where first listed
        for s in present:
            path = root / f"{s}.csv"
            text = read_small_file(path, "dataset 'csv': split file", LIST_FILE_LIMIT, "CSV file", DatasetError)
            try:
                with io.StringIO(text, newline="") as f:
                    reader = csv.reader(f)
                    header = next(reader, None)
                    if header is None or [h.strip().lower() for h in header[:2]] != ["filename", "label"]:
                        raise DatasetError(
                            f"dataset 'csv': {path} must start with the header 'filename,label', got {header}"
                        )
                    rows[s] = []
                    for n, r in enumerate(reader, start=2):
                        if len(r) < 2 or not r[0] or not r[1]:
                            raise DatasetError(f"dataset 'csv': {path} line {n} is not 'filename,label': {r}")
                        where = f"dataset 'csv': {path} line {n}"
                        ref = safe_ref(images, r[0], where)
                        if ref in seen:
                            raise DatasetError(
                                f"{where}: {r[0]!r} is listed twice (first at {seen[ref]}); each image may appear once"
                            )
                        seen[ref] = f"{path.name} line {n}"
                        rows[s].append((ref, r[1]))
            except csv.Error as e:
                raise DatasetError(f"dataset 'csv': {path} is not a valid CSV file ({e})") from None
            if not rows[s]:
                raise DatasetError(f"dataset 'csv': {path} has no rows")
        keys = sorted({label for rs in rows.values() for _, label in rs})
        index = {k: i for i, k in enumerate(keys)}
        prefix = "images/" if images != root else ""
        splits = {s: SampleList([prefix + f for f, _ in rs], [index[lab] for _, lab in rs]) for s, rs in rows.items()}
        std = {SPLIT_FILES[s]: sorted({lab for _, lab in rs}) for s, rs in rows.items()}
        return DatasetListing(
            name=self.name,
            root=str(root),
            class_keys=keys,
            class_names=[pretty_name(k) for k in keys],
            splits=splits,
            standard_class_split=std,
            class_split_source="split files (train.csv=base, val.csv=val, test.csv=novel)",
        )

    def open(self, ref: str) -> Image.Image:
        return open_rgb(self.root / ref)
