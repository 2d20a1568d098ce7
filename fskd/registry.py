"""A small name -> factory registry with helpful misses, and entries that load on first use.

Adding an encoder, method or classifier is one file plus one ``lazy`` line in its package's
``__init__.py`` (name, the module that holds it, its one-line description, for methods its kind).
The listing (``fskd --help``, ``fskd methods``, CLI choices) reads those lines and imports
nothing; ``get`` imports the module the first time the entry is used, and the module binds the
object with a plain ``register(name, obj)``. Plugins may still ``register`` eagerly.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, overload

from fskd.errors import RegistryError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (usually factories), their one-line descriptions and metadata."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}
        self._module: dict[str, str] = {}  # lazy entries: name -> module that registers it
        self._meta: dict[str, dict[str, Any]] = {}

    def lazy(self, name: str, module: str, help: str, **meta: Any) -> None:
        """Declare ``name`` (described by ``help``) as registered by ``module`` on import."""
        if name in self._module or name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._module[name], self._help[name], self._meta[name] = module, help, meta

    @overload
    def register(self, name: str, obj: None = None, *, help: str = "") -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, obj: T, *, help: str = "") -> T: ...

    def register(self, name: str, obj: T | None = None, *, help: str = "") -> Callable[[T], T] | T:
        """Bind ``obj`` to ``name``; usable as ``register(name, obj)`` or as a decorator. A name
        declared with :meth:`lazy` must be bound from the module the declaration names."""

        def _add(o: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            declared = self._module.get(name)
            where = getattr(o, "__module__", None)
            if declared is not None and where is not None and where != declared:
                raise ValueError(f"{self.kind} {name!r} is declared in {declared}, registered from {where}")
            self._items[name] = o
            if declared is None:
                doc = help or (getattr(o, "__doc__", None) or "").strip().splitlines()
                self._help[name] = doc if isinstance(doc, str) else (doc[0] if doc else "")
                self._meta.setdefault(name, {})
            return o

        return _add(obj) if obj is not None else _add

    def get(self, name: str) -> T:
        if name not in self._items and name in self._module:
            importlib.import_module(self._module[name])
            if name not in self._items:
                raise RegistryError(f"{self._module[name]} did not register {self.kind} {name!r}")
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RegistryError(f"Unknown {self.kind} {name!r}.{hint} Available: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted({*self._items, *self._module})

    def declared(self) -> list[str]:
        """The names in the order they were declared (lazy declarations first), for listings
        whose order means something (a default first)."""
        return list(dict.fromkeys([*self._module, *self._items]))

    def describe(self, name: str) -> str:
        return self._help.get(name, "")

    def meta(self, name: str, key: str, default: Any = None) -> Any:
        """Metadata given with the declaration (e.g. a method's ``kind``), without importing it."""
        return self._meta.get(name, {}).get(key, default)

    def module_of(self, name: str) -> str | None:
        """The module a lazy entry names (None for eager registrations)."""
        return self._module.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._module

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


def exports_from(package: str, module: str, names: tuple[str, ...]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that loads ``names`` from ``module`` when first asked
    for (the package's interface lives in a torch-importing module; the registry does not)."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(module), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
