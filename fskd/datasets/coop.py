"""The CLIP few-shot benchmark datasets: the 11 CoOp datasets and the ImageNet shift sets.

Each entry reads the layout that CoOp's ``DATASETS.md`` documents under ``--root`` (the
dataset's own folder, e.g. ``$DATA/oxford_pets``, or ``$DATA`` itself: the dataset folder is
found by name). When the published ``split_zhou_*.json`` file is there, it defines the
train/val/test rows and the class names (``{"train"|"val"|"test": [[path, label, classname],
...]}``, paths relative to the image folder); otherwise the dataset's own split files are read
(official partitions where they exist, else a seeded per-class split with CoOp's 50/20/30
ratios), and the store records which one was used. FGVC-Aircraft always uses its official
variant files. torchvision's on-disk layouts are read too (``--download`` fetches through
torchvision where it can).

The per-dataset prompt templates of the CoOp / Tip-Adapter line are the default text of these
datasets (``--templates`` overrides them). Class names are cleaned the way CoOp cleans them
(``_`` -> space, Caltech's plurals, EuroSAT's land-use names, SUN397's reversed paths, UCF's
CamelCase). The class split is CoCoOp's base-to-new halves in label order.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from fskd.datasets.base import (
    DATASETS,
    IMAGE_EXTENSIONS,
    LIST_FILE_LIMIT,
    DatasetListing,
    ImageDataset,
    SampleList,
    list_class_folders,
    open_rgb,
    report_ignored,
    safe_ref,
)
from fskd.errors import ConfigError, DatasetError
from fskd.fsutil import parse_json_file, read_small_file

#: CLIP's ImageNet prompt ensemble as Tip-Adapter uses it (7 templates)
IMAGENET_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
#: CoOp's split generator for datasets without an official split: 50% train, 20% val, 30% test
COOP_POOL_RATIOS = (0.5, 0.2, 0.3)
SPLITS = ("train", "val", "test")
#: CoOp's split_trainval: val = 20% of an official train(val) split without a val part
COOP_VAL_FROM_TRAIN = 0.2


def half_split(keys: list[str]) -> dict[str, list[str]]:
    """CoCoOp base-to-new convention: the first ceil(n/2) classes in label order are base, the
    rest new (``novel``); no val classes."""
    n = (len(keys) + 1) // 2
    return {"base": keys[:n], "val": [], "novel": keys[n:]}


def clean_name(name: str) -> str:
    """``apple_pie`` -> ``apple pie`` (CoOp replaces underscores before filling a template)."""
    return name.replace("_", " ").strip()


def read_zhou_split(path: Path, image_dir: str, where_root: Path) -> tuple[dict[str, SampleList], list[str]]:
    """Rows and class names (by label) of a ``split_zhou_*.json`` file; refs are ``image_dir/path``.

    Raises DatasetError naming the file and the first bad entry: wrong structure, a label with
    two class names, labels that do not cover 0..C-1, or paths outside the root."""
    try:
        data = parse_json_file(path, "split file", LIST_FILE_LIMIT)
    except ConfigError as e:
        raise DatasetError(str(e)) from None
    if not isinstance(data, dict) or not set(SPLITS) <= set(data):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DatasetError(
            f"{path}: a CoOp split file is a JSON object with keys train, val, test (lists of "
            f"[relative_path, label, classname]); got {got}"
        )
    names: dict[int, str] = {}
    splits = {}
    for s in SPLITS:
        rows = data[s]
        if not isinstance(rows, list):
            raise DatasetError(f"{path}: {s!r} must be a list of [relative_path, label, classname]")
        refs, labels = [], []
        for i, row in enumerate(rows):
            ok = (
                isinstance(row, list)
                and len(row) == 3
                and isinstance(row[0], str)
                and isinstance(row[2], str)
                and isinstance(row[1], int)
                and not isinstance(row[1], bool)
                and row[1] >= 0
            )
            if not ok:
                raise DatasetError(
                    f"{path}: {s}[{i}] is {str(row)[:120]}, expected [relative_path, label >= 0, classname]"
                )
            lab = row[1]
            if names.setdefault(lab, row[2]) != row[2]:
                raise DatasetError(f"{path}: label {lab} is named both {names[lab]!r} and {row[2]!r} ({s}[{i}])")
            refs.append(safe_ref(where_root, f"{image_dir}/{row[0]}" if image_dir else row[0], f"{path} {s}[{i}]"))
            labels.append(lab)
        splits[s] = SampleList(refs, np.asarray(labels, dtype=np.int32))
    if not names:
        raise DatasetError(f"{path}: the split file lists no images")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        raise DatasetError(f"{path}: labels must be 0..{max(names)} with no gap; no row has label(s) {missing[:10]}")
    return splits, [names[i] for i in range(len(names))]


def check_files(root: Path, splits: dict[str, SampleList], what: str) -> None:
    """Every listed image exists; else a DatasetError with the count and the first missing paths."""
    missing = [r for sl in splits.values() for r in sl.refs if not os.path.exists(root / r)]
    if missing:
        total = sum(len(sl) for sl in splits.values())
        raise DatasetError(
            f"{what}: {len(missing)} of {total} listed images are missing under {root}, e.g. "
            f"{', '.join(missing[:3])}; the images are not the ones the split file was made for"
        )


def read_lines(path: Path, layout: str) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path} is missing; expected layout: {layout}")
    text = read_small_file(path, "list file", LIST_FILE_LIMIT, "text file", DatasetError, errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_mat(path: Path, layout: str) -> dict:
    """A MATLAB .mat file (Stanford Cars, Flowers-102 labels) via scipy."""
    if not path.is_file():
        raise DatasetError(f"{path} is missing; expected layout: {layout}")
    from scipy.io import loadmat

    try:
        return loadmat(str(path), squeeze_me=True)
    except Exception as e:  # scipy raises several types for a damaged file
        raise DatasetError(f"{path}: not a readable .mat file ({type(e).__name__}: {e})") from None


class CoopDataset(ImageDataset):
    """Shared reading of one CoOp benchmark dataset; a subclass names its files and own split."""

    #: candidate dataset folders under --root, CoOp's name first; "" is --root itself
    folders: tuple[str, ...] = ("",)
    #: a path inside the dataset folder that identifies it (the image folder)
    marker: str = "images"
    #: the folder split-file paths are relative to (inside the dataset folder)
    image_dir: str = "images"
    split_file: str | None = None
    dataset_templates: tuple[str, ...] = ("a photo of a {}.",)
    renames: dict[str, str] = {}
    layout: str = ""
    #: (torchvision class name, kwargs) used by --download; None: no download
    tv_download: tuple[str, dict] | None = None

    def __init__(self, root: str | None, download: bool = False) -> None:
        super().__init__(root, download)
        self.given_root = self.root
        found = self._find() if self.root is not None else None
        if found is not None:
            self.root = found

    def _find(self) -> Path | None:
        base = self.given_root
        for sub in self.folders:
            d = base / sub if sub else base
            if (d / self.marker).exists():
                return d
        return None

    def _dataset_dir(self) -> Path:
        if self.given_root is None:
            raise DatasetError(f"dataset {self.name!r} needs --root: {self.layout}")
        if self.download and self._find() is None:
            self._download()
        found = self._find()
        if found is None:
            self.require_root(self.layout)
            tried = ", ".join(
                str(self.given_root / s / self.marker if s else self.given_root / self.marker) for s in self.folders
            )
            raise DatasetError(
                f"dataset {self.name!r}: no {self.marker} under --root {self.given_root} (looked for "
                f"{tried}); expected layout: {self.layout}"
                + ("" if self.tv_download is None else "; or add --download")
            )
        self.root = found
        return found

    def _download(self) -> None:
        if self.tv_download is None:
            raise DatasetError(f"dataset {self.name!r} cannot be downloaded automatically; pass --root ({self.layout})")
        self.check_download()
        import torchvision.datasets as tvd

        cls, kwargs = self.tv_download
        try:
            getattr(tvd, cls)(str(self.given_root), download=True, **kwargs)
        except (RuntimeError, OSError) as e:
            raise DatasetError(
                f"dataset {self.name!r}: torchvision's download into {self.given_root} failed ({e})"
            ) from None

    def listing(self) -> DatasetListing:
        d = self._dataset_dir()
        split = d / self.split_file if self.split_file else None
        if split is not None and split.is_file():
            splits, names = read_zhou_split(split, self.image_dir, d)
            keys = list(names)
            source = f"{self.split_file} (CoOp's published split)"
            ratios = None
            check_files(d, splits, str(split))
        else:
            self._ignored: dict[str, list[str]] = {}
            keys, names, splits, source = self.own_split(d)
            ratios = COOP_POOL_RATIOS if set(splits) == {"all"} else None
            if split is not None:
                source += f"; no {self.split_file} under {d}"
        listing = DatasetListing(
            name=self.name,
            root=str(d),
            class_keys=keys,
            class_names=[self.display(n) for n in names],
            splits=splits,
            standard_class_split=half_split(keys),
            class_split_source="CoCoOp base-to-new halves (label order)",
            templates=self.dataset_templates,
            sample_split_source=source,
            pool_ratios=ratios,
            val_from_train=COOP_VAL_FROM_TRAIN,
        )
        report_ignored(listing, self._ignored if split is None or not split.is_file() else {})
        return listing

    def display(self, name: str) -> str:
        """The class name used in prompts."""
        return self.renames.get(name, clean_name(name))

    def own_split(self, d: Path) -> tuple[list[str], list[str], dict[str, SampleList], str]:
        """(class keys, raw class names, splits, source) without a split file: default = one
        seeded pool of the class folders under ``image_dir``."""
        ignored: dict[str, list[str]] = {}
        classes, files = list_class_folders(d / self.image_dir, self.name, ignored)
        keep = [i for i, c in enumerate(classes) if c not in self.excluded]
        refs = [f"{self.image_dir}/{f}" for i in keep for f in files[i]]
        labels = [j for j, i in enumerate(keep) for _ in files[i]]
        keys = [classes[i] for i in keep]
        self._ignored = ignored
        return keys, keys, {"all": SampleList(refs, labels)}, "seeded per-class split of the class folders"

    excluded: tuple[str, ...] = ()

    def open(self, ref: str) -> Image.Image:
        return open_rgb(self.root / ref)


def _rows(pairs: list[tuple[str, int]]) -> SampleList:
    return SampleList([p for p, _ in pairs], np.asarray([lab for _, lab in pairs], dtype=np.int32))


@DATASETS.register("caltech101")
class Caltech101(CoopDataset):
    """Caltech-101 (CoOp: 100 classes, BACKGROUND_Google and Faces_easy left out; split_zhou_Caltech101.json)."""

    name = "caltech101"
    folders = ("", "caltech-101", "caltech101")
    marker = image_dir = "101_ObjectCategories"
    split_file = "split_zhou_Caltech101.json"
    excluded = ("BACKGROUND_Google", "Faces_easy")
    renames = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
    layout = "caltech-101/ with 101_ObjectCategories/<class>/*.jpg and split_zhou_Caltech101.json"
    urls = ("https://drive.google.com/file/d/137RyRjvTBkBiIfeYBNZBtViDHQ6_Ewsp",)
    tv_download = ("Caltech101", {"target_type": "category"})


@DATASETS.register("oxford_pets")
class OxfordPets(CoopDataset):
    """Oxford-IIIT Pets, 37 breeds (split_zhou_OxfordPets.json, else annotations/trainval.txt + test.txt)."""

    name = "oxford_pets"
    folders = ("", "oxford_pets", "oxford-iiit-pet")
    split_file = "split_zhou_OxfordPets.json"
    dataset_templates = ("a photo of a {}, a type of pet.",)
    layout = "oxford_pets/ with images/*.jpg, annotations/{trainval,test}.txt and split_zhou_OxfordPets.json"
    urls = ("https://thor.robots.ox.ac.uk/pets/images.tar.gz",)
    tv_download = ("OxfordIIITPet", {})

    def own_split(self, d):
        parts, names = {}, {}
        for s, f in (("train", "trainval.txt"), ("test", "test.txt")):
            pairs = []
            for line in read_lines(d / "annotations" / f, self.layout):
                if line.startswith("#"):
                    continue
                im, lab = line.split()[:2]
                breed = "_".join(im.split("_")[:-1]).lower()
                names[int(lab) - 1] = breed
                pairs.append((f"images/{im}.jpg", int(lab) - 1))
            parts[s] = _rows(pairs)
        keys = [names[i] for i in range(len(names))]
        return keys, keys, parts, "annotations/trainval.txt and test.txt (official)"


@DATASETS.register("stanford_cars")
class StanfordCars(CoopDataset):
    """Stanford Cars, 196 models (split_zhou_StanfordCars.json, else the devkit's train/test annotations)."""

    name = "stanford_cars"
    folders = ("", "stanford_cars")
    marker = "cars_train"
    image_dir = ""
    split_file = "split_zhou_StanfordCars.json"
    layout = (
        "stanford_cars/ with cars_train/, cars_test/, devkit/{cars_meta,cars_train_annos}.mat, "
        "cars_test_annos_withlabels.mat and split_zhou_StanfordCars.json"
    )
    urls = ("https://ai.stanford.edu/~jkrause/car196/cars_train.tgz",)

    def own_split(self, d):
        meta = load_mat(d / "devkit" / "cars_meta.mat", self.layout)
        names = [str(n) for n in np.atleast_1d(meta["class_names"]).tolist()]
        parts = {}
        for s, mat, folder in (
            ("train", d / "devkit" / "cars_train_annos.mat", "cars_train"),
            ("test", d / "cars_test_annos_withlabels.mat", "cars_test"),
        ):
            ann = np.atleast_1d(load_mat(mat, self.layout)["annotations"])
            try:
                pairs = [(f"{folder}/{a['fname']}", int(a["class"]) - 1) for a in ann]
            except (ValueError, IndexError, KeyError) as e:
                raise DatasetError(f"{mat}: annotations lack fname/class fields ({e})") from None
            parts[s] = _rows(pairs)
        return names, names, parts, "devkit train annotations and cars_test_annos_withlabels.mat (official)"


@DATASETS.register("flowers102")
class Flowers102(CoopDataset):
    """Oxford Flowers-102 (split_zhou_OxfordFlowers.json, else setid.mat; CoOp's or torchvision's layout)."""

    name = "flowers102"
    folders = ("", "oxford_flowers", "flowers-102")
    marker = image_dir = "jpg"
    split_file = "split_zhou_OxfordFlowers.json"
    dataset_templates = ("a photo of a {}, a type of flower.",)
    layout = (
        "oxford_flowers/ with jpg/, imagelabels.mat, cat_to_name.json and split_zhou_OxfordFlowers.json "
        "(or torchvision's flowers-102/ with jpg/, imagelabels.mat, setid.mat)"
    )
    urls = ("https://thor.robots.ox.ac.uk/flowers/102/102flowers.tgz",)
    tv_download = ("Flowers102", {})

    def own_split(self, d):
        labels = np.atleast_1d(load_mat(d / "imagelabels.mat", self.layout)["labels"]).astype(np.int64) - 1
        names_file = d / "cat_to_name.json"
        if names_file.is_file():
            try:
                raw = parse_json_file(names_file, "cat_to_name.json")
            except ConfigError as e:
                raise DatasetError(str(e)) from None
            names = [raw.get(str(i + 1), str(i + 1)) for i in range(int(labels.max()) + 1)]
        else:
            from torchvision.datasets import Flowers102 as TvFlowers

            names = list(TvFlowers.classes)[: int(labels.max()) + 1]
        refs = [f"jpg/image_{i + 1:05d}.jpg" for i in range(len(labels))]
        if (d / "setid.mat").is_file():
            ids = load_mat(d / "setid.mat", self.layout)
            parts = {
                s: np.atleast_1d(ids[k]).astype(np.int64) - 1
                for s, k in (("train", "trnid"), ("val", "valid"), ("test", "tstid"))
            }
            splits = {s: SampleList([refs[i] for i in idx], labels[idx]) for s, idx in parts.items()}
            src = "setid.mat (official)"
        else:
            splits, src = {"all": SampleList(refs, labels)}, "seeded per-class split (no setid.mat)"
        keys = [f"{i + 1:03d}" for i in range(len(names))]
        self.renames = dict(zip(keys, [clean_name(n) for n in names], strict=True))
        return keys, keys, splits, src


@DATASETS.register("food101")
class Food101(CoopDataset):
    """Food-101 (split_zhou_Food101.json, else meta/train.txt + test.txt)."""

    name = "food101"
    folders = ("", "food-101")
    split_file = "split_zhou_Food101.json"
    dataset_templates = ("a photo of {}, a type of food.",)
    layout = "food-101/ with images/<class>/*.jpg, meta/{classes,train,test}.txt and split_zhou_Food101.json"
    urls = ("https://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",)
    tv_download = ("Food101", {})

    def own_split(self, d):
        keys = read_lines(d / "meta" / "classes.txt", self.layout)
        index = {k: i for i, k in enumerate(keys)}
        parts = {}
        for s in ("train", "test"):
            pairs = []
            for line in read_lines(d / "meta" / f"{s}.txt", self.layout):
                c = line.split("/")[0]
                if c not in index:
                    raise DatasetError(f"{d / 'meta' / f'{s}.txt'}: class {c!r} is not in meta/classes.txt")
                pairs.append((f"images/{line}.jpg", index[c]))
            parts[s] = _rows(pairs)
        return keys, keys, parts, "meta/train.txt and test.txt (official)"


@DATASETS.register("fgvc_aircraft")
class FgvcAircraft(CoopDataset):
    """FGVC-Aircraft, 100 variants (the official images_variant_{train,val,test}.txt files, as CoOp)."""

    name = "fgvc_aircraft"
    folders = ("", "fgvc_aircraft", "fgvc-aircraft-2013b/data")
    marker = "variants.txt"
    dataset_templates = ("a photo of a {}, a type of aircraft.",)
    layout = "fgvc_aircraft/ (the release's data/ folder) with images/*.jpg, variants.txt, images_variant_{train,val,test}.txt"
    urls = ("https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",)
    tv_download = ("FGVCAircraft", {})

    def own_split(self, d):
        keys = read_lines(d / "variants.txt", self.layout)
        index = {k: i for i, k in enumerate(keys)}
        parts = {}
        for s in SPLITS:
            f = d / f"images_variant_{s}.txt"
            pairs = []
            for line in read_lines(f, self.layout):
                im, _, variant = line.partition(" ")
                if variant not in index:
                    raise DatasetError(f"{f}: variant {variant!r} is not in variants.txt")
                pairs.append((f"images/{im}.jpg", index[variant]))
            parts[s] = _rows(pairs)
        return keys, keys, parts, "images_variant_{train,val,test}.txt (official)"


def sun_name(key: str) -> str:
    """``/b/bakery/shop`` -> ``shop bakery`` (CoOp reverses the path parts below the letter)."""
    return " ".join(reversed(key.strip("/").split("/")[1:]))


@DATASETS.register("sun397")
class Sun397(CoopDataset):
    """SUN397 scenes (split_zhou_SUN397.json, else partition 01 of Training_01.txt / Testing_01.txt)."""

    name = "sun397"
    folders = ("", "sun397")
    marker = image_dir = "SUN397"
    split_file = "split_zhou_SUN397.json"
    layout = "sun397/ with SUN397/<letter>/<class>/*.jpg, ClassName.txt, Training_01.txt, Testing_01.txt and split_zhou_SUN397.json"
    urls = ("https://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",)
    tv_download = ("SUN397", {})

    def own_split(self, d):
        cn = d / "ClassName.txt" if (d / "ClassName.txt").is_file() else d / "SUN397" / "ClassName.txt"
        keys = read_lines(cn, self.layout)
        index = {k: i for i, k in enumerate(keys)}
        names = [sun_name(k) for k in keys]
        if (d / "Training_01.txt").is_file():
            parts = {}
            for s, f in (("train", "Training_01.txt"), ("test", "Testing_01.txt")):
                pairs = []
                for line in read_lines(d / f, self.layout):
                    c = "/".join(line.split("/")[:-1])
                    if c not in index:
                        raise DatasetError(f"{d / f}: class {c!r} of {line!r} is not in {cn.name}")
                    pairs.append((f"SUN397{line}", index[c]))
                parts[s] = _rows(pairs)
            return keys, names, parts, "Training_01.txt and Testing_01.txt (official partition 1)"
        pairs = []
        for k in keys:
            folder = d / "SUN397" / k.strip("/")
            pairs += [
                (f"SUN397/{k.strip('/')}/{p.name}", index[k])
                for p in sorted(folder.glob("*"))
                if p.suffix.lower() in IMAGE_EXTENSIONS
            ]
        return keys, names, {"all": _rows(pairs)}, "seeded per-class split (no Training_01.txt)"

    def display(self, name: str) -> str:
        return clean_name(name)


@DATASETS.register("dtd")
class Dtd(CoopDataset):
    """Describable Textures, 47 classes (split_zhou_DescribableTextures.json, else labels/*1.txt; CoOp's or torchvision's layout)."""

    name = "dtd"
    folders = ("", "dtd", "dtd/dtd")
    marker = "labels"
    split_file = "split_zhou_DescribableTextures.json"
    dataset_templates = ("{} texture.",)
    layout = (
        "dtd/ with images/<class>/*.jpg, labels/{train,val,test}1.txt and split_zhou_DescribableTextures.json "
        "(or torchvision's dtd/dtd/)"
    )
    urls = ("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",)
    tv_download = ("DTD", {})

    def own_split(self, d):
        keys = sorted(p.name for p in (d / "images").iterdir() if p.is_dir()) if (d / "images").is_dir() else []
        if not keys:
            raise DatasetError(f"dataset 'dtd': {d / 'images'} has no class folders; expected layout: {self.layout}")
        index = {k: i for i, k in enumerate(keys)}
        parts = {}
        for s in SPLITS:
            pairs = []
            for line in read_lines(d / "labels" / f"{s}1.txt", self.layout):
                pairs.append((f"images/{line}", index[line.split("/")[0]]))
            parts[s] = _rows(pairs)
        return keys, keys, parts, "labels/{train,val,test}1.txt (official partition 1)"


@DATASETS.register("eurosat")
class EuroSat(CoopDataset):
    """EuroSAT RGB land use, 10 classes (split_zhou_EuroSAT.json, else a seeded split; CoOp's or torchvision's layout)."""

    name = "eurosat"
    folders = ("", "eurosat")
    marker = image_dir = "2750"
    split_file = "split_zhou_EuroSAT.json"
    dataset_templates = ("a centered satellite photo of {}.",)
    renames = {
        "AnnualCrop": "Annual Crop Land",
        "Forest": "Forest",
        "HerbaceousVegetation": "Herbaceous Vegetation Land",
        "Highway": "Highway or Road",
        "Industrial": "Industrial Buildings",
        "Pasture": "Pasture Land",
        "PermanentCrop": "Permanent Crop Land",
        "Residential": "Residential Buildings",
        "River": "River",
        "SeaLake": "Sea or Lake",
    }
    layout = "eurosat/ with 2750/<class>/*.jpg and split_zhou_EuroSAT.json"
    urls = (
        "https://huggingface.co/datasets/torchgeo/eurosat/resolve/c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip",
    )
    tv_download = ("EuroSAT", {})


def ucf_name(name: str) -> str:
    """``ApplyEyeMakeup`` or ``Apply_Eye_Makeup`` -> ``Apply Eye Makeup``."""
    if "_" not in name:
        name = "_".join(re.findall(r"[A-Z][^A-Z]*", name)) or name
    return clean_name(name)


@DATASETS.register("ucf101")
class Ucf101(CoopDataset):
    """UCF101 actions from the middle video frames (split_zhou_UCF101.json, else a seeded split)."""

    name = "ucf101"
    folders = ("", "ucf101")
    marker = image_dir = "UCF-101-midframes"
    split_file = "split_zhou_UCF101.json"
    dataset_templates = ("a photo of a person doing {}.",)
    layout = "ucf101/ with UCF-101-midframes/<class>/*.jpg and split_zhou_UCF101.json"

    def display(self, name: str) -> str:
        return ucf_name(name)


# -- ImageNet and its shift sets --------------------------------------------------------------
def read_classnames(path: Path, layout: str) -> dict[str, str]:
    """CoOp's ``classnames.txt``: ``<wnid> <class name>`` per line, in label order."""
    out = {}
    for i, line in enumerate(read_lines(path, layout)):
        wnid, _, name = line.partition(" ")
        if not re.fullmatch(r"n\d{8}", wnid) or not name.strip():
            raise DatasetError(
                f"{path}: line {i + 1} is {line[:80]!r}, expected '<wnid> <class name>' (e.g. 'n01440764 tench')"
            )
        out[wnid] = name.strip()
    return out


class _ImageNetFamily(CoopDataset):
    dataset_templates = IMAGENET_TEMPLATES

    def display(self, name: str) -> str:
        return name

    def _names(self, d: Path, required: bool) -> dict[str, str]:
        for p in (d / "classnames.txt", d.parent / "classnames.txt"):
            if p.is_file():
                return read_classnames(p, self.layout)
        if required:
            raise DatasetError(
                f"dataset {self.name!r}: classnames.txt is missing in {d} (copy it from your imagenet/ "
                f"folder; it gives the wnid order and the class names); expected layout: {self.layout}"
            )
        return {}


@DATASETS.register("imagenet")
class ImageNet(_ImageNetFamily):
    """ImageNet-1k: images/train/<wnid>/ and images/val/<wnid>/ (val is the test split) + classnames.txt; or torchvision's train/ val/."""

    name = "imagenet"
    folders = ("", "imagenet")
    marker = "images/train"
    layout = (
        "imagenet/ with images/train/<wnid>/, images/val/<wnid>/ and classnames.txt (CoOp), or "
        "train/<wnid>/ and val/<wnid>/ (torchvision's layout)"
    )

    def _find(self) -> Path | None:
        for sub in self.folders:
            d = self.given_root / sub if sub else self.given_root
            if (d / "images" / "train").is_dir() or (d / "train").is_dir():
                return d
        return None

    def _download(self) -> None:
        raise DatasetError("dataset 'imagenet' cannot be downloaded automatically (license); pass --root")

    def listing(self) -> DatasetListing:
        if self.download:
            self._download()
        d = self._dataset_dir()
        prefix = "images/" if (d / "images" / "train").is_dir() else ""
        names = self._names(d, required=False) or self._torchvision_names(d)
        ignored: dict[str, list[str]] = {}
        per = {
            s: list_class_folders(d / f"{prefix}{f}", self.name, ignored)
            for s, f in (("train", "train"), ("test", "val"))
            if (d / f"{prefix}{f}").is_dir()
        }
        keys = list(names) if names else sorted({c for cl, _ in per.values() for c in cl})
        if "train" in per and names:
            absent = sorted(set(keys) - set(per["train"][0]))
            if absent:
                raise DatasetError(
                    f"dataset 'imagenet': classnames.txt names {len(absent)} class(es) with no folder in "
                    f"{d / prefix / 'train'}: {absent[:5]}; expected layout: {self.layout}"
                )
        index = {k: i for i, k in enumerate(keys)}
        splits = {}
        for s, (classes, files) in per.items():
            folder = "train" if s == "train" else "val"
            unknown = [c for c in classes if c not in index]
            if unknown:
                raise DatasetError(
                    f"dataset 'imagenet': {d / prefix / folder} has class folders not in classnames.txt: {unknown[:5]}"
                )
            splits[s] = SampleList(
                [f"{prefix}{folder}/{f}" for fs in files for f in fs],
                [index[c] for c, fs in zip(classes, files, strict=True) for _ in fs],
            )
        listing = DatasetListing(
            self.name,
            str(d),
            keys,
            [names.get(k, k) for k in keys],
            splits,
            half_split(keys),
            "CoCoOp base-to-new halves (label order)",
            templates=self.dataset_templates,
            sample_split_source="train/ and val/ folders (val is the test split, as in CoOp)",
        )
        report_ignored(listing, ignored)
        return listing

    @staticmethod
    def _torchvision_names(d: Path) -> dict[str, str]:
        if (d / "meta.bin").exists():
            from torchvision.datasets.imagenet import load_meta_file

            return {w: c[0] for w, c in load_meta_file(str(d))[0].items()}
        mapping = d / "LOC_synset_mapping.txt"
        if mapping.exists():
            out = {}
            for line in read_small_file(
                mapping, "synset mapping", LIST_FILE_LIMIT, "text file", DatasetError
            ).splitlines():
                wnid, _, names = line.partition(" ")
                out[wnid] = names.split(",")[0].strip()
            return out
        return {}


class _ShiftSet(_ImageNetFamily):
    """An ImageNet test-only shift set: every image is a test row; class keys are wnids, so a state
    fitted on ImageNet is evaluated by mapping classes by wnid."""

    #: the sub-folders are wnids (sketch, -A, -R) or label indices 0..999 (V2)
    indexed = False

    def listing(self) -> DatasetListing:
        if self.download:
            raise DatasetError(f"dataset {self.name!r} cannot be downloaded automatically; pass --root ({self.layout})")
        d = self._dataset_dir()
        names = self._names(d, required=True)
        wnids = list(names)
        ignored: dict[str, list[str]] = {}
        classes, files = list_class_folders(d / self.image_dir, self.name, ignored)
        if self.indexed:
            bad = [c for c in classes if not c.isdigit() or int(c) >= len(wnids)]
            if bad:
                raise DatasetError(
                    f"dataset {self.name!r}: {d / self.image_dir} has folders {bad[:5]}; expected label "
                    f"indices 0..{len(wnids) - 1} (ImageNetV2's format-val layout)"
                )
            keys_of = [wnids[int(c)] for c in classes]
        else:
            bad = [c for c in classes if c not in names]
            if bad:
                raise DatasetError(
                    f"dataset {self.name!r}: {d / self.image_dir} has folders that are not wnids of "
                    f"classnames.txt: {bad[:5]}"
                )
            keys_of = classes
        rank = {w: i for i, w in enumerate(wnids)}
        order = sorted(range(len(classes)), key=lambda i: rank[keys_of[i]])
        keys = [keys_of[i] for i in order]
        refs = [f"{self.image_dir}/{f}" for i in order for f in files[i]]
        labels = [j for j, i in enumerate(order) for _ in files[i]]
        listing = DatasetListing(
            self.name,
            str(d),
            keys,
            [names[k] for k in keys],
            {"test": SampleList(refs, labels)},
            {"base": [], "val": [], "novel": keys},
            "test-only shift set (all classes novel)",
            templates=self.dataset_templates,
            sample_split_source="every image is a test row (shift set)",
        )
        report_ignored(listing, ignored)
        return listing


@DATASETS.register("imagenet_v2")
class ImageNetV2(_ShiftSet):
    """ImageNetV2 matched-frequency (test only; folders 0..999 in classnames.txt order)."""

    name = "imagenet_v2"
    folders = ("", "imagenetv2")
    marker = image_dir = "imagenetv2-matched-frequency-format-val"
    indexed = True
    layout = "imagenetv2/ with imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg and classnames.txt"


@DATASETS.register("imagenet_sketch")
class ImageNetSketch(_ShiftSet):
    """ImageNet-Sketch (test only; images/<wnid>/)."""

    name = "imagenet_sketch"
    folders = ("", "imagenet-sketch")
    marker = image_dir = "images"
    layout = "imagenet-sketch/ with images/<wnid>/*.JPEG and classnames.txt"


@DATASETS.register("imagenet_a")
class ImageNetA(_ShiftSet):
    """ImageNet-A, 200 classes (test only; imagenet-a/<wnid>/)."""

    name = "imagenet_a"
    folders = ("", "imagenet-adversarial")
    marker = image_dir = "imagenet-a"
    layout = "imagenet-adversarial/ with imagenet-a/<wnid>/*.jpg and classnames.txt"


@DATASETS.register("imagenet_r")
class ImageNetR(_ShiftSet):
    """ImageNet-R, 200 classes (test only; imagenet-r/<wnid>/)."""

    name = "imagenet_r"
    folders = ("", "imagenet-rendition")
    marker = image_dir = "imagenet-r"
    layout = "imagenet-rendition/ with imagenet-r/<wnid>/*.jpg and classnames.txt"
