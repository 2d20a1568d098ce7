"""File-system safety: atomic writes, manifest-committed bundles, output-path guards, fault points.

One mechanism serves every directory fskd replaces (method states, distillation resume
checkpoints):

```
DIR/
  <manifest>.json             metadata + the name and SHA-256 of the tensor file it commits
  <stem>-<sha16>.safetensors  the tensors, named by content
```

A write first records in a journal (``.<manifest>.pending``) every file it is about to create,
puts the new tensor file beside the old one under its own content name, replaces the manifest with
``os.replace`` (atomic on POSIX), then deletes the tensor file the old manifest named and the
journal's files. At every instant the manifest names a complete tensor file: a kill leaves either
the old or the new bundle, plus at most files the journal names, which the next write removes.
Only files a manifest or a journal names are ever deleted: a user's ``state-x.safetensors``
beside them stays. The manifest carries the SHA-256 of its own content (``meta_sha256``) and of
the tensor file, so an edited manifest or tensor file is refused, and so are non-finite tensors.
Writers into one directory hold an exclusive lock on it (two ``--force`` runs take turns). Nothing
here unpickles: JSON and safetensors cannot run code.

Fault points (:func:`fault_point`) let tests kill the process at each step of a write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fskd.errors import ConfigError, OutputError, StateError

#: environment variable naming a fault point at which the process kills itself (tests only)
FAULT_ENV = "FSKD_FAULT"


def fault_point(name: str) -> None:
    """SIGKILL this process when ``$FSKD_FAULT`` names this point, SIGINT (a Ctrl-C) when it names
    ``POINT@sigint`` (fault-injection tests)."""
    fault = os.environ.get(FAULT_ENV)
    if fault == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == f"{name}@sigint":
        os.kill(os.getpid(), signal.SIGINT)


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
def _pending_name(manifest: str) -> str:
    """The journal naming the files one write is about to create (deleted once committed)."""
    return f".{manifest}.pending"


def meta_digest(meta: dict) -> str:
    """SHA-256 of a manifest's content (sorted-key JSON, without the digest itself): an edited
    manifest no longer matches the digest it carries."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _json_or_none(path: Path) -> object:
    """The JSON in one of fskd's own manifests or journals, read with the manifest bound (regular
    files only: see :func:`read_small_file`); None when it is missing or unreadable."""
    try:
        return json.loads(read_small_file(path, "manifest", MANIFEST_LIMIT, error=StateError))
    except (StateError, ValueError):
        return None


def _committed_name(directory: Path, manifest: str) -> str | None:
    """The tensor file the current manifest names (None when there is none, or it is unreadable)."""
    meta = _json_or_none(directory / manifest)
    name = meta.get("tensors_file") if isinstance(meta, dict) else None
    return name if isinstance(name, str) and Path(name).name == name else None


def _own_leftovers(directory: Path, manifest: str) -> list[str]:
    """The files an interrupted write recorded in its journal (never names a user chose)."""
    names = _json_or_none(directory / _pending_name(manifest))
    if not isinstance(names, list):
        return []
    return [n for n in names if isinstance(n, str) and n and Path(n).name == n and n != manifest]


def write_bundle(directory: Path, manifest: str, stem: str, meta: dict, tensors: dict, point: str = "bundle") -> None:
    """Commit ``meta`` + ``tensors`` into the existing ``directory`` (see the module docstring).
    ``meta`` gets ``tensors_file``, ``tensors_sha256`` and ``meta_sha256``; ``point`` prefixes
    the fault points. Holds an exclusive lock on ``directory`` throughout, so two writers into one
    directory take turns (the second commits after the first, and each deletes only the file the
    manifest named before it and the files its own journal named)."""
    import secrets

    from safetensors.torch import save

    # serialise once, hash those bytes, write them: no read-back of the file to hash it
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    digest = hashlib.sha256(data).hexdigest()
    name = f"{stem}-{digest[:16]}.safetensors"
    with dir_lock(directory):
        previous = _committed_name(directory, manifest)
        stale = _own_leftovers(directory, manifest)
        tmp = directory / f".{stem}-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        # the journal names every file this write may leave behind, before any of them exists
        atomic_write_text(directory / _pending_name(manifest), json.dumps(sorted({*stale, tmp.name, name})))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            fault_point(f"{point}:tensors-written")
            os.replace(tmp, directory / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fault_point(f"{point}:tensors-named")
        meta = {**meta, "tensors_file": name, "tensors_sha256": digest}
        meta["meta_sha256"] = meta_digest(meta)
        atomic_write_text(directory / manifest, json.dumps(meta, indent=2, default=str))
        fault_point(f"{point}:manifest-replaced")
        for n in {previous, *stale}:
            if n and n != name:
                with contextlib.suppress(OSError):
                    (directory / n).unlink()
        with contextlib.suppress(OSError):
            (directory / _pending_name(manifest)).unlink()


#: the largest manifest read (fskd writes a few KiB: metadata, never tensors)
MANIFEST_LIMIT = 16 << 20


def read_bundle(directory: Path, manifest: str, what: str = "state") -> tuple[dict, dict]:
    """``(meta, tensors)`` of a bundle; the manifest must match its own SHA-256 (not edited), the
    tensor file must exist and match its SHA-256, and every float tensor must be finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    mpath = directory / manifest
    try:
        meta = json.loads(read_small_file(mpath, what, MANIFEST_LIMIT, what="JSON manifest", error=StateError))
    except json.JSONDecodeError as e:
        raise StateError(f"{mpath} is not valid JSON ({e}); the {what} is damaged, write it again") from None
    if not isinstance(meta, dict):
        raise StateError(f"{mpath} must hold a JSON object, got {type(meta).__name__}")
    stored = meta.get("meta_sha256")
    if stored is None:
        raise StateError(
            f"{mpath} carries no content hash (meta_sha256): it was written by an older fskd or edited; "
            f"write the {what} again"
        )
    if stored != meta_digest(meta):
        raise StateError(
            f"{mpath} was changed since fskd wrote it (its content no longer matches its meta_sha256); "
            f"write the {what} again"
        )
    meta.pop("meta_sha256")
    name, digest = meta.pop("tensors_file", None), meta.pop("tensors_sha256", None)
    if name is None:
        raise StateError(f"{mpath} names no tensor file (key 'tensors_file'); the {what} is damaged, write it again")
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
        raise StateError(
            f"{what} {directory}: {tpath} does not match the SHA-256 in {mpath} (truncated or "
            f"changed since it was written); write the {what} again"
        )
    try:
        tensors = load(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise StateError(f"{what} {directory}: cannot read {tpath}: {e}") from None
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise StateError(
            f"{what} {directory}: tensor(s) {', '.join(sorted(bad)[:5])} in {tpath.name} hold non-finite "
            f"values (NaN or inf); the fit diverged or the file was forged. Write the {what} again"
        )
    return meta, tensors


def remove_bundle(directory: Path, manifest: str, stem: str, extra: tuple[str, ...] = ()) -> None:
    """Delete a bundle's own files (the manifest, the tensor file it names, the files its journal
    names, ``extra`` names) and the directory if nothing else is left in it; files fskd did not
    write there stay, even ones named like fskd's."""
    if not directory.is_dir():
        return
    with dir_lock(directory):
        own = {_committed_name(directory, manifest), *_own_leftovers(directory, manifest)}
        for n in (*own, _pending_name(manifest), manifest, *extra):
            if n:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
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
        raise OutputError(
            f"{option} {path}: takes a local directory (only --store takes a URL: states, reports "
            f"and bench folders are small and are committed by atomic renames, which object storage "
            f"lacks; copy them there afterwards)"
        )


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
        attrs = json.loads(meta.read_text(encoding="utf-8")).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attrs, dict) and attrs.get("format") == "fskd-feature-store"


def store_containing(path: str | Path) -> Path | None:
    """The fskd feature store that ``path`` is (or lies inside), if any."""
    p = Path(path).expanduser().absolute().resolve()
    return next((a for a in (p, *p.parents) if a.is_dir() and is_store_dir(a)), None)


def guard_output_dir(
    path: str | Path,
    option: str,
    marker_file: str,
    is_ours,
    force: bool,
    protect: tuple[tuple[str, str | Path | None], ...] = (),
) -> Path:
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
            other = other[len("file://") :]
        o = Path(other).expanduser().resolve()
        if resolved == o or o.is_relative_to(resolved) or resolved.is_relative_to(o):
            raise OutputError(
                f"{option} {path} overlaps {other_opt} {other}; write the output somewhere else (nothing was changed)"
            )
    inside = store_containing(resolved)
    if inside is not None:
        raise OutputError(f"{option} {path} is inside the feature store {inside}; write the output somewhere else")
    for anc in resolved.parents:
        if anc.is_dir() and is_ours(anc):
            raise OutputError(f"{option} {path} is inside the fskd output {anc}; write the output somewhere else")
    if p.exists() or p.is_symlink():
        if p.is_symlink() or not p.is_dir():
            raise OutputError(
                f"{option} {path} exists and is not a directory; fskd replaces only its own "
                f"output directories (nothing was changed)"
            )
        if not is_ours(p):
            what = "a feature store" if is_store_dir(p) else f"not an fskd output (no {marker_file} written by fskd)"
            raise OutputError(
                f"{option} {path} exists and is {what}; fskd will not replace it. "
                f"Choose a new path (nothing was changed)"
            )
        if not force:
            raise OutputError(
                f"{option} {path} already holds an fskd output; pass --force to replace it, or choose another path"
            )
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


def parse_json_file(path: str | Path, option: str, limit: int | None = None) -> object:
    """Read a JSON file given to an option (read with a bound, see :func:`read_small_file`);
    every failure is a ConfigError naming the file."""
    text = read_small_file(path, option, limit or SMALL_FILE_LIMIT, what="JSON file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{option} file {path} is not valid JSON: {e}") from None
    except RecursionError:  # [[[[... nested deeper than the parser's stack
        raise ConfigError(f"{option} file {path} is nested too deeply to be the JSON file expected") from None


#: the most bytes read from a small file given to an option (--class-split, --descriptions,
#: --templates, --grid, reports, configs): they hold kilobytes, so this only stops a wrong file
SMALL_FILE_LIMIT = 64 << 20
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
    (stat.S_ISSOCK, "a socket"),
)


def read_small_file(
    path: str | Path,
    option: str,
    limit: int = SMALL_FILE_LIMIT,
    what: str = "file",
    error: type[Exception] = ConfigError,
    errors: str = "strict",
) -> str:
    """The UTF-8 text of a small input file given to ``option``, read with a bound. Refused with
    ``error`` naming the option and the path (and the bound): a missing or unreadable file, one
    that is not a regular file (a directory, a FIFO, a device such as /dev/zero, which would be
    read until memory runs out), one over ``limit`` bytes, or (``errors="strict"``) one not UTF-8."""

    def fail(why: str, bound: bool = False) -> Exception:
        expected = f"a {what} of at most {limit / 2**20:g} MiB" if bound else f"a {what}"
        return error(f"{option} {path}: {why} (expected {expected})")

    def check(mode: int) -> None:
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in _KINDS if test(mode)), "of another kind")
            raise fail(f"is {kind}, not a regular file", bound=True)

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise fail("does not exist") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise fail(f"cannot be read: {getattr(e, 'strerror', None) or e}") from None
    check(mode)  # before opening: opening a device or a FIFO can block or act
    try:
        # O_NONBLOCK: a FIFO swapped in since the check cannot block the open; fstat judges what was opened
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise fail(f"cannot be read: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        check(st.st_mode)
        if st.st_size > limit:
            raise fail(f"holds {st.st_size / 2**20:.1f} MiB, too much; is it the right file?", bound=True)
        try:
            data = f.read(limit + 1)  # + 1: a file that grew since fstat is still caught
        except OSError as e:
            raise fail(f"cannot be read: {e.strerror or e}") from None
    if len(data) > limit:
        raise fail(f"holds more than {limit / 2**20:g} MiB, too much; is it the right file?", bound=True)
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        raise fail(f"is not UTF-8 text ({e.reason} at byte {e.start})") from None
