"""Encoders: spec strings, the offline pair's real weights, tiny open_clip, fast offline failures."""

from __future__ import annotations

import json
import time

import pytest
import torch
from PIL import Image

from fskd.encoders import ENCODERS, build_encoder
from fskd.errors import EncoderError, RegistryError


def test_registry_and_unknown_family():
    for name in ("openclip", "timm", "lite0-minilm", "synthetic"):
        assert name in ENCODERS
    with pytest.raises(RegistryError, match="Available: .*lite0-minilm.*openclip"):
        build_encoder("clip:ViT-B-16")


def test_openclip_hub_tag_fails_fast_offline():
    t0 = time.perf_counter()
    with pytest.raises(EncoderError, match=r"ViT-B-16:openai.*/path/to/weights\.pt"):
        build_encoder("openclip:ViT-B-16:openai")
    assert time.perf_counter() - t0 < 10


def test_openclip_unknown_arch_and_tag():
    with pytest.raises(EncoderError, match="no architecture 'ViT-Q-99'.*Available: .*ViT-B-16"):
        build_encoder("openclip:ViT-Q-99")
    with pytest.raises(EncoderError, match="no pretrained tag 'nope'.*openai"):
        build_encoder("openclip:ViT-B-16:nope")


def test_tiny_openclip_local_dir(tiny_clip_dir):
    enc = build_encoder(f"openclip:local-dir:{tiny_clip_dir}")
    assert enc.joint and enc.image_dim == enc.text_dim == 32
    x = torch.stack([enc.preprocess(Image.new("RGB", (40, 50), (i * 50, 0, 0))) for i in range(3)])
    feats = enc.encode_images(x)
    assert feats.shape == (3, 32) and torch.isfinite(feats).all()
    assert enc.encode_texts(["a photo of a bird.", "a cat"]).shape == (2, 32)


def test_openclip_local_checkpoint_for_registered_arch(tmp_path, tiny_clip_dir):
    """`openclip:ARCH:/path/weights.pt` loads a local checkpoint through open_clip's own loader."""
    import open_clip

    cfg = json.loads((tiny_clip_dir / "open_clip_config.json").read_text())["model_cfg"]
    (tmp_path / "fskd-tiny-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "fskd-tiny-test.json")
    torch.manual_seed(1)
    ref = open_clip.create_model("fskd-tiny-test")
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    enc = build_encoder(f"openclip:fskd-tiny-test:{tmp_path / 'w.pt'}")
    for a, b in zip(enc.model.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert enc.spec == f"openclip:fskd-tiny-test:{tmp_path / 'w.pt'}"


def test_timm_student_backbone():
    enc = build_encoder("timm:resnet10t")
    assert not enc.has_text and enc.image_dim == 512
    out = enc.encode_images(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 512)
    with pytest.raises(EncoderError, match="has no text tower"):
        enc.encode_texts(["x"])
    with pytest.raises(EncoderError, match="timm has no model 'resnet9000'"):
        build_encoder("timm:resnet9000")


def test_synthetic_encoder_is_deterministic():
    a, b = build_encoder("synthetic:16"), build_encoder("synthetic:16")
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(a.encode_images(x), b.encode_images(x))
    assert torch.equal(a.encode_texts(["x"]), b.encode_texts(["x"]))


def test_lite0_minilm_is_the_real_imagenet_model(cub35_root):
    """The packaged weights mapped onto timm must classify albatrosses as ImageNet 'albatross' (146)."""
    from fskd.encoders.lite0_minilm import load_lite0_backbone

    enc = build_encoder("lite0-minilm")
    files = sorted((cub35_root / "images" / "001.Black_footed_Albatross").iterdir())[:12]
    x = torch.stack([enc.preprocess(Image.open(f).convert("RGB")) for f in files])
    model = load_lite0_backbone(keep_classifier=True).eval()
    with torch.no_grad():
        top1 = model(x).argmax(1)
    assert (top1 == 146).float().mean() >= 0.75
    feats = enc.encode_images(x)
    assert feats.shape == (12, 1280)
    t = enc.encode_texts(["a photo of a Black footed Albatross.", "a photo of a Cardinal."])
    assert t.shape == (2, 384)
    sim = torch.nn.functional.cosine_similarity(t[0], enc.encode_texts(["an albatross"])[0], dim=0)
    assert sim > torch.nn.functional.cosine_similarity(t[1], enc.encode_texts(["an albatross"])[0], dim=0)
