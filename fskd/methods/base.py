"""Method states and the method registry.

A method (distill, adapt or align) is fitted on a feature store and saves a *state directory*:

```
DIR/
  state.json                  format marker, method, kind, the store's path and fingerprint,
                              encoder, config, hyper-parameters and which split chose each,
                              metrics, versions, and the name + SHA-256 of the tensor file
  state-<sha16>.safetensors   the learned tensors (bridge, weights, networks)
```

``fskd eval --store S --state DIR`` loads the state, checks it belongs to S, and asks the
method for a :class:`~fskd.classifiers.base.Head`.

Writes are atomic at every instant (``fskd.fsutil``): a new DIR is built beside it and renamed
into place; an existing fskd state is replaced by writing the new tensor file under its own name
and then replacing ``state.json`` (the commit point), so DIR always holds the old or the new
complete state. Only fskd's own file names are ever deleted; a DIR that is not an fskd state is
never written into (:func:`guard_out`, checked before any fitting).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from fskd import __version__
from fskd.errors import ConfigError, OutputError, StateError
from fskd.fsutil import fault_point, guard_output_dir, read_bundle, remove_bundle, write_bundle
from fskd.methods import METHODS, methods_of_kind  # noqa: F401 - re-exported

if TYPE_CHECKING:
    from fskd.classifiers.base import Head
    from fskd.store import FeatureStore

#: progress(stage, step, total, {"loss": ..., ...}) for training loops; the CLI draws the bar
TrainProgress = Callable[[str, int, int, dict], None]

#: 2: state.json carries the SHA-256 of its own content; 3: a method with recipes (linear-probe,
#: lp++, fma) records its recipe in ``hparams["recipe"]`` and the twin names (``lp++-tuned``, ...)
#: are gone. States of earlier versions are refused (refit)
STATE_VERSION = 3
STATE_FORMAT = "fskd-state"
STATE_JSON = "state.json"
STATE_STEM = "state"
#: written first into the hidden folder a new state is built in: only folders holding it are
#: ever removed as fskd's leftovers (a user's ``.DIR.old-v1/`` is never touched)
BUILDING_MARKER = ".fskd-building"
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

    @classmethod
    def of(cls, method: str, kind: str, store, config, **parts) -> MethodState:
        """A state of ``method`` fitted on ``store`` (a store or a view: its path, fingerprint and
        encoder) with ``config``; ``parts``: hparams, selected_on, metrics, tensors."""
        return cls(
            method=method,
            kind=kind,
            store_path=str(store.path),
            store_fingerprint=store.fingerprint,
            encoder=store.encoder_spec,
            config=config.to_dict(),
            **parts,
        )

    def info(self) -> dict:
        d = asdict(self)
        d.pop("tensors")
        return d


def is_state_dir(path: str | Path) -> bool:
    """True when ``path`` is a directory holding an fskd state (state.json with the format marker,
    or the keys of a state written before the marker existed)."""
    meta = Path(path) / STATE_JSON
    if not meta.is_file():
        return False
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict):
        return False
    return info.get("format") == STATE_FORMAT or (
        "format" not in info and {"method", "kind", "state_version", "store_fingerprint"} <= set(info)
    )


def guard_out(path: str | Path, force: bool = False, store: str | None = None, root: str | None = None) -> Path:
    """Check ``--out`` before fitting: absent, or an fskd state and ``force``; never the store,
    the dataset root, or a folder holding them. Raises OutputError naming the path."""
    return guard_output_dir(
        path, "--out", STATE_JSON, is_state_dir, force, protect=(("--store", store), ("the dataset root", root))
    )


def _leftovers(directory: Path) -> list[Path]:
    """Hidden siblings ``.DIR.tmp-PID-*`` in which an fskd process that has died was building a
    state: each holds fskd's :data:`BUILDING_MARKER`, written before anything else."""
    out = []
    for p in directory.parent.glob(f".{directory.name}.tmp-*"):
        if p.is_symlink() or not p.is_dir() or not (p / BUILDING_MARKER).is_file():
            continue
        pid = p.name[len(directory.name) + 6 :].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another live process is building it
        out.append(p)
    return out


def _remove_leftover(tmp: Path) -> None:
    """Remove a state folder fskd was building: only the files it writes there, then the folder if
    that left it empty."""
    remove_bundle(tmp, STATE_JSON, STATE_STEM, extra=(BUILDING_MARKER,))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_state(directory: str | Path, state: MethodState) -> Path:
    """Write ``state`` to ``directory`` atomically (see the module docstring). An existing
    ``directory`` must be an fskd state (callers check ``--force`` with :func:`guard_out`)."""
    directory = Path(directory).expanduser().absolute()
    state.created = state.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta = {"format": STATE_FORMAT, **state.info()}
    for old in _leftovers(directory):
        _remove_leftover(old)
    if directory.exists():
        if not is_state_dir(directory):
            raise OutputError(f"{directory} exists and is not an fskd state; fskd will not write into it")
        write_bundle(directory, STATE_JSON, STATE_STEM, meta, state.tensors, point="state")
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir(mode=0o755)
    try:
        (tmp / BUILDING_MARKER).touch()
        write_bundle(tmp, STATE_JSON, STATE_STEM, meta, state.tensors, point="state")
        fault_point("state:built")
        try:
            os.rename(tmp, directory)  # atomic; fails if another process created DIR meanwhile
            (directory / BUILDING_MARKER).unlink()  # a kill just before this leaves a harmless empty file
        except OSError:
            if not is_state_dir(directory):
                raise OutputError(
                    f"{directory} appeared while the state was written and is not an fskd state; "
                    f"the new state was not saved"
                ) from None
            write_bundle(directory, STATE_JSON, STATE_STEM, meta, state.tensors, point="state")
    finally:
        if tmp.exists():
            _remove_leftover(tmp)
    return directory


_STATE_KEYS = {f for f in MethodState.__dataclass_fields__ if f != "tensors"}


def load_state(directory: str | Path) -> MethodState:
    """Read and check a state directory; every problem is a StateError naming the file."""
    directory = Path(directory)
    meta = directory / STATE_JSON
    if not directory.is_dir() or not meta.is_file():
        raise StateError(
            f"{directory} is not an fskd state directory (no {STATE_JSON}); write one with fskd adapt/align/distill"
        )
    info, tensors = read_bundle(directory, STATE_JSON, what="state")
    fmt = info.pop("format", STATE_FORMAT)
    if fmt != STATE_FORMAT:
        raise StateError(f"{meta}: format {fmt!r} is not an fskd state ({STATE_FORMAT!r})")
    if info.get("state_version") != STATE_VERSION:
        raise StateError(
            f"{meta}: state version {info.get('state_version')!r}, this fskd reads {STATE_VERSION}; "
            f"fit the state again with this fskd"
        )
    missing, extra = sorted(_STATE_KEYS - set(info)), sorted(set(info) - _STATE_KEYS)
    if missing or extra:
        raise StateError(
            f"{meta}: "
            + "; ".join(
                p for p in (f"missing keys {missing}" if missing else "", f"unknown keys {extra}" if extra else "") if p
            )
            + " (the state was damaged or edited; write it again)"
        )
    for key, typ in (
        ("method", str),
        ("kind", str),
        ("store_fingerprint", str),
        ("config", dict),
        ("hparams", dict),
        ("selected_on", dict),
        ("metrics", dict),
    ):
        if not isinstance(info[key], typ):
            raise StateError(f"{meta}: {key} must be a {typ.__name__}, got {info[key]!r}")
    if info["kind"] not in KINDS:
        raise StateError(f"{meta}: kind {info['kind']!r} is not one of {', '.join(KINDS)}")
    return MethodState(**info, tensors=tensors)


class Method(ABC):
    """A registered method. Subclasses set ``name`` and ``kind`` and implement both hooks."""

    name: str = ""
    kind: str = ""
    #: the Config subclass of its ``--set`` options (``fskd methods NAME`` lists them)
    options: type | None = None
    #: True when fitting needs the store's class text features (a store without text: not applicable)
    needs_text: bool = False
    #: True when a state's head classifies classes it got no shot of, from their text (the "new"
    #: classes of base-to-new): its head accepts an empty support (K = 0) for unlearned classes
    transfers_to_new_classes: bool = False
    #: True when fitting runs the store's text encoder (rebuilt from the store's spec: prompt learning)
    needs_text_encoder: bool = False

    @abstractmethod
    def fit(self, store: FeatureStore, config, progress: TrainProgress | None = None) -> MethodState:
        """Fit on the store (hyper-parameters chosen on validation data) and return the state."""

    @abstractmethod
    def head(self, state: MethodState, store: FeatureStore, device: torch.device) -> Head:
        """The classifier head this state defines, for episodic or all-way evaluation."""

    def check_store(self, state: MethodState, store: FeatureStore, directory: str | Path) -> None:
        """Raise StateError when ``state`` cannot be evaluated on ``store`` (default: same fingerprint)."""
        check_state_store(state, store, directory)

    def bound_to_shots(self, state: MethodState) -> bool:
        """True when the state's all-way head *is* a model fitted on the K shots of the state's seed
        (not refitted on the shots it is given): evaluating it under other seeds or K would score
        that one model again. fskd eval then refuses other seeds and K."""
        return False

    def transfer_state(self, state: MethodState, store: FeatureStore) -> MethodState:
        """The state as seen from another store of the same encoder (cross-dataset): the class
        text features become the target store's. Methods with more per-class tensors override."""
        import torch.nn.functional as F

        text = F.normalize(torch.from_numpy(store.text_embeddings()).float(), dim=-1)
        return dataclasses.replace(state, tensors={**state.tensors, "text": text})

    def features(
        self, state: MethodState, store: FeatureStore, device: torch.device
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A map of raw store features (n, D) -> adapted features (n, D') that other methods can
        build on (e.g. FMA on a residual adapter's features); None when the method has none."""
        return None

    def text_features(
        self, state: MethodState, store: FeatureStore, device: torch.device
    ) -> dict[str, torch.Tensor] | None:
        """Class text features (C, d_t) the state learned, per regime (``"allway"``, ``"episodic"``),
        that other methods can build on (e.g. FMA toward CoOp's prompts); None when it has none."""
        return None


#: the ``--set`` key that picks a :class:`RecipeMethod`'s recipe
RECIPE = "recipe"
#: the class attributes every recipe of a method must agree on (the method reports them)
_SHARED = ("kind", "needs_text", "transfers_to_new_classes", "needs_text_encoder")


class RecipeMethod(Method):
    """One method, several recipes: the published recipe (the default, listed first) and fskd's
    own variants, picked with ``--set recipe=NAME`` (e.g. ``lp++ --set recipe=tuned``).

    Each recipe is an implementation class (a :class:`Method`, not registered) whose options
    class parses the other ``--set`` options, so its errors name its own keys. This class picks
    the recipe, fits with it, records it in the state (``hparams["recipe"]`` and where it came
    from) under the one registered name, and hands every later call on a state (head, features,
    transfer, ...) to the recipe the state names. ``options`` is the default recipe's options
    class plus ``recipe``; its ``from_dict`` parses the options of the recipe they name."""

    #: recipe name -> implementation class; the first is the default (the published recipe)
    recipes: ClassVar[dict[str, type[Method]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.recipes:
            return
        default = next(iter(cls.recipes.values()))
        for attr in _SHARED:
            values = {getattr(r, attr) for r in cls.recipes.values()}
            if len(values) > 1:
                raise TypeError(f"{cls.__name__}: its recipes differ in {attr} ({values}); make them separate methods")
            setattr(cls, attr, getattr(default, attr))
        for hook in ("features", "text_features"):  # offered only where a recipe offers it
            if all(getattr(r, hook) is getattr(Method, hook) for r in cls.recipes.values()):
                setattr(cls, hook, getattr(Method, hook))
        cls.options = _recipe_options(cls)

    @classmethod
    def recipe_of(cls, options: dict) -> tuple[str, type[Method], dict]:
        """``--set`` options -> (the recipe's name, its implementation class, the other options);
        an unknown recipe is a ConfigError naming the valid ones."""
        if not isinstance(options, dict):
            raise ConfigError(
                f"{cls.name}: options must be a JSON object (a table of KEY = VALUE), got "
                f"{type(options).__name__} {options!r:.80}"
            )
        rest = dict(options)
        name = rest.pop(RECIPE, next(iter(cls.recipes)))
        if not isinstance(name, str) or name not in cls.recipes:
            first, *others = cls.recipes
            raise ConfigError(
                f"{cls.name}: unknown recipe {name!r}; recipes: {first} (the default: the published "
                f"recipe), {', '.join(others)} (--set recipe=NAME)"
            )
        return name, cls.recipes[name], rest

    @classmethod
    def parse_options(cls, options: dict):
        """The options of the recipe ``options`` name, parsed by that recipe's options class (an
        unknown key that another recipe takes: the error says which)."""
        name, impl, rest = cls.recipe_of(options)
        if impl.options is None:
            if rest:
                raise ConfigError(
                    f"{cls.name} recipe={name} takes no options but recipe, got {', '.join(sorted(rest))}"
                )
            return None
        try:
            return impl.options.from_dict(rest)
        except ConfigError as e:
            own = set(getattr(impl.options, "__dataclass_fields__", {}))
            other = {
                r: sorted((set(rest) - own) & set(getattr(c.options, "__dataclass_fields__", {})))
                for r, c in cls.recipes.items()
                if r != name
            }
            hint = "; ".join(f"recipe={r} takes {', '.join(keys)}" for r, keys in other.items() if keys)
            if not hint:
                raise
            raise ConfigError(f"{cls.name} recipe={name}: {e} ({hint}: --set recipe=NAME)") from None

    def fit(self, store: FeatureStore, config, progress: TrainProgress | None = None) -> MethodState:
        self.parse_options(config.options)  # option errors before any work, with the recipe hint
        name, impl, rest = self.recipe_of(config.options)
        state = impl().fit(store, dataclasses.replace(config, options=rest), progress)
        state.method, state.config = self.name, config.to_dict()
        state.hparams = {RECIPE: name, **state.hparams}
        state.selected_on = {
            RECIPE: f"user-set (--set recipe={name})" if RECIPE in config.options else "default (the published recipe)",
            **state.selected_on,
        }
        return state

    def recipe(self, state: MethodState) -> Method:
        """The implementation of the recipe ``state`` was fitted with."""
        name = state.hparams.get(RECIPE)
        if name not in self.recipes:
            raise StateError(
                f"this {self.name} state names recipe {name!r}; {self.name}'s recipes are "
                f"{', '.join(self.recipes)}: fit the state again with this fskd"
            )
        return self.recipes[name]()

    def head(self, state: MethodState, store: FeatureStore, device: torch.device) -> Head:
        return self.recipe(state).head(state, store, device)

    def check_store(self, state: MethodState, store: FeatureStore, directory: str | Path) -> None:
        self.recipe(state).check_store(state, store, directory)

    def bound_to_shots(self, state: MethodState) -> bool:
        return self.recipe(state).bound_to_shots(state)

    def transfer_state(self, state: MethodState, store: FeatureStore) -> MethodState:
        return self.recipe(state).transfer_state(state, store)

    def features(self, state: MethodState, store: FeatureStore, device: torch.device):
        return self.recipe(state).features(state, store, device)

    def text_features(self, state: MethodState, store: FeatureStore, device: torch.device):
        return self.recipe(state).text_features(state, store, device)


def _recipe_options(method: type[RecipeMethod]) -> type:
    """``method.options``: the default recipe's options class plus ``recipe`` (so code reading
    the fields, e.g. whether the method has a ``regime``, sees the default's); ``from_dict``
    parses ``--set`` options with the options class of the recipe they name."""
    from fskd.config import Config

    default_name, default = next(iter(method.recipes.items()))
    base = default.options or Config
    namespace = {
        "__annotations__": {RECIPE: str},
        RECIPE: default_name,
        "__module__": method.__module__,
        "__doc__": f"``{method.name}`` options: ``recipe`` ({', '.join(method.recipes)}; default {default_name}), "
        f"then the options of that recipe.",
        "from_dict": classmethod(lambda cls, data: method.parse_options(data)),
    }
    return dataclasses.dataclass(frozen=True)(type(f"{method.__name__}RecipeOptions", (base,), namespace))


def check_state_store(state: MethodState, store: FeatureStore, directory: str | Path) -> None:
    """A state only applies to the store it was fitted on (same fingerprint)."""
    if state.store_fingerprint != store.fingerprint:
        raise StateError(
            f"state {directory} was fitted on store {state.store_path} (fingerprint {state.store_fingerprint}), "
            f"not on {store.path} (fingerprint {store.fingerprint}); to score it on another store of the same "
            f"encoder use --protocol cross-dataset (other classes) or --protocol domain-shift (the same classes)"
        )
