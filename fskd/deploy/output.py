"""One-file outputs (predictions, exported models): refused before any work unless new, or fskd's
own and ``--force``; written under a hidden temporary name beside the target and renamed into
place when complete, so the final name only ever holds a whole file. A failure or Ctrl-C removes
the temporary file (never anything else)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

from fskd.errors import OutputError
from fskd.fsutil import check_writable, fsync_dir, refuse_url, store_containing


def guard_output_file(
    path: str | os.PathLike,
    option: str,
    is_ours: Callable[[Path], bool],
    force: bool,
    what: str,
    protect: tuple[tuple[str, str | None], ...] = (),
) -> Path:
    """Decide, before any work, whether ``path`` may receive ``what`` (e.g. "fskd predict's output").

    - absent: fine when its folder can be written;
    - ``is_ours(path)``: replaced only with ``force``;
    - anything else (a user's file, a folder, a link, a file inside a feature store or an input):
      refused, force or not. Returns the absolute path."""
    refuse_url(path, option)
    p = Path(path).expanduser().absolute()
    for other_opt, other in protect:
        if other and "://" not in str(other):
            o = Path(other).expanduser().absolute()
            if p == o or p.is_relative_to(o):
                raise OutputError(
                    f"{option} {path} is {'' if p == o else 'inside '}{other_opt} {other}; write the "
                    f"output somewhere else (nothing was changed)"
                )
    inside = store_containing(p.parent) if p.parent.exists() else None
    if inside is not None:
        raise OutputError(f"{option} {path} is inside the feature store {inside}; write it somewhere else")
    if p.is_symlink() or (p.exists() and not p.is_file()):
        raise OutputError(
            f"{option} {path} exists and is not a regular file; fskd replaces only files it wrote (nothing was changed)"
        )
    if p.exists():
        if not is_ours(p):
            raise OutputError(
                f"{option} {path} exists and is not {what} (or was changed since fskd wrote it); fskd "
                f"will not replace it. Choose a new path (nothing was changed)"
            )
        if not force:
            raise OutputError(
                f"{option} {path} already holds {what}; pass --force to replace it, or choose another path"
            )
    check_writable(p.parent, option)
    return p


def temporary_name(path: Path) -> Path:
    """The hidden name a file is built under, beside ``path`` (same file system: the rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def building(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path`` (atomic), on any
    failure (an error, Ctrl-C) remove it."""
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
