"""The dataset interface: a list of image references per sample split, with class metadata.

A dataset never decodes images up front. It lists ``(ref, label)`` rows per sample split and
opens one ref on demand (in DataLoader workers), so listing ImageNet costs seconds and RAM does
not grow with the number of images decoded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import urllib.parse
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
from PIL import ExifTags, Image, ImageOps

from fskd.errors import DatasetError
from fskd.registry import Registry

DATASETS: Registry[type[ImageDataset]] = Registry("dataset")  # filled by the modules of this package

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
#: the most bytes read from a dataset's own list or split file (CSV, JSON, TXT): a row per image,
#: about 60 MB for ImageNet's 1.28M, so this only stops a wrong file (e.g. a device)
LIST_FILE_LIMIT = 256 << 20


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


def fs_text(s: str) -> str:
    """A name read from the file system as text. Under a non-UTF-8 locale (``LC_ALL=C``) Python
    decodes the bytes of ``é`` in a folder name to lone surrogates, which cannot be written as
    UTF-8 (store, JSON, prompts): they become the UTF-8 text the bytes spell (undecodable bytes: U+FFFD)."""
    return s if s.isascii() else s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def fs_path(s: str) -> str:
    """The inverse of :func:`fs_text` for a ref read back as text (a store's sample ids): the
    string this process's file-system encoding turns into the same bytes on disk."""
    return s if s.isascii() else os.fsdecode(s.encode("utf-8", "surrogateescape"))


def text_bytes(s: str) -> bytes:
    """UTF-8 bytes of a ref or name for hashing: a file-system name's own bytes under any locale,
    so fingerprints do not depend on it (plain ``.encode()`` fails on surrogates)."""
    return s.encode("utf-8", "surrogateescape")


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

    def __post_init__(self) -> None:
        # class keys and names are text (JSON, prompts, the store), even when read from folder names
        self.class_keys = [fs_text(k) for k in self.class_keys]
        self.class_names = [fs_text(n) for n in self.class_names]
        if self.standard_class_split:
            self.standard_class_split = {s: [fs_text(k) for k in ks] for s, ks in self.standard_class_split.items()}

    def fingerprint(self) -> str:
        """Hash of the listing (refs, labels, classes): same inputs -> same fingerprint."""
        h = hashlib.sha256()
        h.update(json.dumps([self.name, self.class_keys, self.class_names]).encode())
        for split in sorted(self.splits):
            rows = self.splits[split]
            h.update(split.encode())
            h.update(text_bytes("\n".join(rows.refs)))
            h.update(rows.labels.tobytes())
        return h.hexdigest()[:32]


class ImageDataset(ABC):
    """A source of images. Subclasses list rows and open one ref as an RGB PIL image."""

    name: str = ""
    #: Where the data can be fetched from when ``download=True`` (first URL is probed).
    urls: tuple[str, ...] = ()

    def __init__(self, root: str | None, download: bool = False) -> None:
        # absolute: the store records it, and a relative root would mean another folder from another cwd
        self.root = Path(root).expanduser().absolute() if root else None
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


#: ``Image.info`` key holding the frame count of a multi-frame file (frame 0 is what is decoded)
FRAMES_INFO = "fskd_frames"


def open_rgb(source: str | Path | IO[bytes] | bytes) -> Image.Image:
    """Open an image file (a path, a binary file object or the file's bytes) as RGB, the way a
    viewer shows it: see :func:`to_rgb`. Every dataset opens its images through here."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    with Image.open(source) as im:
        return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """An opened image as RGB, as a viewer shows it. ``convert("RGB")`` alone ignores the EXIF
    orientation (phone photos come out sideways), clips 16-bit and 32-bit values to 255 (a 16-bit
    PNG turns white) and drops transparency (showing whatever colour hides under it). Here: the
    orientation is applied, deep greys are scaled to 8 bits, transparency is composited onto white.
    A multi-frame file (animated GIF/PNG/WebP, multi-page TIFF) gives its first frame, and its
    frame count in ``info[FRAMES_INFO]`` so the caller can say so."""
    # MPO: a phone photo's extra pictures (previews, depth, gain maps); its frame 0 is the photo
    frames = im.n_frames if getattr(im, "is_animated", False) and im.format != "MPO" else 1
    if im.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # read first: exif_transpose copies every image
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        im = Image.fromarray(_to_uint8(np.asarray(im), im.mode), mode="L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa") or (im.mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    out = im.convert("RGB")
    if frames > 1:
        out.info[FRAMES_INFO] = frames
    return out


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Grey values of a deep image mode -> uint8. 16-bit (and 32-bit holding 0..65535, as older
    Pillow opens 16-bit PNGs): value / 257. Float in [0, 1]: x 255. Anything else is stretched
    from its minimum to its maximum (there is no one convention for it)."""
    if mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if a.size and 0.0 <= a.min() and a.max() <= 1.0:
            return np.rint(a * 255).astype(np.uint8)
    else:
        a = a.astype(np.int64)
        if not a.size or (0 <= a.min() and a.max() <= 65535):
            return ((a * 255 + 32767) // 65535).astype(np.uint8)  # rounded value / 257
    lo, hi = float(a.min()), float(a.max())
    return np.rint((a - lo) * (255 / (hi - lo))).astype(np.uint8) if hi > lo else np.zeros(a.shape, np.uint8)


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
        raise DatasetError(
            f"{where}: path {ref!r} is outside the dataset root {root} (paths must be relative and stay inside it)"
        )
    return norm


def list_class_folders(
    folder: Path, dataset: str, ignored: dict[str, list[str]] | None = None
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
        "dataset %r: ignored %s", listing.name, "; ".join(f"{len(v)} {k} (e.g. {v[0]})" for k, v in ignored.items())
    )
