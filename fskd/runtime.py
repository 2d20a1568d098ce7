"""The one place for device choice, autocast, seeds, CPU threads and torch.distributed set-up.

torch is imported inside the functions, so :func:`cpu_thread_policy` can run before torch loads
(OpenMP reads ``OMP_WAIT_POLICY`` once, when torch starts its threads).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fskd.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger(__name__)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def cpu_thread_policy() -> None:
    """The command line's CPU policy. Before torch loads: idle OpenMP threads sleep instead of
    spinning (``OMP_WAIT_POLICY=PASSIVE`` unless the user set it); spinning threads of two jobs
    on a shared 2-core machine made a 2-epoch distillation take 4 min 16 s instead of 1 min 47 s.
    After: torch uses one intra-op thread per core this process may run on (unless
    ``OMP_NUM_THREADS`` says otherwise), not the machine's whole core count."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def torch_threads_per_core() -> None:
    """The second half of :func:`cpu_thread_policy`, once torch is imported."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    torch.set_num_threads(available_cores())


#: a loop whose steps multiply fewer than this many scalars runs on one thread (see single_thread)
SMALL_STEP_WORK = 5e7

#: feature values (rows x dim) of a store under which fits and evaluation run on one thread
SMALL_PROBLEM = 2**24


@contextlib.contextmanager
def single_thread(work: float = 0.0) -> Iterator[None]:
    """Run a loop of many tiny tensor ops on one intra-op thread, then restore the setting.

    Thread synchronisation costs more than tiny ops gain from it, and on a busy machine it
    costs a lot: a 100-step probe on 300 episodes measured 0.6 s on 1 thread and 3-15 s on 2.
    ``work``: multiply-adds of one step; at or above :data:`SMALL_STEP_WORK` (an all-way probe of
    16 shots x 1,000 classes) the ops are large and keep every thread.
    """
    import torch

    n = torch.get_num_threads()
    if work >= SMALL_STEP_WORK:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (0: unchanged), restoring the setting after."""
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(old)


@contextlib.contextmanager
def compute_threads(numel: int) -> Iterator[None]:
    """One intra-op thread for a problem of fewer than :data:`SMALL_PROBLEM` feature values, else
    unchanged: on a busy 2-core machine two threads fighting over the cores made small fits 2-5x
    slower (fskd.methods.adapt.method has the measurements)."""
    if numel < SMALL_PROBLEM:
        with single_thread():
            yield
    else:
        yield


def store_numel(store) -> int:
    """Feature values (rows of every sample split x dim) of a feature store."""
    return sum(store.n_rows(s) for s in store.splits) * store.dim


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; explicit names are validated."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"--device {device!r} is not a torch device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r} asked for CUDA but no CUDA device is available")
    return dev


def autocast(device: torch.device, enabled: bool = True):
    """bfloat16/float16 autocast on CUDA; a no-op context on CPU (CPU autocast is slower here)."""
    import torch

    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def generator(seed: int) -> np.random.Generator:
    import numpy as np

    return np.random.default_rng(seed)


def num_workers(requested: int | None = None) -> int:
    """DataLoader workers: the request, else one per available core (at most 8)."""
    if requested is not None:
        return max(0, requested)
    return min(8, available_cores())


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank information from the torchrun environment (single process when absent)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_distributed(device: torch.device) -> DistInfo:
    """Initialise the process group when launched by torchrun; returns rank info."""
    import torch

    info = dist_info()
    if info.world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
    return info


def barrier() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def set_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)
