"""Where a feature store lives: a local path, or a URL on object storage (fsspec + zarr v3).

``--store`` takes a plain path (or ``file://``) or a URL that fsspec understands:
``s3://bucket/path.zarr`` (s3fs: AWS S3 and S3-compatible servers), ``gs://`` (gcsfs), ``az://``
/ ``abfs://`` (adlfs), ``memory://`` (one process, for tests and notebooks). Remote stores are
read and written through zarr's ``FsspecStore``; local ones through zarr's ``LocalStore`` as
before, so nothing changes for a path.

Credentials and endpoints come from the usual environment variables of each backend
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``,
``GOOGLE_APPLICATION_CREDENTIALS``, ...), and from storage options passed to fsspec:
``--storage-options JSON`` on the command line, ``$FSKD_STORAGE_OPTIONS`` (JSON, for every fskd
process, torchrun ranks included) or :func:`configure` from Python. Storage options are never
written into a store, a state or a report (they may hold secrets).

Reads of a remote store keep at most ``max_requests`` chunk requests in flight
(``{"fskd_max_requests": N}`` in the storage options or ``$FSKD_MAX_REQUESTS``; default 8): the
readers ask zarr for that many row chunks at a time, and zarr's own ``async.concurrency`` is set to
the same bound.

Every remote call is bounded (issue 29): an endpoint that stops answering fails the command with
one error naming the URL instead of hanging it. The defaults (``_TIMEOUTS``), each overridden by an
explicit storage option of the same name:

- s3 (s3fs/botocore): ``config_kwargs`` ``connect_timeout`` 5 s, ``read_timeout`` 30 s (the longest
  wait for the next bytes of an answer) and ``retries`` ``{"total_max_attempts": 2, "mode":
  "standard"}`` (botocore's tries of one request), plus ``retries`` 2: s3fs's own tries of one
  call (they also cover an answer whose body stopped arriving). So one call gives up after at most
  4 tries, about 2 minutes of silence; an endpoint that refuses connections fails at once.
- gs (gcsfs): ``requests_timeout`` 60 s, the whole of one HTTP request; gcsfs tries each request up
  to 6 times (fixed in gcsfs, with back-off up to 32 s), so about 7 minutes at worst.
- az / abfs (adlfs): ``connection_timeout`` 5 s and ``read_timeout`` 30 s; the retries are the Azure
  SDK's own (3, exponential back-off), which adlfs does not expose.

For example ``--storage-options '{"config_kwargs": {"read_timeout": 120}, "retries": 3}'`` gives a
slow S3-compatible server more time.

Those bounds cover waiting for an answer, not a request whose upload stalls (the endpoint stops
reading the body): botocore's read timeout never starts and zarr waits on its array calls with no
timeout of its own. So every write to a remote store is bounded as a whole (``arrays.write``):
``CALL_BOUND_FACTOR`` times one request's worst case above (s3:
(connect + read timeout) x tries, 7 minutes by default; gs: requests timeout x 7; az:
(connection + read timeout) x 4), or ``{"fskd_call_timeout": SECONDS}`` in the storage options.
A write still running then is cancelled and fails the command with the same "stopped answering"
error; a rerun resumes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fskd.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem
    from zarr.storage import FsspecStore

#: environment variables read for storage options (JSON) and the read bound
OPTIONS_ENV, REQUESTS_ENV = "FSKD_STORAGE_OPTIONS", "FSKD_MAX_REQUESTS"
DEFAULT_MAX_REQUESTS = 8
#: schemes and the package (fskd extra) that handles them; fsspec knows more, these are the tested ones
BACKENDS = {
    "s3": ("s3fs", "fskd[s3]"),
    "s3a": ("s3fs", "fskd[s3]"),
    "gs": ("gcsfs", "fskd[gcs]"),
    "gcs": ("gcsfs", "fskd[gcs]"),
    "az": ("adlfs", "fskd[azure]"),
    "abfs": ("adlfs", "fskd[azure]"),
    "memory": ("fsspec", "fskd"),
}
#: bounded waits and tries per backend (module docstring); a user's option of the same name wins.
#: s3's ``retries`` is s3fs's tries of one call: not an S3FileSystem argument, set on the instance
_S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {
        "connect_timeout": 5,
        "read_timeout": 30,
        "retries": {"total_max_attempts": 2, "mode": "standard"},
    },
    "retries": 2,
}
_TIMEOUTS: dict[str, dict[str, Any]] = {
    "s3": _S3_DEFAULTS,
    "s3a": _S3_DEFAULTS,
    "gs": {"requests_timeout": 60},
    "gcs": {"requests_timeout": 60},
    "az": {"connection_timeout": 5, "read_timeout": 30},
    "abfs": {"connection_timeout": 5, "read_timeout": 30},
}
#: storage options fskd applies to the filesystem instance instead of passing them to its constructor
_INSTANCE_OPTIONS = {"s3": ("retries",), "s3a": ("retries",)}

_configured: dict[str, Any] | None = None


def is_url(spec: str | Path | Location) -> bool:
    return isinstance(spec, str) and "://" in spec


def absolute_store(spec: str | Path) -> str:
    """A store's name that finds it again from any working directory: the URL, or the absolute path."""
    loc = Location(spec)
    return loc.url if loc.url is not None else str(loc.local_path.expanduser().absolute())


def configure(options: dict[str, Any] | str | None) -> None:
    """Storage options for every remote store this process opens (``--storage-options``): a dict,
    a JSON object text, or None to fall back to ``$FSKD_STORAGE_OPTIONS``."""
    global _configured
    _configured = None if options is None else _parse_options(options, "--storage-options")
    reset()


def configured() -> dict[str, Any] | None:
    """The storage options given to :func:`configure` (None: ``$FSKD_STORAGE_OPTIONS`` applies)."""
    return None if _configured is None else dict(_configured)


def reset() -> None:
    """Forget cached filesystems (they hold credentials and endpoints read when first made)."""
    _fs.cache_clear()
    import sys

    if "fsspec" in sys.modules:
        for cls in list(_fs_classes()):
            cls.clear_instance_cache()


def _fs_classes() -> Iterator[type[AbstractFileSystem]]:
    import fsspec

    for scheme in ("s3", "gs", "az", "memory"):
        try:
            yield fsspec.get_filesystem_class(scheme)
        except (ImportError, ValueError):
            continue


def _parse_options(options: dict[str, Any] | str, where: str) -> dict[str, Any]:
    if isinstance(options, dict):
        return dict(options)
    try:
        value = json.loads(options)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f'{where} must be a JSON object like \'{{"endpoint_url": "http://host:9000"}}\': {e}'
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _user_options() -> dict[str, Any]:
    """The options given to :func:`configure`, else ``$FSKD_STORAGE_OPTIONS``'s, else none."""
    if _configured is not None:
        return _configured
    env = os.environ.get(OPTIONS_ENV)
    return _parse_options(env, f"${OPTIONS_ENV}") if env else {}


def _s3_tries(opts: dict[str, Any]) -> int:
    """Tries of one s3 call: botocore's attempts of one request x s3fs's tries of the call."""
    r = opts["config_kwargs"].get("retries") or {}
    return int(r.get("total_max_attempts", r.get("max_attempts", 0) + 1)) * int(opts.get("retries", 1))


def storage_options(protocol: str) -> dict[str, Any]:
    """The fsspec options for ``protocol``: fskd's timeouts and retries (module docstring), under
    the configured or ``$FSKD_STORAGE_OPTIONS`` ones (without fskd's own ``fskd_*`` keys)."""
    user = _user_options()
    base = dict(_TIMEOUTS.get(protocol, {}))
    opts = {**base, **{k: v for k, v in user.items() if not k.startswith("fskd_")}}
    if "config_kwargs" in base and isinstance(user.get("config_kwargs"), dict):  # the user's botocore config over ours
        opts["config_kwargs"] = {**base["config_kwargs"], **user["config_kwargs"]}
    return opts


def _split_options(protocol: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``storage_options(protocol)`` as (constructor arguments, attributes to set on the instance)."""
    opts = storage_options(protocol)
    attrs = {k: opts.pop(k) for k in _INSTANCE_OPTIONS.get(protocol, ()) if k in opts}
    for k, v in attrs.items():
        if k == "retries" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"storage option {k!r} must be a positive integer (tries of one call), got {v!r}")
    return opts, attrs


def _more_time(protocol: str) -> str:
    if protocol in ("s3", "s3a"):
        return """ '{"config_kwargs": {"read_timeout": 120}, "retries": 3}'"""
    return next(
        (f""" '{{"{k}": 120}}'""" for k in ("read_timeout", "requests_timeout") if k in _TIMEOUTS.get(protocol, {})), ""
    )


def _timeout_text(protocol: str) -> str:
    """The configured bound of one call, for messages: ``read timeout 30 s, 4 tries``."""
    opts = storage_options(protocol)
    if "config_kwargs" in opts:
        try:
            return f"read timeout {opts['config_kwargs'].get('read_timeout')} s, {_s3_tries(opts)} tries"
        except (AttributeError, TypeError, ValueError):
            return "the configured timeouts"
    for k in ("read_timeout", "requests_timeout"):
        if k in opts:
            return f"{k.replace('_', ' ')} {opts[k]} s"
    return "the backend's timeouts"


#: a write (one batch of chunk requests) is abandoned after this many times one request's bound
CALL_BOUND_FACTOR = 3


class StalledWrite(TimeoutError):
    """A write to object storage that did not finish within :func:`call_timeout` (raised by
    ``arrays.write``; :func:`backend_errors` names it as the storage that stopped answering)."""


def call_timeout(protocol: str) -> float | None:
    """Seconds after which one write to a ``protocol`` store is abandoned as stalled
    (module docstring), None for a backend without request bounds (memory://)."""
    user = _user_options()
    if "fskd_call_timeout" in user:
        v = user["fskd_call_timeout"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(f"storage option 'fskd_call_timeout' must be a positive number of seconds, got {v!r}")
        return float(v)
    opts = storage_options(protocol)
    try:
        if "config_kwargs" in opts:
            cfg = opts["config_kwargs"]
            one = float(cfg.get("connect_timeout", 0)) + float(cfg["read_timeout"])
            return float(CALL_BOUND_FACTOR * one * _s3_tries(opts))
        if "requests_timeout" in opts:
            return CALL_BOUND_FACTOR * float(opts["requests_timeout"]) * 7  # gcsfs: 6 retries
        if "read_timeout" in opts:
            return CALL_BOUND_FACTOR * (float(opts["read_timeout"]) + float(opts.get("connection_timeout", 0))) * 4
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return None


def store_call_timeout(store: object) -> float | None:
    """:func:`call_timeout` for a zarr store: its fsspec filesystem's protocol; None for a local one."""
    fs = getattr(store, "fs", None)
    if fs is None:
        return None
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return call_timeout(proto)


def max_requests() -> int:
    user = _configured or {}
    n = user.get("fskd_max_requests")
    if n is None:
        n = os.environ.get(REQUESTS_ENV) or DEFAULT_MAX_REQUESTS
    try:
        n = int(n)
    except (TypeError, ValueError):
        raise ConfigError(f"fskd_max_requests / ${REQUESTS_ENV} must be a positive integer, got {n!r}") from None
    if n < 1:
        raise ConfigError(f"fskd_max_requests / ${REQUESTS_ENV} must be a positive integer, got {n}")
    return n


def working_schemes() -> list[str]:
    """The URL schemes this installation can open (their backend package imports)."""
    import importlib.util

    out = ["file"]
    for scheme, (module, _) in BACKENDS.items():
        if importlib.util.find_spec(module) is not None:
            out.append(scheme)
    return out


class Location:
    """A store's place: ``local`` (a Path) or ``url`` (remote). ``str()`` gives what to show."""

    def __init__(self, spec: str | Path) -> None:
        self.spec = str(spec)
        self.local: Path | None = None
        self.url: str | None = None
        if not is_url(spec):
            self.local = Path(spec)
            self.protocol = "file"
            return
        scheme, _, rest = self.spec.partition("://")
        scheme = scheme.lower()
        if scheme == "file":
            self.local = Path(rest)
            self.protocol = "file"
            return
        if not rest.strip("/"):
            raise StoreError(f"--store {spec}: the URL names no bucket or path")
        self.protocol = scheme
        self.url = f"{scheme}://{rest.rstrip('/')}"
        _check_scheme(scheme, self.spec)

    @property
    def is_remote(self) -> bool:
        return self.url is not None

    def __str__(self) -> str:
        return self.url or str(self.local)

    def __repr__(self) -> str:
        return f"Location({self!s})"

    @property
    def local_path(self) -> Path:
        """``local``, for code that reached a local store's branch (a remote location has none)."""
        assert self.local is not None, f"{self} is not a local path"
        return self.local

    @property
    def remote_url(self) -> str:
        """``url``, for code that reached a remote store's branch (a local location has none)."""
        assert self.url is not None, f"{self} is not a URL"
        return self.url

    # -- remote access -------------------------------------------------------------------------
    def fs(self) -> AbstractFileSystem:
        """The (synchronous) fsspec filesystem of a remote location."""
        opts, attrs = _split_options(self.protocol)
        return _fs(self.protocol, json.dumps(opts, sort_keys=True), json.dumps(attrs, sort_keys=True))

    @property
    def root(self) -> str:
        """The remote path without the scheme (``bucket/path.zarr``), as fsspec names it."""
        return self.remote_url.split("://", 1)[1]

    def zarr_store(self, read_only: bool) -> FsspecStore:
        """zarr's ``FsspecStore`` over a remote location (a local store is opened by its path)."""
        import zarr

        _set_concurrency()
        opts, attrs = _split_options(self.protocol)
        with remote_errors(self):
            store = zarr.storage.FsspecStore.from_url(self.remote_url, storage_options=opts, read_only=read_only)
        for k, v in attrs.items():  # s3fs's tries of one call (not a constructor argument)
            setattr(store.fs, k, v)
        return store

    def exists(self) -> bool:
        """Whether something is at the location: for a URL, its root ``zarr.json`` object."""
        if self.local is not None:
            return self.local.exists()
        with remote_errors(self):
            return bool(self.fs().exists(f"{self.root}/zarr.json"))

    def root_attrs(self) -> dict[str, Any] | None:
        """The attributes in the root ``zarr.json`` (None when it is absent or not JSON)."""
        try:
            if self.local is not None:
                text = (self.local / "zarr.json").read_text(encoding="utf-8")
            else:
                with remote_errors(self):
                    text = self.fs().cat_file(f"{self.root}/zarr.json").decode()
            attrs = json.loads(text).get("attributes", {})
        except (OSError, ValueError, AttributeError):
            return None
        return attrs if isinstance(attrs, dict) else None

    def first_objects(self, limit: int = 3) -> list[str]:
        """Up to ``limit`` names directly under a remote location (objects or sub-prefixes; to refuse
        a prefix that holds objects fskd did not write). One listing level, not the whole tree."""
        with remote_errors(self):
            fs = self.fs()
            try:
                names = sorted(fs.ls(self.root, detail=False))
            except FileNotFoundError:
                return []
            finally:
                fs.invalidate_cache()
        return [n[len(self.root) + 1 :] for n in names[:limit]]

    def probe(self) -> None:
        """Reach the location once (bucket exists, credentials work), turning failures into a
        StoreError that names the URL; a path is not probed."""
        if self.local is not None:
            return
        with remote_errors(self):
            fs = self.fs()
            try:  # a listing raises on a missing bucket, bad credentials or an unreachable endpoint
                fs.ls(self.root, detail=False)  # (``exists`` answers False to all three)
            except FileNotFoundError as e:
                if _missing_bucket(e):
                    raise
            finally:
                fs.invalidate_cache()

    def root_object(self) -> tuple[bytes | None, str | None]:
        """The root ``zarr.json`` of a remote location, fresh (no cache): (bytes, ETag), or
        (None, None) when absent. The ETag is read first, so it never names a newer object than
        the bytes (a conditional PUT with it then fails, as it should); None where the backend
        gives none."""
        path = f"{self.root}/zarr.json"
        with remote_errors(self):
            fs = self.fs()
            fs.invalidate_cache()
            try:
                info = fs.info(path)
                data = fs.cat_file(path)
            except FileNotFoundError:
                return None, None
        return data, info.get("ETag") or info.get("etag")

    def put_root(self, data: bytes, *, if_absent: bool = False, if_etag: str | None = None) -> str | None:
        """PUT the root ``zarr.json`` of a remote location in one request; returns its new ETag
        (None where the backend gives none). ``if_absent``: only where no root exists (S3
        ``If-None-Match: *``, gcsfs and memory ``mode="create"``); ``if_etag``: only over that
        version of it (S3 ``If-Match``; unconditional elsewhere). A condition that does not hold
        raises :class:`ConditionFailed`."""
        path = f"{self.root}/zarr.json"
        kw: dict[str, Any] = {}
        if if_absent and self.protocol in _CREATE_MODE:
            kw["mode"] = "create"
        if if_etag and self.protocol in ("s3", "s3a"):
            kw["IfMatch"] = if_etag
        with remote_errors(self):
            fs = self.fs()
            try:
                out = fs.pipe_file(path, data, **kw)
            except FileExistsError:
                if not kw:
                    raise
                raise ConditionFailed(path) from None
            except OSError as e:
                if "IfMatch" in kw and (isinstance(e, FileNotFoundError) or _precondition_failed(e)):
                    raise ConditionFailed(path) from None
                raise
            finally:
                fs.invalidate_cache()
        return out.get("ETag") if isinstance(out, dict) else None

    def remove_all_but_root(self) -> int:
        """Delete every object under a remote location except its root ``zarr.json`` (the leftover
        of fskd's own unfinished creation, whose root marker it holds); returns how many."""
        with remote_errors(self):
            fs = self.fs()
            keep = fs._strip_protocol(f"{self.root}/zarr.json")  # as the backend names it (memory: a leading /)
            fs.invalidate_cache()
            try:
                names = [n for n in fs.find(self.root) if fs._strip_protocol(n).rstrip("/") != keep]
                if names:
                    fs.rm(names)
            finally:
                fs.invalidate_cache()
        return len(names)

    def size(self) -> int:
        if self.local is not None:
            return sum(f.stat().st_size for f in self.local.rglob("*") if f.is_file())
        with remote_errors(self):
            return int(self.fs().du(self.root))


class ConditionFailed(Exception):
    """A conditional PUT (:meth:`Location.put_root`) found the object other than expected."""


#: backends whose ``pipe_file`` takes ``mode="create"`` (a PUT only where no object exists)
_CREATE_MODE = ("s3", "s3a", "gs", "gcs", "memory")


def _precondition_failed(e: BaseException) -> bool:
    """An S3 answer 412 (PreconditionFailed) or 409 (ConditionalRequestConflict: another
    conditional write to the key was in flight), as s3fs raises them."""
    cause = e.__cause__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def _endpoint(loc: Location) -> str:
    opts = storage_options(loc.protocol)
    ep = (
        (
            opts.get("endpoint_url")
            or opts.get("client_kwargs", {}).get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        if loc.protocol.startswith("s3")
        else None
    )
    return f" at endpoint {ep}" if ep else ""


def _check_scheme(scheme: str, spec: str) -> None:
    import fsspec

    works = ", ".join(f"{s}://" for s in working_schemes())
    if scheme in BACKENDS:
        module, extra = BACKENDS[scheme]
        import importlib.util

        if importlib.util.find_spec(module) is None:
            raise StoreError(
                f"--store {spec}: {scheme}:// needs the {module} package (pip install '{extra}'); "
                f"schemes that work here: {works}"
            )
        return
    try:
        fsspec.get_filesystem_class(scheme)
    except (ValueError, ImportError) as e:
        raise StoreError(
            f"--store {spec}: no storage backend handles {scheme}:// ({e}); schemes that work here: "
            f"{works} and plain paths"
        ) from None


@functools.lru_cache(maxsize=16)
def _fs(protocol: str, options_json: str, attrs_json: str = "{}") -> AbstractFileSystem:
    import fsspec

    fs = fsspec.filesystem(protocol, **json.loads(options_json))
    for k, v in json.loads(attrs_json).items():
        setattr(fs, k, v)
    return fs


def _set_concurrency() -> None:
    import zarr

    n = max_requests()
    if zarr.config.get("async.concurrency") != n:
        zarr.config.set({"async.concurrency": n})


def _credential_errors() -> tuple[type[BaseException], ...]:
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        return (NoCredentialsError, PartialCredentialsError)
    except ImportError:
        return ()


def _connection_errors() -> tuple[type[BaseException], ...]:
    out: list[type[BaseException]] = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

        out += [EndpointConnectionError, ConnectTimeoutError]
    with contextlib.suppress(ImportError):
        import aiohttp

        out.append(aiohttp.ClientConnectionError)
    return tuple(out)


def _timeout_errors() -> tuple[type[BaseException], ...]:
    """A call that got no answer in time, after its retries (botocore, aiohttp, fsspec's sync)."""
    out: list[type[BaseException]] = [TimeoutError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import ReadTimeoutError

        out.append(ReadTimeoutError)
    with contextlib.suppress(ImportError):
        from fsspec.exceptions import FSTimeoutError

        out.append(FSTimeoutError)
    with contextlib.suppress(ImportError):
        import aiohttp

        out.append(aiohttp.ServerTimeoutError)
    return tuple(out)


#: packages whose exceptions only a storage backend raises (backend_errors)
_BACKEND_MODULES = ("botocore", "aiobotocore", "s3fs", "aiohttp", "gcsfs", "google.auth", "adlfs", "azure", "fsspec")


def _from_backend(e: BaseException | None) -> bool:
    """Whether ``e``, or an exception it was raised from (``raise ... from``: s3fs's translated
    errors), comes from a storage backend package."""
    for _ in range(8):
        if e is None:
            return False
        if isinstance(e, StalledWrite):
            return True
        mod = type(e).__module__
        if any(mod == m or mod.startswith(f"{m}.") for m in _BACKEND_MODULES):
            return True
        e = e.__cause__
    return False


@contextlib.contextmanager
def backend_errors(spec: str | Path | Location) -> Iterator[None]:
    """:func:`remote_errors` for code that also does local work (``fskd extract`` into a URL): an
    error the storage backend raised (a timeout, a refused connection, a denied request) becomes one
    StoreError naming the URL; anything else, local OSErrors included, passes through unchanged."""
    try:
        yield
    except StoreError:
        raise
    except Exception as e:
        if not (is_url(spec) or isinstance(spec, Location)) or not _from_backend(e):
            raise
        loc = spec if isinstance(spec, Location) else Location(spec)
        if not loc.is_remote:
            raise
        try:
            with remote_errors(loc):
                raise
        except (StoreError, FileNotFoundError):  # a missing object: as it was
            raise
        except Exception as other:  # a backend error remote_errors has no words for: still one line
            raise StoreError(f"--store {loc}: storage error ({type(other).__name__}: {other})") from None


def raise_if_backend(loc: Location, e: BaseException) -> None:
    """Raise ``e`` as one StoreError naming the URL when the storage backend raised it (a timeout, a
    refused connection, a denied request): that is the network, not damage of the store, so a
    reader must not report (or an extract re-encode) the chunk as damaged. Returns otherwise."""
    if loc.is_remote and _from_backend(e):
        with backend_errors(loc):
            raise e


def _missing_bucket(e: OSError) -> bool:
    text = str(e).lower()
    return "bucket" in text and ("not exist" in text or "nosuchbucket" in text or "not found" in text)


@contextlib.contextmanager
def remote_errors(loc: Location) -> Iterator[None]:
    """Turn a backend's exception into a StoreError naming the URL and what to do."""
    try:
        yield
    except StoreError:
        raise
    except _credential_errors() as e:
        raise StoreError(
            f"--store {loc}: no credentials for {loc.protocol}:// ({e}); set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass --storage-options "
            f'\'{{"key": ..., "secret": ...}}\' (or \'{{"anon": true}}\' for a public bucket)'
        ) from None
    except _timeout_errors() as e:
        raise StoreError(
            f"--store {loc}: the storage{_endpoint(loc)} stopped answering ({_timeout_text(loc.protocol)}; "
            f"{type(e).__name__}: {e}); check the endpoint and the network, or allow more with "
            f"--storage-options{_more_time(loc.protocol)}"
        ) from None
    except _connection_errors() as e:
        raise StoreError(
            f"--store {loc}: cannot reach the storage{_endpoint(loc)} ({type(e).__name__}: {e}); check "
            f"the endpoint (AWS_ENDPOINT_URL or --storage-options '{{\"endpoint_url\": ...}}') and the "
            f"network"
        ) from None
    except PermissionError as e:
        raise StoreError(f"--store {loc}: access denied ({e}); check the credentials and the bucket's policy") from None
    except OSError as e:
        if _missing_bucket(e):
            bucket = loc.root.split("/", 1)[0]
            raise StoreError(
                f"--store {loc}: bucket {bucket!r} does not exist{_endpoint(loc)} (create it first; fskd "
                f"does not create buckets)"
            ) from None
        if isinstance(e, FileNotFoundError):
            raise
        raise StoreError(f"--store {loc}: storage error ({type(e).__name__}: {e})") from None
