"""Classifier heads (stateless, batched over episodes), discovered and registered by file."""

from __future__ import annotations

import importlib
import pkgutil

from fskd.classifiers.base import CLASSIFIERS, ClassContext, FittedHead, Head

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["CLASSIFIERS", "ClassContext", "FittedHead", "Head"]
