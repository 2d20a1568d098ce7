"""Methods that learn from the store: ``distill/``, ``adapt/``, ``align/`` (one file per method).

Sub-packages are discovered automatically; each method file registers itself in ``METHODS``.
"""

from __future__ import annotations

import importlib
import pkgutil

from fskd.methods.base import METHODS, Method, MethodState, load_state, methods_of_kind, save_state

for _pkg in ("distill", "adapt", "align"):
    _mod = importlib.import_module(f"{__name__}.{_pkg}")
    for _m in pkgutil.iter_modules(_mod.__path__):
        importlib.import_module(f"{_mod.__name__}.{_m.name}")

__all__ = ["METHODS", "Method", "MethodState", "load_state", "methods_of_kind", "save_state"]
