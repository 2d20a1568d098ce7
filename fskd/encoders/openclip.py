"""``openclip:ARCH[:PRETRAINED]``: any open_clip model, from a pretrained tag or a local file.

- ``openclip:ViT-B-16:openai``: a hub tag (needs a network the first time; cached after).
- ``openclip:ViT-B-16:/path/to/weights.pt``: a local checkpoint for that architecture.
- ``openclip:local-dir:/path``: a folder with ``open_clip_config.json`` and weights
  (``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``), as open_clip saves them.
- ``openclip:ARCH``: random initialisation (tests, or a student trained from scratch).

Offline, a hub tag that is not in the local cache fails within seconds with a message that
names the weights and how to pass a local file, instead of waiting for hub retries.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from pathlib import Path

import torch
from PIL import Image

from fskd.encoders.base import ENCODERS, Encoder, PromptTower, host_reachable, seeded_init
from fskd.errors import EncoderError

log = logging.getLogger(__name__)

DEFAULT_SPEC = "openclip:ViT-B-16:openai"


#: a tiny CLIP (ViT and text transformer of 2 layers, 32-d joint space, 16 text positions): with
#: random weights, the tests' and the offline parity checks' stand-in for a real open_clip model
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def save_random_model(folder: str | Path, model_cfg: dict | None = None, seed: int = 0) -> Path:
    """Write an open_clip model of ``model_cfg`` (default :data:`TINY_CONFIG`) with seeded random
    weights as open_clip saves a local model folder, so that ``openclip:local-dir:<folder>`` loads
    it in any process. Returns the folder."""
    import json

    import open_clip

    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": model_cfg or TINY_CONFIG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (d / "open_clip_config.json").write_text(json.dumps(cfg))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**cfg["model_cfg"])
    torch.save(model.state_dict(), d / "open_clip_pytorch_model.bin")
    return d


def _cached(cfg: dict) -> bool:
    """Whether the hub files of a pretrained config are already in the local cache."""
    repo = cfg.get("hf_hub", "").rstrip("/")
    if not repo:
        return False
    from huggingface_hub import try_to_load_from_cache

    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(repo, name), str):
            return True
    return False


def check_weights_reachable(arch: str, tag: str) -> None:
    """Raise EncoderError within seconds when ``tag`` weights are neither cached nor downloadable."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag not in tags:
        raise EncoderError(
            f"open_clip has no pretrained tag {tag!r} for {arch!r} and no file {tag!r} exists. "
            f"Tags for {arch}: {', '.join(tags) or '(none)'}; or pass a local checkpoint: openclip:{arch}:/path/to/weights.pt"
        )
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if _cached(cfg):
        return
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not host_reachable(host):
        where = cfg.get("hf_hub") or cfg.get("url") or "the hub"
        raise EncoderError(
            f"cannot download open_clip weights {arch}:{tag} ({where}): {host} is unreachable and they are not "
            f"in the local cache. Download them where there is a network and pass the file: "
            f"--encoder openclip:{arch}:/path/to/weights.pt (or openclip:local-dir:/path/to/folder)"
        )


class OpenClipEncoder(Encoder):
    """An open_clip image-text model (joint space)."""

    joint = True

    def __init__(self, arg: str) -> None:
        import open_clip

        if not arg:
            raise EncoderError(f"openclip needs an architecture, e.g. {DEFAULT_SPEC}")
        if arg.startswith("local-dir:"):
            path = arg[len("local-dir:") :]
            if not (Path(path) / "open_clip_config.json").exists():
                raise EncoderError(f"openclip:local-dir:{path}: no open_clip_config.json in {path}")
            name, pretrained = f"local-dir:{path}", None
        else:
            name, _, pretrained = arg.partition(":")
            pretrained = pretrained or None
            if name not in open_clip.list_models():
                raise EncoderError(
                    f"open_clip has no architecture {name!r}. Available: {', '.join(open_clip.list_models())}"
                )
            if pretrained and not Path(pretrained).exists():
                check_weights_reachable(name, pretrained)
        self.spec = f"openclip:{arg}"
        self.web_scale = pretrained is not None or name.startswith("local-dir:")
        try:
            with seeded_init():
                model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        except RuntimeError as e:
            raise EncoderError(f"encoder {self.spec!r}: {e}") from None
        self.model = model.eval()
        self._preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(name)
        dim = getattr(model.visual, "output_dim", None) or model.text_projection.shape[-1]
        self.image_dim = self.text_dim = int(dim)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._preprocess(image)

    def preprocess_info(self) -> dict:
        return {"open_clip": repr(self._preprocess).replace("\n", " ")}

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        with torch.inference_mode():
            return self.model.encode_text(tokens).float()

    def prompt_tower(self) -> PromptTower:
        return OpenClipPromptTower(self.model, self.tokenizer, self.spec)


class OpenClipPromptTower(PromptTower):
    """open_clip's ``CLIP.encode_text`` from token embeddings (positional embedding, the causal
    transformer, ln_final, pooling at the end-of-text token, projection).

    With the causal mask a token only sees the tokens before it, so the padding after the last
    end-of-text token cannot change the pooled feature: ``tokenize`` cuts the sequences there
    (77 -> about 20 positions for class prompts), which changes nothing but the cost."""

    prefix_tokens = 1  # <start_of_text>

    def __init__(self, model, tokenizer, spec: str) -> None:
        need = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        missing = [a for a in need if not hasattr(model, a)]
        if missing:
            raise EncoderError(
                f"encoder {spec!r}: prompt learning needs open_clip's built-in text transformer; "
                f"{type(model).__name__} has no {', '.join(missing)} (e.g. a Hugging Face text tower)"
            )
        self.model, self.tokenizer = model, tokenizer
        self.width = int(model.token_embedding.weight.shape[1])
        proj = model.text_projection
        self.text_dim = int(proj.out_features if isinstance(proj, torch.nn.Linear) else proj.shape[-1])
        self.logit_scale = float(model.logit_scale.detach().exp().clamp(max=100.0))
        self.causal = getattr(model, "attn_mask", None) is not None

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(texts).to(self.model.token_embedding.weight.device)
        if self.causal and self.model.text_pool_type == "argmax":
            ids = ids[:, : int(ids.argmax(-1).max()) + 1]  # nothing after the last end-of-text token matters
        return ids, ids != 0

    def word_count(self, texts: list[str]) -> list[int]:
        return [int((self.tokenizer([t])[0] != 0).sum()) - 2 for t in texts]  # minus start and end of text

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(ids)

    def encode(self, embeddings: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        m = self.model
        L = embeddings.shape[1]
        cast = m.transformer.get_cast_dtype()
        x = embeddings.to(cast) + m.positional_embedding[:L].to(cast)
        attn = None if m.attn_mask is None else m.attn_mask[:L, :L]
        x = m.ln_final(m.transformer(x, attn_mask=attn))
        x = text_global_pool(x, ids, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        proj = m.text_projection
        return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]


@ENCODERS.register("openclip")
def _build(arg: str) -> Encoder:
    return OpenClipEncoder(arg)
