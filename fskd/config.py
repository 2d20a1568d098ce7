"""Frozen configuration dataclasses, one per verb.

A config is built from keyword arguments or a dict; unknown keys are rejected with the list of
valid ones. Every output (store attrs, state directory, report) saves the config it came from.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fskd.errors import ConfigError

C = TypeVar("C", bound="Config")


@dataclass(frozen=True)
class Config:
    """Base class: dict round-trip with unknown-key rejection."""

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}"
            )
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                v = data[f.name]
                kwargs[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**kwargs)

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def _check_ratios(name: str, ratios: tuple[float, ...] | None, n: int) -> None:
    if ratios is None:
        return
    if len(ratios) != n or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise ConfigError(f"{name} must be {n} non-negative ratios summing to 1, got {ratios}")


@dataclass(frozen=True)
class ExtractConfig(Config):
    """``fskd extract``: encode a dataset once into a Zarr feature store."""

    dataset: str = "folder"
    root: str | None = None
    encoder: str = "lite0-minilm"
    store: str = ""
    batch_size: int = 64
    workers: int | None = None
    device: str = "auto"
    dtype: str = "float16"
    chunk_rows: int = 1024
    class_split: str | None = None
    class_ratio: tuple[float, float, float] = (0.6, 0.2, 0.2)
    sample_split: tuple[float, float, float] | None = None
    split_seed: int = 0
    templates: str | None = None
    descriptions: str | None = None
    skip_bad: bool = False
    download: bool = False

    def __post_init__(self) -> None:
        if not self.store:
            raise ConfigError("--store is required: the path of the Zarr feature store to write")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.chunk_rows < 1:
            raise ConfigError(f"--chunk-rows must be >= 1, got {self.chunk_rows}")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"--dtype must be float16 or float32, got {self.dtype!r}")
        _check_ratios("--class-ratio", self.class_ratio, 3)
        _check_ratios("--sample-split", self.sample_split, 3)


PROTOCOLS = ("episodic", "allway")


@dataclass(frozen=True)
class EvalConfig(Config):
    """``fskd eval``: episodic N-way K-shot or all-way evaluation on a store."""

    store: str = ""
    state: str | None = None
    protocol: str = "episodic"
    way: int = 5
    shot: int = 1
    query: int = 15
    episodes: int = 600
    split: str = "novel"
    classifier: str = "prototype"
    center: str = "base"
    seed: int = 0
    seeds: tuple[int, ...] = (1, 2, 3)
    episode_batch: int = 50  # episodes scored per batch: gathered rows stay cache-sized
    device: str = "auto"
    report: str | None = None

    def __post_init__(self) -> None:
        if not self.store:
            raise ConfigError("--store is required")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        for name in ("way", "shot", "episodes", "episode_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.protocol == "episodic" and self.way < 2:
            raise ConfigError(f"--way must be >= 2 for episodes, got {self.way}")
        if self.query < 1:
            raise ConfigError(f"--query must be >= 1, got {self.query}")
        if self.split not in ("base", "val", "novel"):
            raise ConfigError(f"--split must be base, val or novel, got {self.split!r}")
        if self.center not in ("none", "base"):
            raise ConfigError(f"--center must be none or base, got {self.center!r}")
        if not self.seeds:
            raise ConfigError("--seeds needs at least one seed")


@dataclass(frozen=True)
class DemoConfig(Config):
    """``fskd demo``: the main job on the embedded default (offline data and encoders)."""

    data_root: str = "../shared/data"
    out: str = "runs/demo"
    encoder: str = "lite0-minilm"
    episodes: int = 600
    workers: int | None = None
    datasets: tuple[str, ...] = ("cub", "omniglot")


@dataclass(frozen=True)
class FitConfig(Config):
    """Fields shared by the verbs that fit a method on a store (adapt, align, distill).

    ``options`` are the method's own options (each method validates them with its own
    Config subclass and rejects unknown keys).
    """

    store: str = ""
    method: str = ""
    shots: int = 4
    seed: int = 1
    out: str | None = None
    device: str = "auto"
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.store:
            raise ConfigError("--store is required")
        if self.shots < 0:
            raise ConfigError(f"--shots must be >= 0, got {self.shots}")
        if not isinstance(self.options, dict):
            raise ConfigError(f"options must be a dict of method options, got {type(self.options).__name__}")


@dataclass(frozen=True)
class AdaptConfig(FitConfig):
    """``fskd adapt``: fit a few-shot classifier on cached features.

    ``shots`` labelled samples per class come from the train split (seeded) for the all-way
    protocol; meta-learned parts (bridge, SynTrans generators) use the base classes; hyper-
    parameters are chosen on the val split / val classes.
    """

    method: str = "prototype"
    descriptions: str | None = None


@dataclass(frozen=True)
class AlignConfig(FitConfig):
    """``fskd align``: cross-modal alignment on cached features (FMA)."""

    method: str = "fma"
    shots: int = 16
    steps: tuple[int, ...] | None = None  # candidate solver step counts; chosen on validation
    gamma: float | tuple[float, ...] | None = None  # noise strength(s); several: chosen on validation
    base_state: str | None = None  # build on another method's features (e.g. a residual adapter)


@dataclass(frozen=True)
class DistillConfig(FitConfig):
    """``fskd distill``: teacher (the store's encoder + few-shot head) -> small student encoder."""

    method: str = "mtkd"
    student: str = "timm:resnet18"
    regime: str = "semi"  # semi (all classes, K labels) | base-novel (SynTrans)
    losses: str = "all"  # "all", "none", or a comma list of loss terms
    epochs: int | None = None
    root: str | None = None  # dataset root if it moved since extraction
    online_teacher: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.regime not in ("semi", "base-novel"):
            raise ConfigError(f"--regime must be semi or base-novel, got {self.regime!r}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
