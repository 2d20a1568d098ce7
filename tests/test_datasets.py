"""Datasets: listing, class and sample splits, and the errors users meet."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from fskd.datasets import DATASETS, build_dataset
from fskd.datasets.splits import resolve_class_split, resolve_sample_splits
from fskd.errors import DatasetError, RegistryError

TORCHVISION_BACKED = ["cifar-fs", "fc100", "fashion-mnist", "flowers102", "dtd", "eurosat"]


def _folder(root, classes=3, per_class=4, layout="flat"):
    for split in ["train", "test"] if layout == "split" else [None]:
        for c in range(classes):
            d = root / split / f"c{c}" if split else root / f"c{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (c * 40, i * 10, 0)).save(d / f"{i}.png")
    return root


def test_registry_lists_required_datasets():
    for name in [
        "folder",
        "csv",
        "cifar-fs",
        "fc100",
        "omniglot",
        "cub",
        "imagenet",
        "flowers102",
        "dtd",
        "eurosat",
        "fashion-mnist",
        "digits",
    ]:
        assert name in DATASETS
    with pytest.raises(RegistryError, match="Available: .*cub.*folder"):
        build_dataset("cubb")


def test_folder_flat_and_split_layouts(tmp_path):
    flat = build_dataset("folder", str(_folder(tmp_path / "flat"))).listing()
    assert flat.class_keys == ["c0", "c1", "c2"] and set(flat.splits) == {"all"}
    assert len(flat.splits["all"]) == 12 and flat.splits["all"].refs[0] == "c0/0.png"
    split = build_dataset("folder", str(_folder(tmp_path / "split", layout="split"))).listing()
    assert set(split.splits) == {"train", "test"} and split.splits["test"].refs[0] == "test/c0/0.png"
    np.testing.assert_array_equal(np.bincount(split.splits["train"].labels), [4, 4, 4])


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        build_dataset("folder", str(tmp_path / "nope")).listing()
    root = _folder(tmp_path / "f")
    (root / "empty_class").mkdir()
    with pytest.raises(DatasetError, match="empty_class is empty"):
        build_dataset("folder", str(root)).listing()
    with pytest.raises(DatasetError, match="needs --root"):
        build_dataset("folder", None).listing()


def test_csv_split_files(tmp_path):
    (tmp_path / "images").mkdir()
    rows = {"train": ["a", "b"], "val": ["c"], "test": ["d", "e"]}
    for split, labels in rows.items():
        lines = ["filename,label"]
        for lab in labels:
            for i in range(3):
                name = f"{lab}{i}.png"
                Image.new("RGB", (8, 8)).save(tmp_path / "images" / name)
                lines.append(f"{name},{lab}")
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    listing = build_dataset("csv", str(tmp_path)).listing()
    assert listing.standard_class_split == {"base": ["a", "b"], "val": ["c"], "novel": ["d", "e"]}
    split, source = resolve_class_split(listing)
    assert split == {"base": [0, 1], "val": [2], "novel": [3, 4]} and "split files" in source
    (tmp_path / "val.csv").write_text("file,label\nx.png,c\n")
    with pytest.raises(DatasetError, match="val.csv must start with the header 'filename,label'"):
        build_dataset("csv", str(tmp_path)).listing()


def test_class_split_file_and_ratio(tmp_path):
    listing = build_dataset("folder", str(_folder(tmp_path / "f", classes=10))).listing()
    f = tmp_path / "split.json"
    f.write_text(json.dumps({"base": ["c0", "c1"], "val": ["c2"], "novel": ["c3", "c4", "c5"]}))
    split, _ = resolve_class_split(listing, str(f))
    assert split == {"base": [0, 1], "val": [2], "novel": [3, 4, 5]}
    f.write_text(json.dumps({"base": ["c0", "zebra"], "novel": ["c3"]}))
    with pytest.raises(DatasetError, match="'zebra'"):
        resolve_class_split(listing, str(f))
    f.write_text(json.dumps({"base": ["c0"], "novel": ["c0"]}))
    with pytest.raises(DatasetError, match="'c0' is in both 'base' and 'novel'"):
        resolve_class_split(listing, str(f))
    a, _ = resolve_class_split(listing, None, (0.6, 0.2, 0.2), seed=3)
    b, _ = resolve_class_split(listing, None, (0.6, 0.2, 0.2), seed=3)
    assert a == b and [len(a[s]) for s in ("base", "val", "novel")] == [6, 2, 2]
    assert sorted(a["base"] + a["val"] + a["novel"]) == list(range(10))


def test_sample_split_rules(tmp_path):
    listing = build_dataset("folder", str(_folder(tmp_path / "f", classes=4, per_class=10))).listing()
    splits, rule = resolve_sample_splits(listing, (0.5, 0.1, 0.4), seed=0)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [20, 4, 16] and "seeded per-class" in rule
    assert not set(splits["train"].refs) & set(splits["test"].refs)
    listing = build_dataset("folder", str(_folder(tmp_path / "s", classes=3, per_class=10, layout="split"))).listing()
    splits, rule = resolve_sample_splits(listing)
    assert len(splits["val"]) == 3 and len(splits["train"]) == 27 and len(splits["test"]) == 30
    assert "val = seeded 10% of train" in rule


def test_digits_needs_no_network():
    listing = build_dataset("digits").listing()
    assert len(listing.splits["all"]) == 1797 and listing.standard_class_split["novel"] == [
        str(i) for i in range(5, 10)
    ]
    assert build_dataset("digits").open("0").size == (8, 8)


@pytest.mark.parametrize("name", TORCHVISION_BACKED)
def test_torchvision_datasets_fail_fast_offline(name, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(DatasetError, match=name):
        build_dataset(name, str(tmp_path), download=True).listing()
    assert time.perf_counter() - t0 < 10
    with pytest.raises(DatasetError, match="--root|--download"):
        build_dataset(name, str(tmp_path), download=False).listing()


def test_imagenet_cannot_download(tmp_path):
    with pytest.raises(DatasetError, match="cannot be downloaded"):
        build_dataset("imagenet", str(tmp_path), download=True).listing()


def test_cub35_uses_chen_split(cub35_root):
    listing = build_dataset("cub", str(cub35_root)).listing()
    assert len(listing.class_keys) == 35 and len(listing.splits["all"]) == 1994
    split, source = resolve_class_split(listing)
    assert [len(split[s]) for s in ("base", "val", "novel")] == [18, 9, 8] and "Chen" in source
    assert listing.class_names[0] == "Black footed Albatross"


def test_omniglot_reads_the_zip(omniglot_root):
    ds = build_dataset("omniglot", str(omniglot_root))
    listing = ds.listing()
    assert len(listing.class_keys) == 136 and len(listing.splits["all"]) == 2720
    assert ds.open(listing.splits["all"].refs[5]).size == (105, 105)
