"""The CLIP few-shot benchmark datasets read from tiny copies in their real on-disk layouts."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

from fskd import api
from fskd.config import ExtractConfig
from fskd.datasets import build_dataset
from fskd.datasets.splits import resolve_class_split, resolve_sample_splits
from fskd.errors import DatasetError
from fskd.store import FeatureStore
from tests import coop_layouts as L


@pytest.mark.parametrize("name", L.COOP + L.SHIFT)
def test_reads_the_published_layout(name, tmp_path):
    exp = L.write(name, tmp_path)
    for root in (tmp_path, tmp_path / exp.folder):  # $DATA or the dataset's own folder
        listing = build_dataset(name, str(root)).listing()
        assert listing.class_names == exp.names
        assert {s: len(r) for s, r in listing.splits.items()} == exp.sizes
        assert exp.template in listing.templates
        assert listing.root == str(tmp_path / exp.folder)
        for rows in listing.splits.values():
            np.testing.assert_array_equal(np.bincount(rows.labels, minlength=len(exp.names)) > 0, True)
    ds = build_dataset(name, str(tmp_path))
    assert ds.open(listing.splits[sorted(listing.splits)[0]].refs[0]).mode == "RGB"
    if name in L.WITH_SPLIT_FILE:
        assert "split_zhou" in listing.sample_split_source and "published" in listing.sample_split_source
    if name in L.SHIFT:
        assert all(k.startswith("n") for k in listing.class_keys)  # wnids: mapped to ImageNet's classes
    else:
        split, source = resolve_class_split(listing)
        n_base = (len(exp.names) + 1) // 2
        assert split["base"] == list(range(n_base)) and "base-to-new" in source


@pytest.mark.parametrize("name", L.WITH_SPLIT_FILE)
def test_without_the_split_file_the_own_split_is_used_and_recorded(name, tmp_path):
    exp = L.write(name, tmp_path, split_file=False)
    listing = build_dataset(name, str(tmp_path)).listing()
    assert listing.class_names == exp.names
    assert {s: len(r) for s, r in listing.splits.items()} == exp.sizes
    splits, rule = resolve_sample_splits(listing)
    assert set(splits) == {"train", "val", "test"} and all(len(r) for r in splits.values())
    assert "split_zhou" not in rule or "no split_zhou" in rule
    if set(exp.sizes) == {"all"}:
        assert "(0.5, 0.2, 0.3)" in rule  # CoOp's own 50/20/30 generator


@pytest.mark.parametrize("name", L.COOP + L.SHIFT)
def test_extracted_store_records_split_templates_and_names(name, tmp_path):
    exp = L.write(name, tmp_path)
    store = tmp_path / "s.zarr"
    api.extract(
        ExtractConfig(dataset=name, root=str(tmp_path), encoder="synthetic:16", store=str(store), workers=0),
        progress=None,
    )
    s = FeatureStore.open(str(store))
    info = s.summary()
    assert s.class_names == exp.names and info["complete"] and not info["skipped"]
    assert sum(info["rows"].values()) == sum(exp.sizes.values())  # every listed image encoded once
    assert exp.template in info["templates"] and "CoOp" in info["templates_source"]
    assert s.text_embeddings().shape == (len(exp.names), 16)
    if name in L.WITH_SPLIT_FILE:
        assert "split_zhou" in info["sample_split"]
    if name != "oxford_pets":
        return
    # --templates still overrides the dataset's text
    t = tmp_path / "t.txt"
    t.write_text("a drawing of a {}.\n")
    api.extract(
        ExtractConfig(
            dataset=name,
            root=str(tmp_path),
            encoder="synthetic:16",
            store=str(tmp_path / "t.zarr"),
            workers=0,
            templates=str(t),
        ),
        progress=None,
    )
    info = FeatureStore.open(str(tmp_path / "t.zarr")).summary()
    assert info["templates"] == ["a drawing of a {}."] and info["templates_source"].startswith("--templates")


@pytest.mark.parametrize("name", L.COOP + L.SHIFT)
def test_wrong_root_names_the_layout(name, tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(DatasetError, match="expected layout") as e:
        build_dataset(name, str(tmp_path)).listing()
    assert str(tmp_path) in str(e.value)


def test_partial_layouts_name_the_missing_file(tmp_path):
    L.write("oxford_pets", tmp_path / "a")
    (tmp_path / "a" / "oxford_pets" / "images" / "Bengal_2.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 of 18 listed images are missing.*Bengal_2\.jpg"):
        build_dataset("oxford_pets", str(tmp_path / "a")).listing()
    L.write("food101", tmp_path / "b", split_file=False)
    (tmp_path / "b" / "food-101" / "meta" / "test.txt").unlink()
    with pytest.raises(DatasetError, match=r"meta/test\.txt is missing; expected layout: food-101/"):
        build_dataset("food101", str(tmp_path / "b")).listing()
    L.write("imagenet_v2", tmp_path / "c")
    (tmp_path / "c" / "imagenetv2" / "classnames.txt").unlink()
    with pytest.raises(DatasetError, match="classnames.txt is missing"):
        build_dataset("imagenet_v2", str(tmp_path / "c")).listing()
    L.write("fgvc_aircraft", tmp_path / "d")
    with open(tmp_path / "d" / "fgvc_aircraft" / "images_variant_val.txt", "a") as f:
        f.write("1234567 Concorde\n")
    with pytest.raises(DatasetError, match="variant 'Concorde' is not in variants.txt"):
        build_dataset("fgvc_aircraft", str(tmp_path / "d")).listing()


def test_bad_split_files_are_named(tmp_path):
    L.write("dtd", tmp_path)
    f = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    good = json.loads(f.read_text())
    for bad, msg in [
        ({"train": []}, "keys train, val, test"),
        ({**good, "val": [["banded/banded_0002.jpg", "0", "banded"]]}, r"val\[0\] is"),
        ({**good, "val": [["banded/banded_0002.jpg", 0, "striped"]]}, "named both"),
        ({**good, "test": [["../../etc/passwd", 0, "banded"]]}, "outside the dataset root"),
    ]:
        f.write_text(json.dumps(bad))
        with pytest.raises(DatasetError, match=msg):
            build_dataset("dtd", str(tmp_path)).listing()
    f.write_text("{not json")
    with pytest.raises(DatasetError, match="split_zhou_DescribableTextures.json"):
        build_dataset("dtd", str(tmp_path)).listing()


@pytest.mark.parametrize("name", ["flowers102", "dtd", "eurosat", "food101", "fgvc_aircraft", "oxford_pets"])
def test_download_fails_fast_offline(name, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(DatasetError, match=name):
        build_dataset(name, str(tmp_path), download=True).listing()
    assert time.perf_counter() - t0 < 10


def test_cannot_download_names_the_reason(tmp_path):
    for name in ("imagenet", "ucf101", "imagenet_r"):
        with pytest.raises(DatasetError, match="cannot be downloaded"):
            build_dataset(name, str(tmp_path), download=True).listing()


def test_imagenet_reads_torchvision_layout_too(tmp_path):
    L.write("imagenet", tmp_path)
    d = tmp_path / "imagenet"
    shutil.move(d / "images" / "train", d / "train")
    shutil.move(d / "images" / "val", d / "val")
    listing = build_dataset("imagenet", str(d)).listing()
    assert listing.class_names == L.IMAGENET_NAMES and listing.splits["test"].refs[0].startswith("val/")
