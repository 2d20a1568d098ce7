"""``timm:NAME[:CHECKPOINT]``: an image-only timm backbone (students, image-only teachers).

``timm:resnet18`` is randomly initialised; ``timm:resnet18:/path/weights.pth`` loads a local
state dict; ``timm:resnet18:pretrained`` downloads timm's weights (fails fast offline).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from fskd.encoders.base import ENCODERS, Encoder, host_reachable, seeded_init
from fskd.errors import EncoderError


def create_backbone(name: str, pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """timm model with its classifier removed (pooled features); unknown names list close ones."""
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:15]
        raise EncoderError(f"timm has no model {name!r}; similar names: {', '.join(close) or '(none)'}")
    if pretrained and not host_reachable("huggingface.co"):
        raise EncoderError(
            f"cannot download timm weights for {name!r}: huggingface.co is unreachable. "
            f"Pass a local state dict instead: timm:{name}:/path/to/weights.pth"
        )
    with seeded_init():
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)


class TimmEncoder(Encoder):
    """timm backbone, pooled features, timm's eval preprocessing; no text tower."""

    def __init__(self, arg: str) -> None:
        import timm

        name, _, weights = arg.partition(":")
        if not name:
            raise EncoderError("timm needs a model name, e.g. timm:resnet18")
        self.spec = f"timm:{arg}"
        self.model = create_backbone(name, pretrained=weights == "pretrained").eval()
        if weights and weights != "pretrained":
            if not Path(weights).exists():
                raise EncoderError(f"timm:{arg}: checkpoint {weights} does not exist")
            state = torch.load(weights, map_location="cpu", weights_only=True)
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if missing:
                raise EncoderError(f"timm:{arg}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        self.web_scale = False
        self.image_dim = int(self.model.num_features)
        cfg = timm.data.resolve_data_config({}, model=self.model)
        self._cfg = cfg
        self._tf = timm.data.create_transform(**cfg)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._tf(image)

    def preprocess_info(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self._cfg.items()}

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


@ENCODERS.register("timm")
def _build(arg: str) -> Encoder:
    return TimmEncoder(arg)
