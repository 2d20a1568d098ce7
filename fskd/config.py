"""Frozen configuration dataclasses, one per verb.

A config is built from keyword arguments or a dict; unknown keys are rejected with the list of
valid ones. Every output (store attrs, state directory, report) saves the config it came from.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fskd.errors import ConfigError
from fskd.protocols import protocol_names, transductive_protocols

C = TypeVar("C", bound="Config")


@dataclass(frozen=True)
class Config:
    """Base class: dict round-trip with unknown-key rejection, and the one place where option
    values from users (``--set``, JSON, grid files) are checked: each value against its field's
    annotation (types, finite numbers, list elements), against ``RANGES`` and against an upper
    bound (``MAXIMA``, else :data:`CEILINGS` by field name).

    Every construction is checked the same way (``Config.__init_subclass__`` runs the check before
    each subclass's own ``__post_init__``), so the Python API gets the errors ``--set`` gets:
    ``EvalConfig(way="5")`` and ``EvalConfig(way=5.5)`` are ConfigErrors, not a run. Values given in
    Python take the form their annotation names: a list for a tuple, a path for a string, a NumPy
    integer for an int."""

    #: field -> (">=" or ">", bound): every number of the field (list elements too) must satisfy it
    RANGES: typing.ClassVar[dict[str, tuple[str, float]]] = {}
    #: field -> upper bound (inclusive) of every number of the field; overrides CEILINGS
    MAXIMA: typing.ClassVar[dict[str, float]] = {}
    #: field -> the option as the user types it, where it is not ``--field-name`` (e.g. shot -> --shots)
    FLAGS: typing.ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        _check_fields(self)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None or getattr(own, "_checks_fields", False):
            return

        @functools.wraps(own)
        def post_init(self: Config) -> None:
            if type(self).__post_init__ is post_init:  # the outermost one checks (super() calls do not again)
                _check_fields(self)
            own(self)

        post_init._checks_fields = True  # type: ignore[attr-defined]
        cls.__post_init__ = post_init  # type: ignore[method-assign]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        if not isinstance(data, dict):
            raise ConfigError(
                f"{cls.__name__}: options must be a JSON object (a table of KEY = VALUE), got "
                f"{type(data).__name__} {data!r:.80}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}"
            )
        kwargs = {}
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in data:
                v = data[f.name]
                v = tuple(v) if isinstance(v, list) else v
                tp = hints.get(f.name, Any)
                if not _conforms(v, tp):
                    label = f"--set {f.name}" if cls.__name__.endswith("Options") else f.name
                    raise ConfigError(f"{cls.__name__}: {label} must be {_describe(tp)}, got {v!r:.200}")
                kwargs[f.name] = _coerce(v, tp)
                _check_range(cls, f.name, kwargs[f.name])
        try:
            return cls(**kwargs)
        except TypeError as e:  # a range check meeting a value of a type it did not expect
            raise ConfigError(f"{cls.__name__}: {e}") from None

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        from fskd.fsutil import parse_json_file

        data = parse_json_file(path, f"{cls.__name__} file")
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} file {path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(self)))
        return out

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def _hints(cls: type) -> dict[str, Any]:
    return _type_hints(cls)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:  # through _hints: mypy takes type[Config] for no Hashable
    return typing.get_type_hints(cls)


#: the largest episode count of an episodic evaluation (``--episodes``): episodes are sampled and
#: scored in batches, so memory does not grow with it, but per-episode accuracies are kept (for the
#: report and ``fskd compare``) and the time grows with it; a million gives a CI far below any effect
MAX_EPISODES = 1_000_000

#: upper bounds by field name for every Config (a class's ``MAXIMA`` entry wins): iteration and
#: episode counts, batch and layer sizes, views, threads. Each is far above any recipe; a value
#: above it is a typo or a runaway (``--set steps=1e20``), refused before any work is done
CEILINGS: dict[str, float] = {
    "episodes": MAX_EPISODES,
    **dict.fromkeys(("val_episodes", "meta_episodes"), 10_000),  # sampled and gathered at once
    **dict.fromkeys(("steps", "meta_steps", "teacher_steps", "iters", "max_iter"), 1_000_000),
    **dict.fromkeys(("epochs", "warmup_epochs", "val_every"), 10_000),
    "rounds": 1_000,
    **dict.fromkeys(("batch_size", "batch", "chunk_rows"), 1_048_576),
    "episode_batch": 10_000,
    "augment_views": 1_000,
    **dict.fromkeys(("workers", "threads", "decode_threads"), 1_024),
    "image_size": 4_096,
    **dict.fromkeys(("width", "proj_hidden"), 16_384),
    "pca": 65_536,
    **dict.fromkeys(("depth", "n_ctx", "folds"), 1_000),
}


def _label(cls: type[Config], name: str) -> str:
    """A field as the user typed it: ``--set NAME`` (method options), ``NAME`` (grid keys), else
    the verb's flag (``--name-with-dashes`` unless ``FLAGS`` says otherwise)."""
    if cls.__name__.endswith("Options"):
        return f"--set {name}"
    if cls.__name__ == "BenchConfig":
        return name
    return cls.FLAGS.get(name, "--" + name.replace("_", "-"))


def _as_annotated(v: Any, tp: Any) -> tuple[bool, Any]:
    """(fits, value) of a value given in Python for a field annotated ``tp``: :func:`_conforms`
    after the conversions Python callers expect (a list for a tuple, a path for a string, a NumPy
    number for an int or float). The length of a fixed-size tuple is left to the class's own
    check (its message says what the numbers mean)."""
    if tp is Any:
        return True, v
    args = _union_args(tp)
    if args is not None:
        for a in args:
            ok, out = _as_annotated(v, a)
            if ok:
                return True, out
        return False, v
    if tp is int and isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return True, int(v)
    if tp is float and isinstance(v, numbers.Real) and not isinstance(v, bool):
        return math.isfinite(v), float(v)
    if tp is str and isinstance(v, os.PathLike):
        v = os.fspath(v)
    if (typing.get_origin(tp) or tp) is tuple and isinstance(v, (list, tuple)):
        targs = typing.get_args(tp)
        if not targs:
            return True, tuple(v)
        elem = [targs[0]] * len(v) if len(targs) == 2 and targs[1] is Ellipsis else list(targs)
        if len(elem) != len(v):  # a fixed-size tuple of another length: the element type of each
            elem = [targs[min(i, len(targs) - 1)] for i in range(len(v))]
        fitted = [_as_annotated(x, a) for x, a in zip(v, elem, strict=True)]
        return all(ok for ok, _ in fitted), tuple(x for _, x in fitted)
    return _conforms(v, tp), v


def _check_fields(self: Config) -> None:
    """Every field of a config against its annotation, ``RANGES`` and its upper bound; converts
    values to their annotated form in place (frozen dataclass: ``object.__setattr__``)."""
    cls = type(self)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        v = getattr(self, f.name)
        tp = hints.get(f.name, Any)
        ok, out = _as_annotated(v, tp)
        if not ok:
            raise ConfigError(f"{cls.__name__}: {_label(cls, f.name)} must be {_describe(tp)}, got {v!r:.200}")
        if out is not v:
            object.__setattr__(self, f.name, out)
        _check_range(cls, f.name, out)


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _conforms(v: Any, tp: Any) -> bool:
    """Whether a value (from JSON or ``--set``) fits a field's annotation: int for int (not bool,
    not 2.5), a finite number for float, tuples element by element, dicts, None for Optional."""
    if tp is Any:
        return True
    args = _union_args(tp)
    if args is not None:
        return any(_conforms(v, a) for a in args)
    if tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if tp is str:
        return isinstance(v, str)
    origin = typing.get_origin(tp) or tp
    if origin is tuple:
        if not isinstance(v, tuple):
            return False
        targs = typing.get_args(tp)
        if not targs:
            return True
        if len(targs) == 2 and targs[1] is Ellipsis:
            return all(_conforms(x, targs[0]) for x in v)
        return len(v) == len(targs) and all(_conforms(x, a) for x, a in zip(v, targs, strict=True))
    if origin is dict:
        return isinstance(v, dict)
    return isinstance(v, origin) if isinstance(origin, type) else True


def _describe(tp: Any) -> str:
    args = _union_args(tp)
    if args is not None:
        return " or ".join(_describe(a) for a in args)
    if tp is type(None):
        return "null"
    names = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false", dict: "a JSON object"}
    base = typing.get_origin(tp) or tp  # dict[str, Any]: a dict
    if base in names:
        return names[base]
    if (typing.get_origin(tp) or tp) is tuple:
        targs = typing.get_args(tp)
        if not targs:
            return "a list"
        if len(targs) == 2 and targs[1] is Ellipsis:
            return f"a list of {_describe(targs[0]).removeprefix('an ').removeprefix('a ')}s"
        return f"a list of {len(targs)} values ({', '.join(_describe(a) for a in targs)})"
    return str(getattr(tp, "__name__", tp))


def _number(b: float) -> str:
    return str(int(b)) if float(b).is_integer() and abs(b) < 1e15 else f"{b:g}"


def upper_bound(cls: type[Config], name: str) -> float | None:
    """The largest value a field of ``cls`` takes (``MAXIMA``, else :data:`CEILINGS`), or None."""
    return cls.MAXIMA.get(name, CEILINGS.get(name))


def range_text(cls: type[Config], name: str) -> str:
    """The allowed range of a field in words: ">= 0 and <= 1000000", "<= 4096", "" when free."""
    low, high = cls.RANGES.get(name), upper_bound(cls, name)
    parts = ([f"{low[0]} {_number(low[1])}"] if low else []) + ([f"<= {_number(high)}"] if high is not None else [])
    return " and ".join(parts)


def _check_range(cls: type[Config], name: str, v: Any) -> None:
    if v is None:
        return
    low, high = cls.RANGES.get(name), upper_bound(cls, name)
    if low is None and high is None:
        return
    for x in v if isinstance(v, tuple) else (v,):
        if not isinstance(x, (int, float)) or isinstance(x, bool):
            continue
        if (low is not None and not (x >= low[1] if low[0] == ">=" else x > low[1])) or (high is not None and x > high):
            raise ConfigError(f"{cls.__name__}: {_label(cls, name)} must be {range_text(cls, name)}, got {v!r:.200}")


def _check_split_override(cfg: EvalConfig | FitConfig) -> None:
    """``--class-split FILE`` or ``--class-ratio`` overriding the stored class split (fit and eval)."""
    _check_ratios("--class-ratio", cfg.class_ratio, 3)
    if cfg.class_split and cfg.class_ratio:
        raise ConfigError("give --class-split FILE or --class-ratio, not both")


def _coerce(v: Any, tp: Any) -> Any:
    """Integers given for a float field become floats (JSON writes 1e3 as 1000)."""
    if tp is float and isinstance(v, int):
        return float(v)
    return v


def _check_ratios(name: str, ratios: tuple[float, ...] | None, n: int) -> None:
    if ratios is None:
        return
    if (
        len(ratios) != n
        or not all(isinstance(r, (int, float)) and math.isfinite(r) for r in ratios)
        or any(r < 0 for r in ratios)
        or abs(sum(ratios) - 1.0) > 1e-6
    ):
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
    chunk_rows: int = 256
    class_split: str | None = None
    class_ratio: tuple[float, float, float] = (0.6, 0.2, 0.2)
    sample_split: tuple[float, float, float] | None = None
    split_seed: int = 0
    templates: str | None = None
    descriptions: str | None = None
    skip_bad: bool = False
    download: bool = False
    content_hash: bool = False  # fingerprint the image bytes too (slow: reads every file)
    # augmented views of train rows (the store's views/ group; schema.py)
    augment_views: int = 0  # V random-resized-crop + flip views per row; 0: none
    augment_shots: int = 0  # only the all-way shots of --augment-seeds up to K per class; 0: every train row
    augment_seeds: tuple[int, ...] = (1, 2, 3)
    augment_scale: tuple[float, float] = (0.5, 1.0)  # crop area range: Tip-Adapter's; CoOp / FMA use 0.08-1
    augment_seed: int = 0

    def __post_init__(self) -> None:
        if not self.store:
            raise ConfigError("--store is required: the path of the Zarr feature store to write")
        if self.augment_views < 0 or self.augment_shots < 0:
            raise ConfigError(
                f"--augment-views and --augment-shots must be >= 0, got {self.augment_views}, {self.augment_shots}"
            )
        sc = tuple(self.augment_scale)
        if len(sc) != 2 or not all(isinstance(v, (int, float)) for v in sc) or not (0 < sc[0] <= sc[1] <= 1):
            raise ConfigError(
                f"--augment-scale must be two numbers 0 < min <= max <= 1 (the crop's share of the "
                f"image area), got {self.augment_scale}"
            )
        if self.augment_shots and not self.augment_seeds:
            raise ConfigError("--augment-shots needs --augment-seeds (the seeds whose all-way shots get views)")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.chunk_rows < 1:
            raise ConfigError(f"--chunk-rows must be >= 1, got {self.chunk_rows}")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"--dtype must be float16 or float32, got {self.dtype!r}")
        _check_ratios("--class-ratio", self.class_ratio, 3)
        _check_ratios("--sample-split", self.sample_split, 3)


#: every --protocol of fskd eval, in the order --help lists them (fskd.protocols declares them)
PROTOCOLS = protocol_names()
#: what chooses a fit's hyper-parameters (``--hp-selection``): few-shot-val, CoOp's min(K, 4) val rows per
#: class (fskd.store.sampling.validation_rows; the val classes' episodes in the episodic regime); full-val,
#: the whole val split; none, no validation data at all (each method's fixed values, named in its state)
HP_SELECTIONS = ("few-shot-val", "full-val", "none")


@dataclass(frozen=True)
class EvalConfig(Config):
    """``fskd eval``: episodic N-way K-shot or all-way evaluation on a store."""

    FLAGS = {"shots": "--shots", "seeds": "--seeds"}

    store: str = ""
    state: str | None = None
    protocol: str = "episodic"
    way: int = 5
    shots: int = 4
    query: int = 15
    episodes: int = 600
    split: str = "novel"
    classifier: str = "prototype"
    center: str = "base"
    seed: int = 1  # episode sampling seed (1, as the --seed of every verb)
    seeds: tuple[int, ...] = (1, 2, 3)
    episode_batch: int = 50  # episodes scored per batch: gathered rows stay cache-sized
    device: str = "auto"
    report: str | None = None
    class_split: str | None = None  # override the stored class split (JSON file of class names)
    class_ratio: tuple[float, float, float] | None = None  # or a seeded ratio split
    split_seed: int = 0
    transductive: bool = False  # TransCLIP: classify every test row at once (allway, base-to-new)
    batch: int | None = None  # --transductive in realistic batches: at most this many test rows per batch ...
    active_classes: int | None = None  # ... drawn from this many random classes (both or neither)

    def __post_init__(self) -> None:
        _check_split_override(self)
        if not self.store:
            raise ConfigError("--store is required")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if (self.batch is None) != (self.active_classes is None):
            raise ConfigError(
                f"--batch and --active-classes go together (batches of B test rows drawn from C classes); "
                f"got --batch {self.batch} and --active-classes {self.active_classes}"
            )
        if self.batch is not None and not self.transductive:
            raise ConfigError(
                "--batch / --active-classes set how --transductive (TransCLIP) batches the test rows; "
                "add --transductive"
            )
        if self.batch is not None and self.active_classes is not None and (self.batch < 1 or self.active_classes < 1):
            raise ConfigError(f"--batch and --active-classes must be >= 1, got {self.batch} and {self.active_classes}")
        if self.transductive and self.protocol not in transductive_protocols():
            raise ConfigError(
                f"--transductive (TransCLIP) classifies the whole test split of the all-way protocol "
                f"at once: use it with --protocol {' or '.join(transductive_protocols())}, not {self.protocol}"
            )
        for name in ("way", "shots", "episodes", "episode_batch"):
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

    FLAGS = {"options": "options (--set KEY=VALUE)"}

    store: str = ""
    method: str = ""
    shots: int = 4
    seed: int = 1
    out: str | None = None
    device: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    force: bool = False  # replace an existing fskd state at --out (anything else is never replaced)
    class_split: str | None = None  # JSON file {"base"|"val"|"novel": [class names]} overriding the stored split
    class_ratio: tuple[float, float, float] | None = None  # or a seeded ratio split of the store's classes
    split_seed: int = 0  # seed of --class-ratio
    hp_selection: str = "few-shot-val"  # what chooses hyper-parameters: few-shot-val, full-val or none (HP_SELECTIONS)
    base_to_new: bool = False  # CoCoOp: fit on the K shots of the base half of the classes only (new classes hidden)

    def __post_init__(self) -> None:
        _check_split_override(self)
        if not self.store:
            raise ConfigError("--store is required")
        if self.hp_selection not in HP_SELECTIONS:
            raise ConfigError(f"--hp-selection must be one of {', '.join(HP_SELECTIONS)}, got {self.hp_selection!r}")
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

    FLAGS = {**FitConfig.FLAGS, "steps": "--flow-steps"}

    method: str = "fma"
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
    teacher_state: str | None = (
        None  # a fitted all-way state (adapt/align) of the same store: its head's logits are the soft targets
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.regime not in ("semi", "base-novel"):
            raise ConfigError(f"--regime must be semi or base-novel, got {self.regime!r}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")


#: meanings of option names several methods share (a field's own comment wins)
COMMON_OPTION_DOCS = {
    "lr": "learning rate of the optimiser",
    "weight_decay": "weight decay of the optimiser",
    "batch_size": "rows per optimiser step",
    "val_way": "classes per validation episode",
    "val_query": "queries per class in a validation episode",
    "val_episodes": "validation episodes that choose the hyper-parameters",
    "ridge": "bridge ridge strength for a non-joint store (null: chosen on validation)",
    "steps": "optimiser steps (a list: candidates chosen on validation; null: the method's grid)",
}


def describe_options(cls: type[Config]) -> list[dict[str, str]]:
    """The fields of an options class for ``fskd methods NAME``: name, type, default and meaning.
    The meaning is the field's trailing comment in the source (one place to document it), or,
    for fields inherited, the comment in the base class."""
    import inspect
    import io
    import tokenize

    notes: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is Config:
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        # a field's meaning: the first comment inside its statement (trailing its line, or a wrapped
        # default's continuation line); comment lines between statements belong to no field
        current, in_field, starts = "", False, True
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.NAME and tok.start[1] == 4 and starts:
                current, in_field, seen = tok.string, True, False
            elif tok.type == tokenize.COMMENT and in_field and not seen:
                notes[current], seen = tok.string.lstrip("# ").strip(), True
            elif tok.type == tokenize.NEWLINE:
                in_field = False
            if tok.type not in (tokenize.NL, tokenize.COMMENT):
                starts = tok.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    hints = _hints(cls)
    out = []
    for name, text in COMMON_OPTION_DOCS.items():
        notes.setdefault(name, text)
    for f in dataclasses.fields(cls):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        )
        rng, high = cls.RANGES.get(f.name), upper_bound(cls, f.name)
        out.append(
            {
                "name": f.name,
                "type": _describe(hints.get(f.name, Any)),
                "default": json.dumps(default) if not isinstance(default, str) else default,
                "range": f"{rng[0]} {_number(rng[1])}" if rng else "",
                "max": _number(high) if high is not None else "",
                "meaning": notes.get(f.name, ""),
            }
        )
    return out


#: where ``fskd bench`` runs its cells
EXECUTORS = ("local", "slurm")
#: ``--slurm KEY=VALUE``: each job's resources -> (type, what it is); see fskd.bench.slurm
SLURM_KEYS = {
    "partition": (str, "the Slurm partition"),
    "time": (int, "the job's time limit in minutes"),
    "cpus": (int, "CPUs per job (--cpus-per-task)"),
    "gpus": (int, "GPUs per job (--gpus-per-node)"),
    "mem": (str, "memory per job, e.g. 16G (--mem)"),
    "account": (str, "the account to charge"),
    "qos": (str, "the quality of service"),
    "constraint": (str, "node features (--constraint)"),
    "python": (str, "the Python that runs fskd on the nodes (default: this one)"),
}


def check_slurm(slurm: object) -> None:
    """``--slurm`` settings: known keys, each of its type (numbers >= 1)."""
    if not isinstance(slurm, dict):
        raise ConfigError(f"slurm must be a table of KEY = VALUE ({', '.join(SLURM_KEYS)}), got {slurm!r:.80}")
    for k, v in slurm.items():
        if k not in SLURM_KEYS:
            raise ConfigError(f"--slurm {k}: unknown key; valid keys: {', '.join(SLURM_KEYS)}")
        typ, what = SLURM_KEYS[k]
        if typ is int and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"--slurm {k} ({what}) must be an integer >= 1, got {v!r}")
        if typ is str and (not isinstance(v, str) or not v.strip()):
            raise ConfigError(f"--slurm {k} ({what}) must be a non-empty string, got {v!r}")


#: the protocols of fskd bench's cells: every protocol (fskd.protocols), by name
BENCH_PROTOCOLS = tuple(sorted(PROTOCOLS))


def transductive_setting(text: str) -> tuple[int | None, int | None]:
    """A bench ``--transductive`` setting as (batch, active classes): ``all`` -> (None, None), every
    test row at once; ``B:C`` -> batches of B test rows drawn from C classes."""
    if text == "all":
        return None, None
    b, sep, c = str(text).partition(":")
    if sep and b.strip().isdigit() and c.strip().isdigit() and int(b) >= 1 and int(c) >= 1:
        return int(b), int(c)
    raise ConfigError(
        f"--transductive settings are 'all' (every test row at once) or 'B:C' (batches of B test rows "
        f"from C classes, e.g. 64:4), got {text!r}"
    )


@dataclass(frozen=True)
class BenchConfig(Config):
    """``fskd bench``: a grid of (store, method, shots, seed) cells, each fitted and evaluated once.

    A grid file (TOML) holds the same keys; ``options`` maps a method name to its ``--set`` options.
    A ``methods`` entry ``LABEL=METHOD`` is a variant: a row of METHOD named LABEL with the options
    ``options[LABEL]``. Distill methods' options also take ``fskd distill``'s own settings
    (student, regime, losses, epochs, root, online_teacher, teacher_state). A ``methods`` entry may
    name a chain (a built-in such as ``syntrans-e2e``, or one of ``chains``: name -> its stages,
    ``[teacher], student, [head]``), whose options are per stage: ``options[LABEL][STAGE]``
    (:mod:`fskd.bench.chains`)."""

    stores: tuple[str, ...] = ()  # cross-dataset / domain-shift: the source store first, then the targets
    methods: tuple[str, ...] = ()
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (1, 2, 3)
    protocol: str = "allway"
    hp_selection: tuple[str, ...] | str = ("few-shot-val",)  # one policy or a list swept like shots (a row per policy)
    out: str = "runs/bench"
    options: dict[str, Any] = field(default_factory=dict)  # {method: {option: value}}
    chains: dict[str, Any] = field(default_factory=dict)  # {chain name: [stage, ...]}: the grid's own chain rows
    baseline: str | None = None  # a method of the grid: the tables add paired differences to it
    keep_states: bool = False  # keep every cell's fitted state under OUT/states (else removed after its evaluation)
    extend: bool = False  # an existing OUT may hold a smaller grid of which this one is a superset
    device: str = "auto"
    # episodic protocol: N-way K-shot episodes of the novel classes (K = each cell's shots)
    way: int = 5
    query: int = 15
    episodes: int = 600
    episode_seed: int = 0
    class_ratio: tuple[float, float, float] | None = None  # episodic: seed s draws its own base/val/novel class split
    # also score each cell's state with TransCLIP (a row per setting): "all" (every test row at once) and/or
    # "B:C" (batches of B test rows drawn from C classes); allway and base-to-new
    transductive: tuple[str, ...] = ()
    # where the cells run: this process ("local") or Slurm jobs through submitit ("slurm", fskd.bench.slurm)
    executor: str = "local"
    slurm: dict[str, Any] = field(default_factory=dict)  # each job's resources: SLURM_KEYS
    cells_per_job: int = 1  # slurm: cells run one after another in one job
    detach: bool = False  # slurm: submit and return; the jobs go on (collect with a rerun or --report)

    def __post_init__(self) -> None:
        if not self.stores:
            raise ConfigError("--stores is required: one or more feature stores, comma-separated")
        if not self.methods:
            raise ConfigError("--methods is required: one or more adapt/align/distill methods, comma-separated")
        if not self.shots or any(k < 1 for k in self.shots):
            raise ConfigError(f"--shots must be one or more integers >= 1, got {list(self.shots)}")
        if not self.seeds:
            raise ConfigError("--seeds needs at least one seed")
        for name in ("stores", "methods", "shots", "seeds"):
            v = getattr(self, name)
            if len(set(v)) != len(v):
                raise ConfigError(f"--{name} lists a value twice: {list(v)}")
        if self.protocol not in BENCH_PROTOCOLS:
            raise ConfigError(
                f"--protocol must be one of {', '.join(BENCH_PROTOCOLS)} for fskd bench, got {self.protocol!r}"
            )
        if isinstance(self.hp_selection, str):
            object.__setattr__(self, "hp_selection", (self.hp_selection,))
        object.__setattr__(self, "hp_selection", tuple(self.hp_selection))
        bad = [h for h in self.hp_selection if h not in HP_SELECTIONS]
        if bad or not self.hp_selection or len(set(self.hp_selection)) != len(self.hp_selection):
            raise ConfigError(
                f"--hp-selection must be one or more of {', '.join(HP_SELECTIONS)} (each once), got "
                f"{list(self.hp_selection)}"
            )
        if not isinstance(self.options, dict) or not all(isinstance(v, dict) for v in self.options.values()):
            raise ConfigError(
                "options must map a method name to a table of its options, e.g. [options.fma] iters = 300"
            )
        labels = self.labels()
        if len(set(labels)) != len(labels):
            raise ConfigError(f"--methods names a row twice: {labels} (give each variant its own LABEL=METHOD label)")
        unknown = sorted(set(self.options) - set(labels))
        if unknown:
            raise ConfigError(
                f"options are given for method(s) not in the grid: {', '.join(unknown)}; "
                f"grid methods: {', '.join(labels)}"
            )
        if not isinstance(self.chains, dict) or not all(
            isinstance(v, (list, tuple)) and v and all(isinstance(s, str) and s.strip() for s in v)
            for v in self.chains.values()
        ):
            raise ConfigError(
                'chains must map a chain name to its list of stages, e.g. [chains] mine = ["mtkd", "tip-adapter-f"]'
            )
        unused = sorted(set(self.chains) - {m for _, m in self.method_pairs()})
        if unused:
            raise ConfigError(
                f"chains are given that no --methods entry runs: {', '.join(unused)}; grid methods: {', '.join(labels)}"
            )
        if self.class_ratio is not None:
            if self.protocol != "episodic":
                raise ConfigError(
                    f"class_ratio (a seeded class split per seed) is for --protocol episodic, got "
                    f"--protocol {self.protocol}"
                )
            _check_ratios("class_ratio", self.class_ratio, 3)
        for name in ("way", "query", "episodes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (2 if name == "way" else 1):
                raise ConfigError(f"{name} must be an integer >= {2 if name == 'way' else 1}, got {v!r}")
        object.__setattr__(self, "transductive", tuple(self.transductive))
        for t in self.transductive:
            transductive_setting(t)
        if len(set(self.transductive)) != len(self.transductive):
            raise ConfigError(f"--transductive lists a setting twice: {list(self.transductive)}")
        if self.transductive and self.protocol not in transductive_protocols():
            raise ConfigError(
                f"--transductive (TransCLIP) classifies a protocol's test rows jointly: use it with --protocol "
                f"{' or '.join(transductive_protocols())}, not {self.protocol}"
            )
        if self.baseline is not None and self.baseline not in labels:
            raise ConfigError(f"--baseline {self.baseline!r} is not one of the grid's methods: {', '.join(labels)}")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if not isinstance(self.cells_per_job, int) or isinstance(self.cells_per_job, bool) or self.cells_per_job < 1:
            raise ConfigError(f"--cells-per-job must be an integer >= 1, got {self.cells_per_job!r}")
        check_slurm(self.slurm)
        if self.executor == "local" and (self.slurm or self.detach or self.cells_per_job != 1):
            given = [
                n
                for n, v in (
                    ("--slurm", self.slurm),
                    ("--detach", self.detach),
                    ("--cells-per-job", self.cells_per_job != 1),
                )
                if v
            ]
            raise ConfigError(f"{', '.join(given)} are for --executor slurm; the grid runs locally (--executor local)")

    def method_pairs(self) -> list[tuple[str, str]]:
        """(row label, registered method) per ``methods`` entry: ``NAME`` is itself; ``LABEL=NAME`` is
        a variant, another row of the same method with its own options (``options[LABEL]``)."""
        out = []
        for entry in self.methods:
            label, sep, base = str(entry).partition("=")
            if sep and (not label.strip() or not base.strip() or "=" in base):
                raise ConfigError(
                    f"--methods entry {entry!r}: a variant is LABEL=METHOD (e.g. labels-only=mtkd, "
                    f"its options under that label)"
                )
            out.append((label.strip(), base.strip()) if sep else (label, label))
        return out

    def labels(self) -> list[str]:
        """The grid's row names, in order."""
        return [label for label, _ in self.method_pairs()]


#: what ``fskd predict --out`` writes, by the file's suffix
PREDICT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}  # parquet: the parquet extra (pyarrow)
#: what ``fskd export --format`` writes
EXPORT_FORMATS = ("onnx", "torchscript")


@dataclass(frozen=True)
class PredictConfig(Config):
    """``fskd predict``: a fitted state's all-way head on new images (``images``: a folder, an image or
    a file listing paths; ``csv``: a file with a ``path`` column) or on a store split's cached features
    (``split``, no encoding; adds the true ``label``). ``store``: the state's store when it moved."""

    state: str = ""
    out: str = ""
    images: str | None = None
    csv: str | None = None
    store: str | None = None
    split: str | None = None
    top_k: int = 5
    batch_size: int = 64
    workers: int | None = None
    device: str = "auto"
    skip_bad: bool = False
    force: bool = False

    RANGES = {"top_k": (">=", 1), "batch_size": (">=", 1), "workers": (">=", 0)}

    def __post_init__(self) -> None:
        if not self.state:
            raise ConfigError("--state is required (a state directory written by fskd adapt or align)")
        if not self.out:
            raise ConfigError("--out is required (preds.csv, preds.jsonl or preds.parquet)")
        if Path(self.out).suffix.lower() not in PREDICT_FORMATS:
            raise ConfigError(f"--out {self.out}: the name must end in {' or '.join(PREDICT_FORMATS)} (the format)")
        given = [f"--{n}" for n in ("images", "csv", "split") if getattr(self, n)]
        if len(given) != 1:
            raise ConfigError(
                f"give exactly one of --images PATH, --csv FILE or --split SPLIT (with --store), got "
                f"{' and '.join(given) or 'none'}"
            )

    @property
    def format(self) -> str:
        return PREDICT_FORMATS[Path(self.out).suffix.lower()]


@dataclass(frozen=True)
class ExportConfig(Config):
    """``fskd export``: the store's image encoder + the state's all-way head + the class names in one
    file (``format`` onnx or torchscript) taking a preprocessed image batch (n, 3, H, W) and
    returning class probabilities (n, C); the preprocessing travels in its metadata."""

    state: str = ""
    out: str = ""
    format: str = "onnx"
    store: str | None = None
    opset: int = 17
    force: bool = False

    RANGES = {"opset": (">=", 13)}
    MAXIMA = {"opset": 25}

    def __post_init__(self) -> None:
        if not self.state:
            raise ConfigError("--state is required (a state directory written by fskd adapt or align)")
        if not self.out:
            raise ConfigError("--out is required (model.onnx or model.pt)")
        if self.format not in EXPORT_FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r}")
