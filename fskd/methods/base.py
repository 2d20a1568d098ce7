"""Method states and the method registry.

A method (distill, adapt or align) is fitted on a feature store and saves a *state directory*:

```
DIR/
  state.json           method, kind, the store's path and fingerprint, encoder, config,
                       hyper-parameters and which split chose each, metrics, versions
  state.safetensors    the learned tensors (bridge, weights, networks)
```

``fskd eval --store S --state DIR`` loads the state, checks it belongs to S, and asks the
method for a :class:`~fskd.classifiers.base.Head`. Writes are atomic: the directory is built
beside DIR and renamed into place, so an interrupted run never leaves a half-written state.
"""

from __future__ import annotations

import json
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fskd import __version__
from fskd.errors import StateError
from fskd.registry import Registry

if TYPE_CHECKING:
    from fskd.classifiers.base import Head
    from fskd.store import FeatureStore

#: progress(stage, step, total, {"loss": ..., ...}) for training loops; the CLI draws the bar
TrainProgress = Callable[[str, int, int, dict], None]

STATE_VERSION = 1
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
KINDS = ("distill", "adapt", "align")


@dataclass
class MethodState:
    method: str
    kind: str
    store_path: str
    store_fingerprint: str
    encoder: str
    config: dict
    hparams: dict = field(default_factory=dict)
    #: hyper-parameter -> where it was chosen ("val split", "val classes", "fixed")
    selected_on: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    created: str = ""
    fskd_version: str = __version__
    state_version: int = STATE_VERSION

    def info(self) -> dict:
        d = asdict(self)
        d.pop("tensors")
        return d


def save_state(directory: str | Path, state: MethodState) -> Path:
    """Write ``state`` to ``directory`` atomically (replacing an older state there)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state.created = state.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
    (tmp / STATE_JSON).write_text(json.dumps(state.info(), indent=2, default=str))
    save_file({k: v.detach().cpu().contiguous() for k, v in state.tensors.items()}, str(tmp / STATE_TENSORS))
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.rename(directory, old)
    os.rename(tmp, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def load_state(directory: str | Path) -> MethodState:
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = directory / STATE_JSON
    if not meta.exists():
        raise StateError(f"{directory} is not an fskd state directory (no {STATE_JSON}); write one with fskd adapt/align/distill")
    try:
        info = json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise StateError(f"{meta} is not valid JSON: {e}") from None
    if info.get("state_version") != STATE_VERSION:
        raise StateError(f"{meta}: state version {info.get('state_version')!r}, this fskd reads {STATE_VERSION}")
    tensors = load_file(str(directory / STATE_TENSORS)) if (directory / STATE_TENSORS).exists() else {}
    return MethodState(**info, tensors=tensors)


class Method(ABC):
    """A registered method. Subclasses set ``name`` and ``kind`` and implement both hooks."""

    name: str = ""
    kind: str = ""

    @abstractmethod
    def fit(self, store: FeatureStore, config, progress: TrainProgress | None = None) -> MethodState:
        """Fit on the store (hyper-parameters chosen on validation data) and return the state."""

    @abstractmethod
    def head(self, state: MethodState, store: FeatureStore, device: torch.device) -> Head:
        """The classifier head this state defines, for episodic or all-way evaluation."""

    def check_store(self, state: MethodState, store: FeatureStore, directory: str | Path) -> None:
        """Raise StateError when ``state`` cannot be evaluated on ``store`` (default: same fingerprint)."""
        check_state_store(state, store, directory)

    def features(
        self, state: MethodState, store: FeatureStore, device: torch.device
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A map of raw store features (n, D) -> adapted features (n, D') that other methods can
        build on (e.g. FMA on a residual adapter's features); None when the method has none."""
        return None


#: method name -> Method subclass; ``fskd adapt/align/distill --method`` choices
METHODS: Registry[type[Method]] = Registry("method")


def methods_of_kind(kind: str) -> list[str]:
    return [n for n in METHODS.names() if METHODS.get(n).kind == kind]


def check_state_store(state: MethodState, store: FeatureStore, directory: str | Path) -> None:
    """A state only applies to the store it was fitted on (same fingerprint)."""
    if state.store_fingerprint != store.fingerprint:
        raise StateError(
            f"state {directory} was fitted on store {state.store_path} (fingerprint {state.store_fingerprint}), "
            f"not on {store.path} (fingerprint {store.fingerprint})"
        )
