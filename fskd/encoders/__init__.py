"""Encoders: one file per family, discovered automatically, each registering a spec family."""

from __future__ import annotations

import importlib
import pkgutil

from fskd.encoders.base import ENCODERS, Encoder, build_encoder, parse_spec

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base", "prompts"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["ENCODERS", "Encoder", "build_encoder", "parse_spec"]
