"""Class text features: class names through a prompt ensemble, or per-class descriptions.

The default ensemble is the 7 templates CLIP's authors selected for ImageNet (also used by
Tip-Adapter) plus the plain "a photo of a {}." prompt. A templates file (one template with
``{}`` per line) or a descriptions JSON (``{"class name": ["description", ...]}``, the kind a
large language model writes) replaces it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fskd.datasets.coop import IMAGENET_TEMPLATES
from fskd.errors import ConfigError
from fskd.fsutil import parse_json_file, read_small_file

DEFAULT_TEMPLATES = ("a photo of a {}.", *IMAGENET_TEMPLATES)


def load_templates(path: str | Path | None) -> tuple[str, ...]:
    if path is None:
        return DEFAULT_TEMPLATES
    p = Path(path)
    text = read_small_file(p, "--templates", what="text file with one template with {} per line")
    lines = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
    bad = [t for t in lines if "{}" not in t]
    if not lines or bad:
        raise ConfigError(f"--templates file {p}: every line needs a '{{}}' for the class name; bad lines: {bad[:5]}")
    return lines


def load_descriptions(path: str | Path, class_keys: list[str], class_names: list[str]) -> list[list[str]]:
    """Per-class descriptions from JSON keyed by class name (or class key), in class order.

    Raises ConfigError listing the classes missing from the file and the unknown names in it.
    """
    p = Path(path)
    data = parse_json_file(p, "--descriptions")
    if not isinstance(data, dict):
        raise ConfigError(f"--descriptions file {p} must be a JSON object {{class name: [descriptions]}}")
    known = set(class_keys) | set(class_names)
    unknown = sorted(k for k in data if k not in known)
    missing = [n for k, n in zip(class_keys, class_names, strict=True) if k not in data and n not in data]
    if unknown or missing:
        raise ConfigError(
            f"--descriptions file {p} does not match the store's classes: "
            f"missing {len(missing)} class(es) {missing[:10]}; unknown name(s) {unknown[:10]}"
        )
    out = []
    for k, n in zip(class_keys, class_names, strict=True):
        d = data.get(n, data.get(k))
        d = [d] if isinstance(d, str) else d
        if not isinstance(d, list) or not d or not all(isinstance(s, str) and s.strip() for s in d):
            raise ConfigError(f"--descriptions file {p}: class {n!r} needs a non-empty string or list of strings")
        out.append(d)
    return out


def class_prompts(
    class_names: list[str], templates: tuple[str, ...], descriptions: list[list[str]] | None = None
) -> list[list[str]]:
    """The texts encoded per class: templates filled with the name, plus its descriptions."""
    prompts = [[t.format(n) for t in templates] for n in class_names]
    if descriptions is not None:
        prompts = [p + [f"{n}: {d}" for d in ds] for p, n, ds in zip(prompts, class_names, descriptions, strict=True)]
    return prompts


def encode_class_texts(encoder, prompts: list[list[str]], batch: int = 512) -> torch.Tensor:
    """Mean of L2-normalised prompt embeddings per class, renormalised: (C, text_dim) float32."""
    flat = [t for p in prompts for t in p]
    owner = torch.tensor([i for i, p in enumerate(prompts) for _ in p])
    parts = []
    with torch.inference_mode():
        for s in range(0, len(flat), batch):
            parts.append(F.normalize(encoder.encode_texts(flat[s : s + batch]).float().cpu(), dim=-1))
    emb = torch.cat(parts)
    sums = torch.zeros(len(prompts), emb.shape[1]).index_add_(0, owner, emb)
    return F.normalize(sums, dim=-1)
