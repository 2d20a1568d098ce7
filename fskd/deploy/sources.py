"""Where ``fskd predict`` reads images from: ``--images PATH`` (a folder, read recursively; one
image; or a text file listing image paths, one per line) or ``--csv FILE`` (a ``path`` column).
Paths are yielded one at a time (a listing is never held twice); relative paths in a list or CSV
file are relative to that file's folder."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path

from fskd.datasets.base import IMAGE_EXTENSIONS, ImageDataset, open_rgb
from fskd.errors import DatasetError

#: bytes of a list file looked at to tell text from an image or another binary file
SNIFF = 4096


class PathSource(ImageDataset):
    """Images named by their paths, opened as every dataset opens them (EXIF, 16-bit, alpha)."""

    name = "paths"

    def __init__(self) -> None:
        super().__init__(None)

    def listing(self):
        raise DatasetError("a list of image paths has no classes or splits")

    def open(self, ref: str):
        return open_rgb(ref)

    def path_of(self, ref: str) -> str:
        return ref


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def _walk(root: Path) -> Iterator[str]:
    """Image files under ``root`` (recursive, sorted, hidden files and folders left out)."""
    for d, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for f in sorted(files):
            if not f.startswith(".") and _is_image(Path(f)):
                yield os.path.join(d, f)


def _text_lines(path: Path, option: str) -> Iterator[str]:
    if not path.is_file():
        raise DatasetError(f"{option} {path} is not a regular file")
    with open(path, "rb") as f:
        head = f.read(SNIFF)
    try:
        (head[:-4] if len(head) == SNIFF else head).decode("utf-8")  # a cut multi-byte character at the end is fine
        if b"\0" in head:
            raise UnicodeDecodeError("utf-8", head, 0, 1, "NUL byte")
    except UnicodeDecodeError:
        raise DatasetError(
            f"{option} {path} is neither an image (by its name: {', '.join(IMAGE_EXTENSIONS)}) nor a "
            f"UTF-8 text file listing image paths"
        ) from None
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            yield from f
        except UnicodeDecodeError as e:
            raise DatasetError(
                f"{option} {path} is not UTF-8 text ({e.reason}); expected one image path per line"
            ) from None


def image_paths(spec: str, option: str = "--images") -> Iterator[str]:
    """The image paths ``--images PATH`` names, in a stable order (see the module docstring)."""
    p = Path(spec).expanduser()
    if not p.exists():
        raise DatasetError(f"{option} {spec} does not exist")
    if p.is_dir():
        found = False
        for f in _walk(p):
            found = True
            yield f
        if not found:
            raise DatasetError(
                f"{option} {spec}: no image files under it (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)"
            )
        return
    if _is_image(p):
        yield str(p)
        return
    base = p.absolute().parent
    for line in _text_lines(p, option):
        line = line.strip()
        if line and not line.startswith("#"):
            yield str(base / Path(line).expanduser()) if not os.path.isabs(os.path.expanduser(line)) else line


def csv_paths(spec: str, column: str = "path") -> Iterator[str]:
    """The ``path`` column of ``--csv FILE`` (relative paths: from the file's folder)."""
    p = Path(spec).expanduser()
    if not p.exists():
        raise DatasetError(f"--csv {spec} does not exist")
    base = p.absolute().parent
    reader = csv.reader(_text_lines(p, "--csv"))
    header = next(reader, None)
    if not header or column not in [h.strip() for h in header]:
        raise DatasetError(
            f"--csv {spec} needs a header row with a {column!r} column (it has "
            f"{', '.join(map(repr, header or [])) or 'no header'})"
        )
    at = [h.strip() for h in header].index(column)
    for i, row in enumerate(reader, start=2):
        if not row:
            continue
        if at >= len(row) or not row[at].strip():
            raise DatasetError(f"--csv {spec} line {i}: no {column!r} value")
        ref = os.path.expanduser(row[at].strip())
        yield ref if os.path.isabs(ref) else str(base / ref)
