"""File-system safety: atomic writes, manifest-committed bundles, output-path guards, fault points.

One mechanism serves every directory fskd replaces (method states, distillation resume
checkpoints):

```
DIR/
  <manifest>.json             metadata + the name and SHA-256 of the tensor file it commits
  <stem>-<sha16>.safetensors  the tensors, named by content
```

A write puts the new tensor file beside the old one under its own content name, then replaces
the manifest with ``os.replace`` (atomic on POSIX), then deletes tensor files the manifest no
longer names. At every instant the manifest names a complete tensor file: a kill leaves either
the old or the new bundle, plus at most an orphan file that the next write removes. Nothing here
unpickles: JSON and safetensors cannot run code.

Fault points (:func:`fault_point`) let tests kill the process at each step of a write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fskd.errors import ConfigError, OutputError, StateError

#: environment variable naming a fault point at which the process kills itself (tests only)
FAULT_ENV = "FSKD_FAULT"


def fault_point(name: str) -> None:
    """SIGKILL this process when ``$FSKD_FAULT`` names this point (fault-injection tests)."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode(), mode)


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


# -- manifest-committed bundles ------------------------------------------------------------------
def write_bundle(directory: Path, manifest: str, stem: str, meta: dict, tensors: dict, point: str = "bundle") -> None:
    """Commit ``meta`` + ``tensors`` into the existing ``directory`` (see the module docstring).
    ``meta`` gets ``tensors_file`` and ``tensors_sha256``; ``point`` prefixes the fault points."""
    from safetensors.torch import save

    # serialise once, hash those bytes, write them: no read-back of the file to hash it
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    digest = hashlib.sha256(data).hexdigest()
    name = f"{stem}-{digest[:16]}.safetensors"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        fault_point(f"{point}:tensors-written")
        os.replace(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fault_point(f"{point}:tensors-named")
    meta = {**meta, "tensors_file": name, "tensors_sha256": digest}
    atomic_write_text(directory / manifest, json.dumps(meta, indent=2, default=str))
    fault_point(f"{point}:manifest-replaced")
    clean_bundle(directory, manifest, stem, keep=name)


def clean_bundle(directory: Path, manifest: str, stem: str, keep: str | None) -> None:
    """Delete this bundle's tensor files and temporaries other than ``keep`` (leftovers of
    replaced or interrupted writes). Only names fskd gives its own files are touched."""
    for p in directory.iterdir():
        n = p.name
        ours = (n.startswith(f"{stem}-") and n.endswith(".safetensors")) or n == f"{stem}.safetensors" or (
            n.startswith((f".{stem}.", f".{manifest}.")) and n.endswith(".tmp"))
        if ours and n != keep and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()


def read_bundle(directory: Path, manifest: str, legacy: str | None = None, what: str = "state") -> tuple[dict, dict]:
    """``(meta, tensors)`` of a bundle; the tensor file must exist and match its SHA-256.
    ``legacy``: a fixed tensor file name read when the manifest names none (older writes)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    mpath = directory / manifest
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateError(f"{mpath} is not valid JSON ({e}); the {what} is damaged, write it again") from None
    if not isinstance(meta, dict):
        raise StateError(f"{mpath} must hold a JSON object, got {type(meta).__name__}")
    name, digest = meta.pop("tensors_file", None), meta.pop("tensors_sha256", None)
    if name is None and legacy is None:
        raise StateError(f"{mpath} names no tensor file (key 'tensors_file'); the {what} is damaged, write it again")
    name = name or legacy
    if not isinstance(name, str) or Path(name).name != name:
        raise StateError(f"{mpath}: tensors_file must be a file name inside {directory}, got {name!r}")
    tpath = directory / name
    if not tpath.is_file():
        raise StateError(f"{what} {directory}: tensor file {tpath} is missing; write the {what} again")
    try:
        data = tpath.read_bytes()  # read once: hashed and parsed from the same bytes
    except OSError as e:
        raise StateError(f"{what} {directory}: cannot read {tpath}: {e.strerror or e}") from None
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise StateError(f"{what} {directory}: {tpath} does not match the SHA-256 in {mpath} (truncated or "
                         f"changed since it was written); write the {what} again")
    try:
        tensors = load(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise StateError(f"{what} {directory}: cannot read {tpath}: {e}") from None
    return meta, tensors


def remove_bundle(directory: Path, manifest: str, stem: str, extra: tuple[str, ...] = ()) -> None:
    """Delete a bundle's own files (manifest, tensor files, ``extra`` names) and the directory
    if nothing else is left in it; files fskd did not write there stay."""
    if not directory.is_dir():
        return
    clean_bundle(directory, manifest, stem, keep=None)
    for n in (manifest, *extra):
        with contextlib.suppress(FileNotFoundError):
            (directory / n).unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()  # only when empty


def to_tree(obj, prefix: str, tensors: dict):
    """A nested structure of dicts, lists, tensors and JSON scalars -> JSON, with the tensors moved
    into ``tensors`` (keys are their paths). Dicts with non-string keys (optimizer states) keep
    their key types. The inverse is :func:`from_tree`."""
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj and "__items__" not in obj:
            return {k: to_tree(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, to_tree(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [to_tree(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at {prefix!r} (tensors, dicts, lists and JSON values only)")


def from_tree(tree, tensors: dict):
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        if set(tree) == {"__items__"}:
            return {k: from_tree(v, tensors) for k, v in tree["__items__"]}
        return {k: from_tree(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [from_tree(v, tensors) for v in tree]
    return tree


# -- output paths ----------------------------------------------------------------------------------
def first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def refuse_url(path: str | Path, option: str) -> None:
    """States, reports and bench folders are written with atomic renames and directory locks, which
    object storage lacks; they are small, so they stay local (copy them up afterwards)."""
    if isinstance(path, str) and "://" in path and not path.startswith("file://"):
        raise OutputError(f"{option} {path}: takes a local directory (only --store takes a URL: states, reports "
                          f"and bench folders are small and are committed by atomic renames, which object storage "
                          f"lacks; copy them there afterwards)")


def check_writable(path: str | Path, option: str, kind: str = "directory") -> Path:
    """Raise OutputError unless ``path`` can be created (or written) as a ``kind``: every existing
    ancestor is a directory and the nearest one accepts a new file. Checked before any work.
    Only ``--store`` takes a URL: states, reports and bench folders are local directories."""
    refuse_url(path, option)
    p = Path(path).expanduser().absolute()
    if p.exists() and kind == "directory" and not p.is_dir():
        raise OutputError(f"{option} {path}: exists and is not a directory")
    anchor = first_existing(p)
    if not anchor.is_dir():
        raise OutputError(f"{option} {path}: {anchor} is a file, not a directory, so {p} cannot be created")
    target = p if p.is_dir() else anchor
    try:
        with tempfile.TemporaryFile(dir=target, prefix=".fskd-probe-"):
            pass
    except OSError as e:
        raise OutputError(f"{option} {path}: cannot write in {target} ({e.strerror or e})") from None
    return p


def is_store_dir(p: Path) -> bool:
    """A folder holding an fskd feature store (zarr.json with the fskd format marker)."""
    meta = p / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attrs, dict) and attrs.get("format") == "fskd-feature-store"


def store_containing(path: str | Path) -> Path | None:
    """The fskd feature store that ``path`` is (or lies inside), if any."""
    p = Path(path).expanduser().absolute().resolve()
    return next((a for a in (p, *p.parents) if a.is_dir() and is_store_dir(a)), None)


def guard_output_dir(path: str | Path, option: str, marker_file: str, is_ours, force: bool,
                     protect: tuple[tuple[str, str | Path | None], ...] = ()) -> Path:
    """Decide, before any work, whether ``path`` may receive an fskd output directory.

    - absent: fine when it can be created (see :func:`check_writable`);
    - an fskd output (``is_ours(path)``): replaced only with ``force``;
    - anything else (a user's folder, a file, a dataset, a feature store): refused, force or not.
    ``protect`` names other inputs (``(option, path)``) the output may not equal, contain or sit in.
    Returns the absolute path.
    """
    refuse_url(path, option)
    p = Path(path).expanduser().absolute()
    resolved = p.resolve()
    for other_opt, other in protect:
        if other is None:
            continue
        other = str(other)
        if "://" in other:  # a store on object storage cannot overlap a local folder
            if not other.startswith("file://"):
                continue
            other = other[len("file://"):]
        o = Path(other).expanduser().resolve()
        if resolved == o or o.is_relative_to(resolved) or resolved.is_relative_to(o):
            raise OutputError(f"{option} {path} overlaps {other_opt} {other}; write the output somewhere else "
                              f"(nothing was changed)")
    inside = store_containing(resolved)
    if inside is not None:
        raise OutputError(f"{option} {path} is inside the feature store {inside}; write the output somewhere else")
    for anc in resolved.parents:
        if anc.is_dir() and is_ours(anc):
            raise OutputError(f"{option} {path} is inside the fskd output {anc}; write the output somewhere else")
    if p.exists() or p.is_symlink():
        if p.is_symlink() or not p.is_dir():
            raise OutputError(f"{option} {path} exists and is not a directory; fskd replaces only its own "
                              f"output directories (nothing was changed)")
        if not is_ours(p):
            what = "a feature store" if is_store_dir(p) else f"not an fskd output (no {marker_file} written by fskd)"
            raise OutputError(f"{option} {path} exists and is {what}; fskd will not replace it. "
                              f"Choose a new path (nothing was changed)")
        if not force:
            raise OutputError(f"{option} {path} already holds an fskd output; pass --force to replace it, "
                              f"or choose another path")
    check_writable(p, option)
    return p


@contextlib.contextmanager
def dir_lock(path: Path, wait_message: str | None = None, log=None) -> Iterator[None]:
    """An exclusive advisory lock (flock) on an existing directory; no lock file is created, and
    the kernel releases it when the process dies, however it dies."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log is not None and wait_message:
                log.warning(wait_message)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def parse_json_file(path: str | Path, option: str) -> object:
    """Read a JSON file given to an option; every failure is a ConfigError naming the file."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{option} {path} is a directory, expected a JSON file")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{option} file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{option} file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{option} file {path} is not valid JSON: {e}") from None
    except OSError as e:
        raise ConfigError(f"{option} file {path} cannot be read: {e.strerror or e}") from None
