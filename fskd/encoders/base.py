"""The encoder interface and the spec-string registry.

An encoder turns a batch of preprocessed images into ``(n, d_img)`` features and a list of
strings into ``(m, d_txt)`` features. ``spec`` is a string that rebuilds the same encoder
(``build_encoder(enc.spec)``); it is stored in every feature store.
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod

import torch
from PIL import Image

from fskd.encoders import ENCODERS
from fskd.errors import EncoderError


class Encoder(ABC):
    """Image (and optionally text) tower with its preprocessing."""

    spec: str
    image_dim: int
    text_dim: int | None = None
    #: image and text features live in one space (CLIP); else a bridge is learned
    joint: bool = False
    #: the image tower saw web-scale image-text data (reports say so)
    web_scale: bool = False
    device: torch.device = torch.device("cpu")

    @property
    def has_text(self) -> bool:
        return self.text_dim is not None

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> (3, H, W) float tensor."""

    @abstractmethod
    def preprocess_info(self) -> dict:
        """A JSON-able description of the preprocessing (stored with the features)."""

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) on ``self.device`` -> (n, image_dim) features (not normalised)."""

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """list of m strings -> (m, text_dim) features."""
        raise EncoderError(f"encoder {self.spec!r} has no text tower")

    def prompt_tower(self) -> PromptTower:
        """The text tower as a function of token embeddings (prompt learning: coop, kgcoop)."""
        raise EncoderError(
            f"encoder {self.spec!r} has no text tower that takes token embeddings; prompt learning (coop, kgcoop) "
            f"needs an open_clip model or lite0-minilm"
        )

    def to(self, device: torch.device) -> Encoder:
        self.device = device
        for m in self.modules():
            m.to(device)
        return self

    def modules(self) -> list[torch.nn.Module]:
        """The torch modules of this encoder (moved by ``to``, frozen, counted in reports)."""
        return []

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "image_dim": self.image_dim,
            "text_dim": self.text_dim,
            "joint": self.joint,
            "web_scale": self.web_scale,
            "preprocess": self.preprocess_info(),
        }


class PromptTower(ABC):
    """A frozen text tower that encodes token *embeddings*, so learned context vectors can stand in
    for words (CoOp). ``encode(embed(ids), ids, mask)`` equals the encoder's ``encode_texts`` of the
    texts that ``tokenize`` tokenised (tests check it)."""

    #: width of a token embedding (the context vectors' size)
    width: int
    #: dimension of the encoded text (the store's text features)
    text_dim: int
    #: the model's learned logit scale (CLIP: exp(logit_scale)), None when it has none
    logit_scale: float | None = None
    #: special tokens before the first word (the start / [CLS] token)
    prefix_tokens: int = 1

    @abstractmethod
    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """m texts -> (token ids (m, L) long, attention mask (m, L) bool), one length L for all."""

    @abstractmethod
    def word_count(self, texts: list[str]) -> list[int]:
        """How many tokens each text takes, special tokens excluded (a class name's length)."""

    @abstractmethod
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(m, L) ids -> (m, L, width) token embeddings."""

    @abstractmethod
    def encode(self, embeddings: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(m, L, width) token embeddings (ids and mask of their layout) -> (m, text_dim), not normalised."""

    @abstractmethod
    def modules(self) -> list[torch.nn.Module]:
        """The frozen modules (for device moves and gradient checks)."""


def parse_spec(spec: str) -> tuple[str, str]:
    """``"family:arg..."`` -> (family, arg); a bare family name has an empty arg."""
    family, _, arg = spec.partition(":")
    return family.strip(), arg.strip()


def build_encoder(spec: str, device: torch.device | str | None = None) -> Encoder:
    """Build the encoder a spec names; unknown families list the valid ones."""
    if not spec:
        raise EncoderError(f"empty encoder spec; valid families: {', '.join(ENCODERS.names())}")
    family, arg = parse_spec(spec)
    enc = ENCODERS.get(family)(arg)
    if device is not None:
        enc.to(torch.device(device))
    for m in enc.modules():
        m.eval()
        m.requires_grad_(False)
    return enc


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".ckpt")


def spec_paths(spec: str) -> list[str]:
    """The parts of a spec that may name local files: ``student:DIR``, ``timm:NAME:WEIGHTS``,
    ``openclip:ARCH:WEIGHTS`` (open_clip loads a tag that is an existing path as a file) and
    ``openclip:local-dir:DIR``; for other families, parts written as paths (a ``/``, a leading
    ``~`` or ``.``, a weights suffix). A dimension, a model name or a hub tag is never looked up:
    a file named ``64`` in the working folder must not change ``synthetic:64``."""
    family, arg = parse_spec(spec)
    if family == "student":
        return [arg]
    if family == "openclip" and arg.startswith("local-dir:"):
        return [arg[len("local-dir:") :]]
    if family in ("timm", "openclip"):
        weights = arg.partition(":")[2]
        return [weights] if weights and weights != "pretrained" else []
    if family in ("synthetic", "lite0-minilm"):
        return []
    return [p for p in arg.split(":") if "/" in p or p.startswith(("~", ".")) or p.endswith(WEIGHT_SUFFIXES)]


def weights_identity(spec: str) -> dict[str, str]:
    """Content hashes of the local files a spec names (a checkpoint, a student or open_clip
    folder; see :func:`spec_paths`), so a store extracted before a checkpoint at the same path was
    retrained is not silently reused. Hub tags and random initialisations name no file: ``{}``."""
    import hashlib
    from pathlib import Path

    out: dict[str, str] = {}
    for part in spec_paths(spec):
        p = Path(part).expanduser()
        if not part or not p.exists():
            continue
        files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
        for f in files:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            out[str(f.resolve())] = h.hexdigest()[:32]
    return out


def seeded_init(seed: int = 0):
    """Random initialisation under a fixed seed, so a spec without weights rebuilds the very same
    encoder in every process (resume, torchrun ranks) without touching the caller's RNG."""
    import contextlib

    @contextlib.contextmanager
    def _ctx():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield

    return _ctx()


def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection opens within ``timeout`` seconds (used to fail fast offline)."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False
