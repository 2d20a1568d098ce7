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
    #: the dataset's own prompt templates (CoOp/Tip-Adapter per-dataset text); None: fskd's default
    templates: tuple[str, ...] | None = None
    #: where ``splits`` came from ("split_zhou_X.json (CoOp's published split)", "official files", ...)
    sample_split_source: str = ""
    #: train/val/test ratios for a seeded per-class split of a single "all" pool (None: fskd's default)
    pool_ratios: tuple[float, float, float] | None = None
    #: the fraction of train carved (seeded, per class) into val when there is no val split
    val_from_train: float | None = None

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

    def source_file(self, ref: str) -> Path | None:
        """The file a ref's image is read from (a zip member's archive), for change detection;
        None for rows with no file of their own (arrays in memory, generated images)."""
        if self.root is None:
            return None
        return self.root / ref.split("::", 1)[0]

    # -- helpers for subclasses -------------------------------------------------------------
    def require_root(self, hint: str) -> Path:
        if self.root is None:
            raise DatasetError(f"dataset {self.name!r} needs --root: {hint}")
        if not self.root.exists():
            raise DatasetError(f"dataset {self.name!r}: root {self.root} does not exist ({hint})")
        if not self.root.is_dir():
            raise DatasetError(f"dataset {self.name!r}: --root {self.root} is a file, expected a directory ({hint})")
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


def safe_ref(root: Path, ref: str, where: str) -> str:
    """A ref named by a split file, checked to stay inside ``root``: relative, no ``..`` above
    the root, no drive or NUL. Returns the normalised ref; raises DatasetError naming ``where``."""
    import posixpath

    if not ref or "\x00" in ref:
        raise DatasetError(f"{where}: empty or invalid path {ref!r}")
    r = ref.replace("\\", "/")
    norm = posixpath.normpath(r)
    if r.startswith("/") or Path(ref).is_absolute() or norm == ".." or norm.startswith("../") or norm == ".":
        raise DatasetError(f"{where}: path {ref!r} is outside the dataset root {root} (paths must be relative "
                           f"and stay inside it)")
    return norm


def list_class_folders(folder: Path, dataset: str, ignored: dict[str, list[str]] | None = None
                       ) -> tuple[list[str], list[list[str]]]:
    """Sorted class sub-folders of ``folder`` and their image files (relative to ``folder``).

    Raises DatasetError naming an empty class folder, or a folder with no class sub-folders.
    What is left out is recorded in ``ignored`` (reason -> paths): hidden folders, broken links,
    images in nested sub-folders (one level is read), files that are not images.
    """
    if not folder.is_dir():
        raise DatasetError(f"dataset {dataset!r}: {folder} is not a directory")
    ignored = ignored if ignored is not None else {}

    def note(reason: str, path: Path) -> None:
        ignored.setdefault(reason, []).append(str(path))

    classes = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            if p.is_dir():
                note("hidden folders", p)
        elif p.is_dir():
            classes.append(p.name)
        elif p.is_symlink() and not p.exists():
            note("broken symlinks", p)
    if not classes:
        raise DatasetError(f"dataset {dataset!r}: {folder} has no class sub-folders")
    files: list[list[str]] = []
    for c in classes:
        imgs = []
        for p in sorted((folder / c).iterdir()):
            if p.is_symlink() and not p.exists():
                note("broken symlinks", p)
            elif p.is_dir():
                nested = sum(1 for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS)
                if nested:
                    note("images in nested sub-folders (only one level is read)", p)
            elif p.suffix.lower() in IMAGE_EXTENSIONS:
                if not p.name.startswith("."):
                    imgs.append(f"{c}/{p.name}")
                else:
                    note("hidden files", p)
            elif not p.name.startswith("."):
                note("files that are not images", p)
        if not imgs:
            raise DatasetError(
                f"dataset {dataset!r}: class folder {folder / c} is empty "
                f"(no files ending in {', '.join(IMAGE_EXTENSIONS)})"
            )
        files.append(imgs)
    return classes, files


def report_ignored(listing: DatasetListing, ignored: dict[str, list[str]]) -> None:
    """Record what a listing left out in ``listing.extra['ignored']`` (counts) and warn once."""
    if not ignored:
        return
    import logging

    listing.extra["ignored"] = {k: len(v) for k, v in ignored.items()}
    logging.getLogger("fskd.datasets").warning(
        "dataset %r: ignored %s", listing.name,
        "; ".join(f"{len(v)} {k} (e.g. {v[0]})" for k, v in ignored.items()))
