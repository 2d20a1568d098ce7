"""``student:DIR``: a student encoder written by ``fskd distill``.

``DIR`` is the state directory distill wrote (``DIR/state.json`` naming its tensor file
``DIR/state-<sha>.safetensors``); ``student:DIR/<that file>`` works too. The image tower is the
student backbone (pooled features, not the distillation projection heads) at the resolution it
was trained at; the text tower is the teacher's text tower when the teacher store had one, so a
store extracted with a student still gets class text features (a bridge is learned between the
two spaces, as for any non-joint pair).

This module also holds what the distill methods and this encoder must agree on, so that a
student sees exactly the same pixels at training (validation views) and at extraction:
:func:`build_student_backbone`, :func:`decode_square`, :func:`center_view` and
:func:`normalize_images`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fskd.datasets.base import to_rgb
from fskd.encoders.base import ENCODERS, Encoder, build_encoder, parse_spec
from fskd.encoders.timm_encoder import create_backbone
from fskd.errors import EncoderError, StateError
from fskd.fsutil import read_bundle

log = logging.getLogger(__name__)

# file names of a method state directory (fskd.methods.base; encoders may not import methods)
STATE_JSON = "state.json"
#: prefix of the student backbone tensors inside a distill state
STUDENT_PREFIX = "student."
#: ratio of the stored square to the crop (ImageNet's 256 -> 224 convention)
CROP_RATIO = 0.875
STUDENT_FAMILIES = ("timm",)


@dataclass(frozen=True)
class StudentSpec:
    """A parsed ``--student`` spec: ``timm:NAME`` (random init), ``timm:NAME:/path/weights.pth``
    (a local state dict) or ``timm:NAME:pretrained`` (timm's weights; needs the network)."""

    name: str
    weights: str = ""

    @classmethod
    def parse(cls, spec: str) -> StudentSpec:
        family, arg = parse_spec(spec)
        if family not in STUDENT_FAMILIES:
            raise EncoderError(
                f"student spec {spec!r}: family {family!r} is not a student family; valid: "
                f"{', '.join(f + ':NAME[:/path/weights.pth|:pretrained]' for f in STUDENT_FAMILIES)} "
                f"(e.g. timm:resnet18, timm:resnet10t, timm:vit_tiny_patch16_224)"
            )
        name, _, weights = arg.partition(":")
        if not name:
            raise EncoderError(f"student spec {spec!r} needs a model name, e.g. timm:resnet18")
        if weights and weights != "pretrained" and not Path(weights).exists():
            raise EncoderError(f"student spec {spec!r}: checkpoint {weights} does not exist")
        return cls(name=name, weights=weights)


def stored_size(image_size: int) -> int:
    """Side of the square kept in memory for crops of ``image_size`` (e.g. 56 -> 64)."""
    return int(round(image_size / CROP_RATIO))


def build_student_backbone(
    name: str, image_size: int, kwargs: dict | None = None, weights: str = ""
) -> torch.nn.Module:
    """A timm backbone (classifier removed) for ``image_size`` inputs.

    Models with a fixed input grid (ViTs: a ``patch_embed`` with an image size) are rebuilt
    for ``image_size``; convolutional ones take any size as they are. ``weights`` is "" (random
    init), "pretrained" or a local state dict path (a checkpoint start).
    """
    kwargs = dict(kwargs or {})
    model = create_backbone(name, pretrained=weights == "pretrained", **kwargs)
    if getattr(getattr(model, "patch_embed", None), "img_size", None) is not None and "img_size" not in kwargs:
        model = create_backbone(name, pretrained=weights == "pretrained", img_size=image_size, **kwargs)
    if weights and weights != "pretrained":
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        missing, _ = model.load_state_dict(state, strict=False)
        if missing:
            raise EncoderError(f"checkpoint {weights} lacks {len(missing)} tensors of {name}, e.g. {missing[:3]}")
    return model


def model_norm(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a timm model expects (ImageNet's when it does not say)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def decode_square(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) uint8 RGB: shorter side resized to ``size`` (bicubic,
    antialiased), then the centre square. Training caches and extraction both go through here.
    Any image is first made RGB as a viewer shows it (``to_rgb``: a copy for a dataset's, already RGB)."""
    image = to_rgb(image)  # first: an EXIF rotation swaps width and height
    w, h = image.size
    s = size / min(w, h)
    nw, nh = max(size, int(round(w * s))), max(size, int(round(h * s)))
    image = image.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    arr = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def center_view(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """(n, 3, S, S) -> (n, 3, image_size, image_size): the central crop (no resampling)."""
    s = images.shape[-1]
    o = (s - image_size) // 2
    return images[..., o : o + image_size, o : o + image_size]


def normalize_images(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float (n, 3, H, W) -> normalised float32 (mean/std are (3,) tensors)."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    return (x - mean.view(1, 3, 1, 1).to(x.device)) / std.view(1, 3, 1, 1).to(x.device)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A short hash of a tensor dict (identifies one trained student)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_student_dir(arg: str) -> Path:
    """``DIR`` or ``DIR/<tensor file>`` -> the resolved state directory (checked)."""
    if not arg:
        raise EncoderError("student needs a state directory: student:DIR (written by fskd distill --out DIR)")
    p = Path(arg).expanduser()
    if p.is_file():
        p = p.parent
    if not (p / STATE_JSON).is_file():
        raise EncoderError(
            f"student:{arg}: {p} is not a distilled student (needs {STATE_JSON} and its tensor file); "
            f"write one with `fskd distill --store S --out {arg}`"
        )
    return p.resolve()


class StudentEncoder(Encoder):
    """The student backbone distill trained, plus the teacher's text tower when it had one."""

    joint = False
    web_scale = False

    def __init__(self, arg: str) -> None:
        self.directory = resolve_student_dir(arg)
        try:
            info, tensors = read_bundle(self.directory, STATE_JSON, what="student")
        except StateError as e:
            raise EncoderError(f"student:{arg}: {e}") from None
        if info.get("kind") != "distill" or "student" not in info.get("hparams", {}):
            raise EncoderError(
                f"student:{arg}: {self.directory} holds a {info.get('kind')!r} state, not a distilled student"
            )
        hp = info["hparams"]
        self.spec = f"student:{arg}"
        self.student_name = hp["student"]
        self.image_size = int(hp["image_size"])
        self.size = stored_size(self.image_size)
        weights = {k[len(STUDENT_PREFIX) :]: v for k, v in tensors.items() if k.startswith(STUDENT_PREFIX)}
        if not weights:
            raise EncoderError(f"student:{arg}: the tensors of {self.directory} hold no {STUDENT_PREFIX}* tensors")
        self.model = build_student_backbone(self.student_name, self.image_size, hp.get("student_kwargs") or {})
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise EncoderError(
                f"student:{arg}: checkpoint does not fit {self.student_name} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        self.model.eval()
        self.student_id = hp.get("student_id") or tensor_digest(weights)
        mean, std = model_norm(self.model)
        self._mean, self._std = torch.tensor(mean), torch.tensor(std)
        self.image_dim = int(self.model.num_features)
        self.teacher_spec = info.get("encoder", "")
        self.text_dim = hp.get("teacher_text_dim")  # None when the teacher store had no text
        self._teacher: Encoder | None = None

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return normalize_images(
            center_view(decode_square(image, self.size), self.image_size)[None], self._mean, self._std
        )[0]

    def preprocess_info(self) -> dict:
        return {
            "resize_shorter": self.size,
            "crop": self.image_size,
            "resample": "bicubic",
            "mean": list(self._mean.tolist()),
            "std": list(self._std.tolist()),
            "student": self.student_name,
            "student_dir": str(self.directory),
            "student_id": self.student_id,
            "teacher": self.teacher_spec,
        }

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        if self.text_dim is None:
            raise EncoderError(f"{self.spec}: the teacher {self.teacher_spec!r} had no text tower")
        if self._teacher is None:  # built on first use: image-only work never loads the teacher
            self._teacher = build_encoder(self.teacher_spec, self.device)
        return self._teacher.encode_texts(texts)


@ENCODERS.register("student")
def _build(arg: str) -> Encoder:
    return StudentEncoder(arg)
