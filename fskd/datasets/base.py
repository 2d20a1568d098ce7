"""The dataset interface: a list of image references per sample split, with class metadata.

A dataset never decodes images up front. It lists ``(ref, label)`` rows per sample split and
opens one ref on demand (in DataLoader workers), so listing ImageNet costs seconds and RAM does
not grow with the number of images decoded.
"""

from __future__ import annotations

import hashlib
import json
import socket
import urllib.parse
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fskd.errors import DatasetError
from fskd.registry import Registry

DATASETS: Registry[type[ImageDataset]] = Registry("dataset")  # filled by the modules of this package

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclass
class SampleList:
    """Rows of one sample split: relative refs (str) and integer class labels."""

    refs: list[str]
    labels: np.ndarray  # (n,) int32

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int32)
        if len(self.refs) != len(self.labels):
            raise ValueError("refs and labels differ in length")

    def __len__(self) -> int:
        return len(self.refs)


@dataclass
class DatasetListing:
    """What a dataset offers: classes, sample splits, and its standard class split if any."""

    name: str
    root: str
    class_keys: list[str]  # stable identifiers (folder names, wnids, indices as text)
    class_names: list[str]  # human names used in prompts
    splits: dict[str, SampleList]  # "train"/"val"/"test", or a single "all"
    standard_class_split: dict[str, list[str]] | None = None  # keys per base/val/novel
    class_split_source: str = ""
    extra: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Hash of the listing (refs, labels, classes): same inputs -> same fingerprint."""
        h = hashlib.sha256()
        h.update(json.dumps([self.name, self.class_keys, self.class_names]).encode())
        for split in sorted(self.splits):
            rows = self.splits[split]
            h.update(split.encode())
            h.update("\n".join(rows.refs).encode())
            h.update(rows.labels.tobytes())
        return h.hexdigest()[:32]


class ImageDataset(ABC):
    """A source of images. Subclasses list rows and open one ref as an RGB PIL image."""

    name: str = ""
    #: Where the data can be fetched from when ``download=True`` (first URL is probed).
    urls: tuple[str, ...] = ()

    def __init__(self, root: str | None, download: bool = False) -> None:
        self.root = Path(root).expanduser() if root else None
        self.download = download

    @abstractmethod
    def listing(self) -> DatasetListing:
        """List classes and rows. Raises DatasetError naming what is missing."""

    @abstractmethod
    def open(self, ref: str) -> Image.Image:
        """Open one sample as an RGB image (called in DataLoader workers)."""

    def path_of(self, ref: str) -> str:
        """A human-readable location of a ref, for error messages."""
        return str(self.root / ref) if self.root else ref

    # -- helpers for subclasses -------------------------------------------------------------
    def require_root(self, hint: str) -> Path:
        if self.root is None:
            raise DatasetError(f"dataset {self.name!r} needs --root: {hint}")
        if not self.root.exists():
            raise DatasetError(f"dataset {self.name!r}: root {self.root} does not exist ({hint})")
        return self.root

    def check_download(self) -> None:
        """Fail within seconds when a download is asked for but the host is unreachable."""
        if not self.urls:
            raise DatasetError(f"dataset {self.name!r} cannot be downloaded automatically; pass --root")
        url = urllib.parse.urlparse(self.urls[0])
        host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((host, port), timeout=3).close()
        except OSError as e:
            raise DatasetError(
                f"cannot download {self.name!r} from {self.urls[0]}: {host} is unreachable ({e}). "
                f"Download it elsewhere and pass --root to the local copy."
            ) from None


def open_rgb(path: str | Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def pretty_name(key: str) -> str:
    """``001.Black_footed_Albatross`` -> ``Black footed Albatross``; ``sweet_pepper`` -> ``sweet pepper``."""
    name = key.split("/")[-1]
    if "." in name and name.split(".", 1)[0].isdigit():
        name = name.split(".", 1)[1]
    return name.replace("_", " ").strip()


def list_class_folders(folder: Path, dataset: str) -> tuple[list[str], list[list[str]]]:
    """Sorted class sub-folders of ``folder`` and their image files (relative to ``folder``).

    Raises DatasetError naming an empty class folder, or a folder with no class sub-folders.
    """
    if not folder.is_dir():
        raise DatasetError(f"dataset {dataset!r}: {folder} is not a directory")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"dataset {dataset!r}: {folder} has no class sub-folders")
    files: list[list[str]] = []
    for c in classes:
        imgs = sorted(
            f"{c}/{p.name}"
            for p in (folder / c).iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not imgs:
            raise DatasetError(
                f"dataset {dataset!r}: class folder {folder / c} is empty "
                f"(no files ending in {', '.join(IMAGE_EXTENSIONS)})"
            )
        files.append(imgs)
    return classes, files
