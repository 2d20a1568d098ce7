"""Small helpers shared by the benchmark scripts (timing, tables, machine description)."""

from __future__ import annotations

import os
import platform
import resource
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = ROOT.parent / "shared" / "data"


def with_recipes(methods) -> list[str]:
    """Each method, then ``METHOD:recipe=NAME`` for each of its other recipes (``--set recipe=NAME``;
    the first recipe, the published one, is the default): a benchmark over the registry runs every
    recipe. ``parse_variant`` reads the spelling back."""
    from fskd.methods import METHODS

    out = []
    for m in methods:
        out.append(m)
        out += [f"{m}:recipe={r}" for r in list(getattr(METHODS.get(m), "recipes", {}))[1:]]
    return out


def parse_variant(spec: str) -> tuple[str, dict]:
    """ "tip-adapter-f:form=span" -> ("tip-adapter-f", {"form": "span"}); several options are
    separated by ";" (values stay strings; the method's options parse them)."""
    name, _, rest = spec.partition(":")
    return name, dict(kv.split("=", 1) for kv in rest.split(";") if kv)


def machine() -> str:
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {cores} cores, {gpu}, torch {torch.__version__}"


@contextmanager
def timer(out: dict, key: str):
    t0 = time.perf_counter()
    yield
    out[key] = time.perf_counter() - t0


def best_of(fn, repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls (the least disturbed by other load)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory of this process and of its finished children, in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, kids


def table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "\n".join("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows)


def cub35_store(arg: str | None = None, data_root: Path = DATA_ROOT) -> str:
    """The cub35 lite0-minilm store: ``arg`` when given, else the one the tests cache (built from
    ``data_root/cub35`` when missing)."""
    from fskd import api
    from fskd.config import ExtractConfig

    if arg:
        return arg
    cached = ROOT / ".pytest_cache" / "fskd-stores" / "cub-lite0-minilm.zarr"
    if not cached.exists():
        data = Path(data_root) / "cub35"
        if not data.exists():
            raise SystemExit(f"no cub35 store at {cached} and no data at {data}: pass --store")
        api.extract(ExtractConfig(dataset="cub", root=str(data), encoder="lite0-minilm", store=str(cached)))
    return str(cached)
