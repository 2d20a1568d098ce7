"""Tiny copies of the CLIP few-shot benchmark datasets in their real on-disk layouts (CoOp's
DATASETS.md, the official release files, torchvision's folders), written by the tests.

``write(name, data_root, split_file=True)`` writes ``data_root/<CoOp folder>/...`` with 3
classes x 6 images (2 train / 2 val / 2 test in the published-format split file) and returns
what a correct reader must find.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PER_CLASS = 6
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
IMAGENET_NAMES = ["tench", "goldfish", "great white shark", "tiger shark"]


@dataclass
class Expected:
    folder: str  # the dataset folder under data_root
    names: list[str]  # class names as prompts use them, in label order
    sizes: dict[str, int]  # rows per sample split as listed (before fskd carves val / pools)
    template: str  # one of the dataset's default templates


def _img(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path, format="JPEG")


def _zhou(path: Path, rows: list[tuple[str, int, str]]) -> None:
    """The published format: per class, images 0-1 train, 2-3 val, 4-5 test."""
    out = {"train": [], "val": [], "test": []}
    for i, (p, lab, name) in enumerate(rows):
        out[("train", "train", "val", "val", "test", "test")[i % PER_CLASS]].append([p, lab, name])
    path.write_text(json.dumps(out))


def _classes_images(base: Path, rel_dirs: list[str], stem=lambda c, i: f"{i:04d}.jpg") -> list[list[str]]:
    out = []
    for c, d in enumerate(rel_dirs):
        files = []
        for i in range(PER_CLASS):
            rel = f"{d}/{stem(c, i)}" if d else stem(c, i)
            _img(base / rel, c * 100 + i)
            files.append(rel)
        out.append(files)
    return out


def _mat(path: Path, **arrays) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), arrays)


def write(name: str, data_root: Path, split_file: bool = True) -> Expected:
    return globals()[f"_write_{name}"](Path(data_root), split_file)


def _write_caltech101(root, split_file):
    d = root / "caltech-101"
    folders = ["accordion", "airplanes", "Faces", "BACKGROUND_Google", "Faces_easy"]
    files = _classes_images(d / "101_ObjectCategories", folders, lambda c, i: f"image_{i + 1:04d}.jpg")
    if split_file:
        names = ["accordion", "airplane", "face"]
        _zhou(d / "split_zhou_Caltech101.json", [(f, c, names[c]) for c in range(3) for f in files[c]])
        return Expected("caltech-101", names, {"train": 6, "val": 6, "test": 6}, "a photo of a {}.")
    # without the split file: the class folders in sorted order (upper case first), as CoOp's generator
    return Expected("caltech-101", ["face", "accordion", "airplane"], {"all": 18}, "a photo of a {}.")


def _write_oxford_pets(root, split_file):
    d = root / "oxford_pets"
    breeds = ["Abyssinian", "american_bulldog", "Bengal"]
    lines = {"trainval": [], "test": []}
    for c, b in enumerate(breeds):
        for i in range(PER_CLASS):
            _img(d / "images" / f"{b}_{i + 1}.jpg", c * 10 + i)
            lines["trainval" if i < 4 else "test"].append(f"{b}_{i + 1} {c + 1} {1 + c % 2} {c + 1}")
    (d / "annotations").mkdir(parents=True)
    for k, v in lines.items():
        (d / "annotations" / f"{k}.txt").write_text("\n".join(v) + "\n")
    names = ["abyssinian", "american bulldog", "bengal"]
    if split_file:
        _zhou(
            d / "split_zhou_OxfordPets.json",
            [(f"{b}_{i + 1}.jpg", c, b.lower()) for c, b in enumerate(breeds) for i in range(PER_CLASS)],
        )
        return Expected("oxford_pets", names, {"train": 6, "val": 6, "test": 6}, "a photo of a {}, a type of pet.")
    return Expected("oxford_pets", names, {"train": 12, "test": 6}, "a photo of a {}, a type of pet.")


def _cars_annos(fnames, classes):
    dt = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    a = np.zeros((1, len(fnames)), dtype=dt)
    for i, (f, c) in enumerate(zip(fnames, classes, strict=True)):
        a[0, i] = (1, 1, 10, 10, c, f)
    return a


def _write_stanford_cars(root, split_file):
    d = root / "stanford_cars"
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]
    tr, te = [], []
    for c in range(3):
        for i in range(PER_CLASS):
            n = c * PER_CLASS + i + 1
            (tr if i < 4 else te).append((f"{n:05d}.jpg", c + 1))
            _img(d / ("cars_train" if i < 4 else "cars_test") / f"{n:05d}.jpg", n)
    meta = np.empty((1, 3), dtype=object)
    meta[0, :] = names
    _mat(d / "devkit" / "cars_meta.mat", class_names=meta)
    _mat(d / "devkit" / "cars_train_annos.mat", annotations=_cars_annos(*zip(*tr, strict=True)))
    _mat(d / "cars_test_annos_withlabels.mat", annotations=_cars_annos(*zip(*te, strict=True)))
    if split_file:
        rows = [(f"cars_train/{f}", c - 1, names[c - 1]) for f, c in tr]
        rows = sorted(rows + [(f"cars_test/{f}", c - 1, names[c - 1]) for f, c in te], key=lambda r: (r[1], r[0]))
        _zhou(d / "split_zhou_StanfordCars.json", rows)
        return Expected("stanford_cars", names, {"train": 6, "val": 6, "test": 6}, "a photo of a {}.")
    return Expected("stanford_cars", names, {"train": 12, "test": 6}, "a photo of a {}.")


def _write_flowers102(root, split_file):
    # CoOp's oxford_flowers/ with a split file; torchvision's flowers-102/ (setid.mat) without one
    d = root / ("oxford_flowers" if split_file else "flowers-102")
    labels = np.repeat(np.arange(1, 4), PER_CLASS)
    for i in range(len(labels)):
        _img(d / "jpg" / f"image_{i + 1:05d}.jpg", i)
    _mat(d / "imagelabels.mat", labels=labels[None])
    names = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]
    if split_file:
        (d / "cat_to_name.json").write_text(json.dumps({str(i + 1): n for i, n in enumerate(names)}))
        _zhou(
            d / "split_zhou_OxfordFlowers.json",
            [(f"image_{i + 1:05d}.jpg", int(labels[i]) - 1, names[labels[i] - 1]) for i in range(len(labels))],
        )
        return Expected(
            "oxford_flowers", names, {"train": 6, "val": 6, "test": 6}, "a photo of a {}, a type of flower."
        )
    idx = np.arange(1, len(labels) + 1).reshape(3, PER_CLASS)
    _mat(
        d / "setid.mat",
        trnid=idx[:, :2].reshape(1, -1),
        valid=idx[:, 2:4].reshape(1, -1),
        tstid=idx[:, 4:].reshape(1, -1),
    )
    return Expected("flowers-102", names, {"train": 6, "val": 6, "test": 6}, "a photo of a {}, a type of flower.")


def _write_food101(root, split_file):
    d = root / "food-101"
    keys = ["apple_pie", "baby_back_ribs", "baklava"]
    files = _classes_images(d / "images", keys, lambda c, i: f"{1000 + i}.jpg")
    (d / "meta").mkdir(parents=True)
    (d / "meta" / "classes.txt").write_text("\n".join(keys) + "\n")
    (d / "meta" / "train.txt").write_text("\n".join(f[:-4] for fs in files for f in fs[:4]) + "\n")
    (d / "meta" / "test.txt").write_text("\n".join(f[:-4] for fs in files for f in fs[4:]) + "\n")
    names = ["apple pie", "baby back ribs", "baklava"]
    if split_file:
        _zhou(d / "split_zhou_Food101.json", [(f, c, keys[c]) for c in range(3) for f in files[c]])
        return Expected("food-101", names, {"train": 6, "val": 6, "test": 6}, "a photo of {}, a type of food.")
    return Expected("food-101", names, {"train": 12, "test": 6}, "a photo of {}, a type of food.")


def _write_fgvc_aircraft(root, split_file):
    d = root / "fgvc_aircraft"
    variants = ["707-320", "Boeing 717", "A300B4"]
    (d / "images").mkdir(parents=True)
    lines = {"train": [], "val": [], "test": []}
    for c, v in enumerate(variants):
        for i in range(PER_CLASS):
            im = f"{1000000 + c * 10 + i}"
            _img(d / "images" / f"{im}.jpg", c * 10 + i)
            lines[("train", "train", "val", "val", "test", "test")[i]].append(f"{im} {v}")
    (d / "variants.txt").write_text("\n".join(variants) + "\n")
    for s, v in lines.items():
        (d / f"images_variant_{s}.txt").write_text("\n".join(v) + "\n")
    return Expected(
        "fgvc_aircraft", variants, {"train": 6, "val": 6, "test": 6}, "a photo of a {}, a type of aircraft."
    )


def _write_sun397(root, split_file):
    d = root / "sun397"
    keys = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop"]
    files = _classes_images(d / "SUN397", [k.strip("/") for k in keys], lambda c, i: f"sun_{c}{i:03d}.jpg")
    (d / "ClassName.txt").write_text("\n".join(keys) + "\n")
    (d / "Training_01.txt").write_text("\n".join(f"/{f}" for fs in files for f in fs[:4]) + "\n")
    (d / "Testing_01.txt").write_text("\n".join(f"/{f}" for fs in files for f in fs[4:]) + "\n")
    names = ["abbey", "outdoor apartment building", "shop bakery"]
    if split_file:
        raw = ["abbey", "outdoor apartment_building", "shop bakery"]
        _zhou(d / "split_zhou_SUN397.json", [(f, c, raw[c]) for c in range(3) for f in files[c]])
        return Expected("sun397", names, {"train": 6, "val": 6, "test": 6}, "a photo of a {}.")
    return Expected("sun397", names, {"train": 12, "test": 6}, "a photo of a {}.")


def _write_dtd(root, split_file):
    # CoOp's dtd/ with a split file; torchvision's dtd/dtd/ (labels/*1.txt) without one
    d = root / "dtd" if split_file else root / "dtd" / "dtd"
    keys = ["banded", "blotchy", "braided"]
    files = _classes_images(d / "images", keys, lambda c, i: f"{keys[c]}_{i:04d}.jpg")
    (d / "labels").mkdir(parents=True)
    for s, sl in (("train", slice(0, 2)), ("val", slice(2, 4)), ("test", slice(4, 6))):
        (d / "labels" / f"{s}1.txt").write_text("\n".join(f for fs in files for f in fs[sl]) + "\n")
    if split_file:
        _zhou(d / "split_zhou_DescribableTextures.json", [(f, c, keys[c]) for c in range(3) for f in files[c]])
        return Expected("dtd", keys, {"train": 6, "val": 6, "test": 6}, "{} texture.")
    return Expected("dtd/dtd", keys, {"train": 6, "val": 6, "test": 6}, "{} texture.")


def _write_eurosat(root, split_file):
    d = root / "eurosat"
    keys = ["AnnualCrop", "Forest", "HerbaceousVegetation"]
    files = _classes_images(d / "2750", keys, lambda c, i: f"{keys[c]}_{i + 1}.jpg")
    names = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land"]
    if split_file:
        _zhou(d / "split_zhou_EuroSAT.json", [(f, c, keys[c]) for c in range(3) for f in files[c]])
        return Expected("eurosat", names, {"train": 6, "val": 6, "test": 6}, "a centered satellite photo of {}.")
    return Expected("eurosat", names, {"all": 18}, "a centered satellite photo of {}.")


def _write_ucf101(root, split_file):
    d = root / "ucf101"
    keys = ["Apply_Eye_Makeup", "Archery", "Baby_Crawling"]
    files = _classes_images(d / "UCF-101-midframes", keys, lambda c, i: f"v_{keys[c]}_g{i:02d}_c01.jpg")
    names = ["Apply Eye Makeup", "Archery", "Baby Crawling"]
    if split_file:
        _zhou(d / "split_zhou_UCF101.json", [(f, c, keys[c]) for c in range(3) for f in files[c]])
        return Expected("ucf101", names, {"train": 6, "val": 6, "test": 6}, "a photo of a person doing {}.")
    return Expected("ucf101", names, {"all": 18}, "a photo of a person doing {}.")


def _classnames(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS, IMAGENET_NAMES, strict=True)))


def _write_imagenet(root, split_file):
    d = root / "imagenet"
    for split, n in (("train", 4), ("val", 2)):
        for c, w in enumerate(WNIDS):
            for i in range(n):
                _img(d / "images" / split / w / f"{w}_{split}_{i}.JPEG", c * 10 + i)
    _classnames(d)
    return Expected("imagenet", IMAGENET_NAMES, {"train": 16, "test": 8}, "itap of a {}.")


def _shift(d: Path, image_dir: str, folders: list[str]) -> None:
    for c, f in enumerate(folders):
        for i in range(3):
            _img(d / image_dir / f / f"{i}.jpg", c * 10 + i)
    _classnames(d)


def _write_imagenet_v2(root, split_file):
    _shift(root / "imagenetv2", "imagenetv2-matched-frequency-format-val", ["0", "1", "2", "3"])
    return Expected("imagenetv2", IMAGENET_NAMES, {"test": 12}, "itap of a {}.")


def _write_imagenet_sketch(root, split_file):
    _shift(root / "imagenet-sketch", "images", WNIDS)
    return Expected("imagenet-sketch", IMAGENET_NAMES, {"test": 12}, "itap of a {}.")


def _write_imagenet_a(root, split_file):
    _shift(root / "imagenet-adversarial", "imagenet-a", [WNIDS[1], WNIDS[3]])  # a subset, as the 200 of -A
    return Expected("imagenet-adversarial", [IMAGENET_NAMES[1], IMAGENET_NAMES[3]], {"test": 6}, "itap of a {}.")


def _write_imagenet_r(root, split_file):
    _shift(root / "imagenet-rendition", "imagenet-r", [WNIDS[0], WNIDS[2]])
    return Expected("imagenet-rendition", [IMAGENET_NAMES[0], IMAGENET_NAMES[2]], {"test": 6}, "itap of a {}.")


COOP = [
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "flowers102",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
    "imagenet",
]
SHIFT = ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
WITH_SPLIT_FILE = [n for n in COOP if n not in ("fgvc_aircraft", "imagenet")]
