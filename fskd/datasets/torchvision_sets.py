"""Datasets wrapped around torchvision: CIFAR-FS, FC100, Fashion-MNIST (the CoOp benchmark sets,
Flowers102, DTD and EuroSAT included, live in ``coop.py``).

torchvision reads (and with ``--download`` fetches) the files; fskd only lists rows and opens
one ref at a time. Offline, ``--download`` fails within seconds naming the unreachable host.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from fskd.datasets.base import (
    DATASETS,
    DatasetListing,
    ImageDataset,
    SampleList,
    pretty_name,
    to_rgb,
)
from fskd.errors import DatasetError

# CIFAR-FS (Bertinetto et al. 2019) class split of CIFAR-100, 64/16/20 classes.
CIFAR_FS_VAL = [
    "otter",
    "motorcycle",
    "television",
    "lamp",
    "crocodile",
    "shark",
    "butterfly",
    "beaver",
    "beetle",
    "tractor",
    "flatfish",
    "maple_tree",
    "camel",
    "crab",
    "sea",
    "cattle",
]
CIFAR_FS_NOVEL = [
    "baby",
    "bed",
    "bicycle",
    "chimpanzee",
    "fox",
    "leopard",
    "man",
    "pickup_truck",
    "plain",
    "poppy",
    "rocket",
    "rose",
    "snail",
    "sweet_pepper",
    "table",
    "telephone",
    "wardrobe",
    "whale",
    "woman",
    "worm",
]
# FC100 (Oreshkin et al. 2018): CIFAR-100 superclass indices per split, 12/4/4 superclasses.
FC100_SUPERCLASSES = {
    "base": [1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19],
    "val": [8, 11, 13, 16],
    "novel": [0, 7, 12, 14],
}


def half_split(keys: list[str]) -> dict[str, list[str]]:
    """CoCoOp base-to-new convention: the first half of the classes is base, the rest novel."""
    n = (len(keys) + 1) // 2
    return {"base": keys[:n], "val": [], "novel": keys[n:]}


class TorchvisionDataset(ImageDataset):
    """Shared plumbing: build torchvision objects, turn 'not found' into a clear DatasetError."""

    hint = "the folder torchvision reads this dataset from"

    def _tv(self, factory, **kwargs):
        root = self.root
        if root is None:
            raise DatasetError(f"dataset {self.name!r} needs --root ({self.hint}); add --download to fetch it there")
        if self.download:
            self.check_download()
        try:
            return factory(str(root), download=self.download, **kwargs)
        except (RuntimeError, FileNotFoundError) as e:
            raise DatasetError(
                f"dataset {self.name!r}: not found under {root} ({e}). Pass --root to {self.hint}, or --download"
            ) from None


class _ArrayDataset(TorchvisionDataset):
    """Images held in memory as uint8 arrays (CIFAR, Fashion-MNIST); refs are 'split/index'."""

    def __init__(self, root: str | None, download: bool = False) -> None:
        super().__init__(root, download)
        self._arrays: dict[str, np.ndarray] = {}

    def open(self, ref: str) -> Image.Image:
        split, i = ref.split("/")
        if split not in self._arrays:  # a worker started by spawn re-reads the files
            self.listing()
        return to_rgb(Image.fromarray(self._arrays[split][int(i)]))

    def source_file(self, ref: str) -> Path | None:
        return None  # rows live in arrays; subclasses name the file a split was read from

    def path_of(self, ref: str) -> str:
        return f"{self.root} [{ref}]"

    def _rows(self, split: str, data: np.ndarray, labels) -> SampleList:
        self._arrays[split] = data
        return SampleList([f"{split}/{i}" for i in range(len(data))], np.asarray(labels))


#: the only globals a CIFAR pickle may name: numpy's array reconstruction (no code runs)
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}  # bytes pickled by Python 3


class _DataOnlyUnpickler(pickle.Unpickler):
    """Reads the CIFAR pickles' dicts, lists, strings, bytes and numpy arrays and refuses every
    other global, so a file planted under --root cannot run code."""

    def __init__(self, f, path: Path, **kwargs) -> None:
        super().__init__(f, **kwargs)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _PICKLE_GLOBALS:
            import importlib

            return getattr(importlib.import_module(module), name)
        raise DatasetError(
            f"{self.path}: refusing to load {module}.{name} from a CIFAR pickle "
            f"(only plain data and numpy arrays are read; the file is not the CIFAR release)"
        )


def read_data_pickle(path: Path) -> dict:
    """One CIFAR python-version file (a latin-1 pickle of a dict), read without running code."""
    if not path.is_file():
        raise DatasetError(f"{path} is missing (expected the CIFAR-100 python release under --root)")
    try:
        with open(path, "rb") as f:
            d = _DataOnlyUnpickler(f, path, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DatasetError(
            f"{path} is not a readable CIFAR pickle ({type(e).__name__}: {e}); download it again"
        ) from None
    if not isinstance(d, dict):
        raise DatasetError(f"{path} holds a {type(d).__name__}, expected the CIFAR dict")
    return d


class _Cifar100Base(_ArrayDataset):
    hint = "the folder holding cifar-100-python/"

    def _load(self):
        """The CIFAR-100 python release (``cifar-100-python/{meta,train,test}``), read with the
        data-only unpickler; ``--download`` fetches it with torchvision's checked download."""
        if self.root is None:
            raise DatasetError(f"dataset {self.name!r} needs --root ({self.hint}); add --download to fetch it there")
        base = Path(self.root) / "cifar-100-python"
        if self.download and not base.is_dir():
            from torchvision.datasets import CIFAR100
            from torchvision.datasets.utils import download_and_extract_archive

            self.check_download()
            download_and_extract_archive(CIFAR100.url, str(self.root), filename=CIFAR100.filename, md5=CIFAR100.tgz_md5)
        if not base.is_dir():
            raise DatasetError(f"dataset {self.name!r}: {base} not found. Pass --root to {self.hint}, or --download")
        meta = read_data_pickle(base / "meta")
        keys = [str(k) for k in meta.get("fine_label_names", [])]
        if len(keys) != 100:
            raise DatasetError(f"{base / 'meta'}: expected 100 fine_label_names, got {len(keys)}")
        splits = {}
        for split in ("train", "test"):
            d = read_data_pickle(base / split)
            try:
                data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                labels = np.asarray(d["fine_labels"], dtype=np.int64)
            except (KeyError, ValueError) as e:
                raise DatasetError(f"{base / split}: not the CIFAR-100 layout ({type(e).__name__}: {e})") from None
            if len(labels) != len(data) or (len(labels) and not 0 <= labels.min() <= labels.max() < 100):
                raise DatasetError(f"{base / split}: {len(data)} images but {len(labels)} fine labels in 0..99")
            splits[split] = self._rows(split, np.ascontiguousarray(data), labels)
        return keys, splits

    def source_file(self, ref: str) -> Path | None:
        return Path(self.root) / "cifar-100-python" / ref.split("/")[0]  # the pickle of the row's split

    def _coarse(self) -> np.ndarray:
        """Fine label -> superclass index, from the CIFAR-100 pickle."""
        d = read_data_pickle(Path(self.root) / "cifar-100-python" / "train")
        fine, coarse = np.asarray(d["fine_labels"]), np.asarray(d["coarse_labels"])
        out = np.zeros(100, dtype=np.int64)
        out[fine] = coarse
        return out


@DATASETS.register("cifar-fs")
class CifarFsDataset(_Cifar100Base):
    """CIFAR-FS: CIFAR-100 with the Bertinetto et al. 64/16/20 class split (torchvision CIFAR100)."""

    name = "cifar-fs"
    urls = ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",)

    def listing(self) -> DatasetListing:
        keys, splits = self._load()
        novel, val = set(CIFAR_FS_NOVEL), set(CIFAR_FS_VAL)
        std = {"base": [k for k in keys if k not in novel | val], "val": CIFAR_FS_VAL, "novel": CIFAR_FS_NOVEL}
        return DatasetListing(
            self.name,
            str(self.root),
            keys,
            [pretty_name(k) for k in keys],
            splits,
            std,
            "Bertinetto et al. 2019 CIFAR-FS split",
        )


@DATASETS.register("fc100")
class Fc100Dataset(_Cifar100Base):
    """FC100: CIFAR-100 split by superclass (Oreshkin et al.), 60/20/20 classes (torchvision CIFAR100)."""

    name = "fc100"
    urls = ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",)

    def listing(self) -> DatasetListing:
        keys, splits = self._load()
        coarse = self._coarse()
        std = {s: [keys[i] for i in range(100) if coarse[i] in sup] for s, sup in FC100_SUPERCLASSES.items()}
        return DatasetListing(
            self.name,
            str(self.root),
            keys,
            [pretty_name(k) for k in keys],
            splits,
            std,
            "Oreshkin et al. 2018 FC100 superclass split",
        )


@DATASETS.register("fashion-mnist")
class FashionMnistDataset(_ArrayDataset):
    """Fashion-MNIST (torchvision; local raw files under --root); classes split in halves."""

    name = "fashion-mnist"
    urls = ("https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz",)
    hint = "the folder holding FashionMNIST/raw/"

    def listing(self) -> DatasetListing:
        from torchvision.datasets import FashionMNIST

        train, test = self._tv(FashionMNIST, train=True), self._tv(FashionMNIST, train=False)
        keys = list(train.classes)
        splits = {
            "train": self._rows("train", train.data.numpy(), train.targets.numpy()),
            "test": self._rows("test", test.data.numpy(), test.targets.numpy()),
        }
        return DatasetListing(
            self.name,
            str(self.root),
            keys,
            [k.replace("/", " or ") for k in keys],
            splits,
            half_split(keys),
            "fskd fixed split: first 5 classes base, last 5 novel",
        )
