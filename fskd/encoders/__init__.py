"""Encoders: one file per family. Each family is declared here (name, module, description) and
its module loads on first use, so listing encoders imports no torch or model library."""

from __future__ import annotations

from fskd.registry import Registry, exports_from

#: family name -> factory(argument string after "family:") -> Encoder
ENCODERS: Registry = Registry("encoder")

ENCODERS.lazy(
    "lite0-minilm",
    "fskd.encoders.lite0_minilm",
    help="offline pair: EfficientNet-Lite0 ImageNet image tower + all-MiniLM-L6-v2 text tower (no network)",
)
ENCODERS.lazy(
    "openclip",
    "fskd.encoders.openclip",
    help="open_clip model: openclip:ARCH[:TAG|:/path/weights.pt] or openclip:local-dir:/path",
)
ENCODERS.lazy(
    "student",
    "fskd.encoders.student",
    help="a student written by fskd distill: student:DIR (or a tensor file in it); text tower = the teacher's",
)
ENCODERS.lazy(
    "synthetic",
    "fskd.encoders.synthetic",
    help="synthetic:DIM, a fixed random projection of 8x8 pixels (benchmarks, tests)",
)
ENCODERS.lazy(
    "timm", "fskd.encoders.timm_encoder", help="image-only timm backbone: timm:NAME[:/path/weights.pth|:pretrained]"
)

_FROM_BASE = ("Encoder", "build_encoder", "parse_spec")


__getattr__ = exports_from(__name__, "fskd.encoders.base", _FROM_BASE)  # the interface loads on first use

__all__ = ["ENCODERS", *_FROM_BASE]
