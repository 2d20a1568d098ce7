"""``synthetic:DIM``: a fixed random projection of pixels. For benchmarks and fast tests only.

Images are resized to 8x8, flattened and multiplied by a seeded (192, DIM) matrix; texts are
hashed to seeded vectors. It costs almost nothing, so extraction benchmarks measure the
pipeline (loader, store) rather than a network.
"""

from __future__ import annotations

import hashlib

import torch
import torchvision.transforms as T
from PIL import Image

from fskd.encoders.base import ENCODERS, Encoder
from fskd.errors import EncoderError


class SyntheticEncoder(Encoder):
    joint = False
    web_scale = False

    def __init__(self, dim: int) -> None:
        self.spec = f"synthetic:{dim}"
        self.image_dim = self.text_dim = dim
        g = torch.Generator().manual_seed(dim)
        self.proj = torch.nn.Linear(3 * 8 * 8, dim, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(dim, 192, generator=g) / 192**0.5)
        self._tf = T.Compose([T.Resize((8, 8)), T.ToTensor()])

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._tf(image)

    def preprocess_info(self) -> dict:
        return {"resize": [8, 8]}

    def modules(self) -> list[torch.nn.Module]:
        return [self.proj]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images.flatten(1))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            out.append(torch.randn(self.image_dim, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(out).to(self.device)


@ENCODERS.register("synthetic")
def _build(arg: str) -> Encoder:
    try:
        dim = int(arg or 64)
    except ValueError:
        raise EncoderError(f"synthetic:DIM needs an integer dimension, got {arg!r}") from None
    if dim < 1:
        raise EncoderError(f"synthetic:DIM needs a positive dimension, got {dim}")
    return SyntheticEncoder(dim)
