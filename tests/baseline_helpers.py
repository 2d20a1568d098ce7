"""What the baselines' tests (test_baselines*.py) share: their stores, the CLI round trip of a
state, the checks every text baseline passes, and torch's own optimisers as references."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fskd import api
from fskd.cli import app
from fskd.config import AdaptConfig, EvalConfig, ExtractConfig
from fskd.errors import StoreError
from fskd.methods import METHODS, MethodState, load_state
from fskd.methods.adapt.regimes import ALLWAY, allway_rows
from fskd.methods.adapt.text_space import TextSpace, support_text_space
from fskd.methods.adapt.validation import hp
from fskd.store import FeatureStore, sampling
from fskd.store.synthetic import synthetic_features


# -- stores ---------------------------------------------------------------------------------------
def clip_like_store(path: Path) -> str:
    """A joint store whose text is an imperfect class centre (noise 0.8, text moved by 0.3 noise):
    the shots matter. 12 classes: 6 base, 3 val, 3 novel."""
    splits, text = synthetic_features(n_classes=12, per_class=40, joint=True, noise=0.8, gap=0.5, seed=3)
    text = text + 0.3 * np.random.default_rng(4).normal(size=text.shape).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    FeatureStore.from_arrays(
        path,
        splits,
        [f"class {i}" for i in range(12)],
        {"base": list(range(6)), "val": [6, 7, 8], "novel": [9, 10, 11]},
        text_embeddings=text,
        encoder={"spec": "synthetic-features:clip-like", "joint": True},
        chunk_rows=64,
    )
    return str(path)


def views_store(root: Path, views: int) -> str:
    """6 classes x 10 tinted noise images under ``root / "img"``, extracted with ``views`` augmented
    views of every image (``--augment-views``) into ``root / "views.zarr"``."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in range(6):
        (root / "img" / f"c{c}").mkdir(parents=True)
        for i in range(10):
            Image.fromarray((rng.random((32, 40, 3)) * 90 + c * 25).astype("uint8")).save(
                root / "img" / f"c{c}" / f"{i}.png"
            )
    path = str(root / "views.zarr")
    api.extract(
        ExtractConfig(
            dataset="folder",
            root=str(root / "img"),
            encoder="synthetic:12",
            workers=0,
            batch_size=8,
            chunk_rows=8,
            sample_split=(0.5, 0.25, 0.25),
            class_ratio=(0.5, 0.34, 0.16),
            store=path,
            augment_views=views,
        )
    )
    return path


def fit_on_views(path: str, method: str, out: Path, views: int, options: dict | None = None) -> MethodState:
    """A 2-shot fit on a :func:`views_store`: the state says it used the ``views`` stored views of
    every shot, and its all-way accuracy is finite."""
    r = api.adapt(
        AdaptConfig(store=path, method=method, shots=2, out=str(out), device="cpu", options=options or {}),
        progress=None,
    )
    st = load_state(r.out)
    assert st.hparams["allway.views"] == views and f"{views} augmented views per shot" in st.selected_on["allway.views"]
    ev = api.evaluate(EvalConfig(store=path, state=r.out, protocol="allway", shots=2, seeds=(1,), device="cpu"))
    assert np.isfinite(ev.accuracy)
    return st


def own_shots(state: MethodState, store: FeatureStore) -> tuple[TextSpace, torch.Tensor]:
    """A 2-shot, seed-1 state's all-way text space of its own shots, and their stored views (1, V, N*K, D)."""
    x, _, classes = allway_rows(store, 2, 1)
    support = torch.from_numpy(x).reshape(len(classes), 2, -1)[None]
    ts = support_text_space(
        support, torch.from_numpy(classes)[None], state.tensors["text"], store.joint, hp(state, ALLWAY, "ridge")
    )
    return ts, torch.from_numpy(sampling.allway_shot_views(store, 2, 1)[0]).transpose(0, 1)[None]


# -- fitted, saved, scored by the CLI -------------------------------------------------------------
def set_args(options: dict) -> list[str]:
    """``options`` as ``--set KEY=JSON`` arguments."""
    return [a for k, v in options.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def cli_adapt(store: FeatureStore, method: str, out: Path, options: dict | None = None) -> MethodState:
    """``fskd adapt`` at 2 shots on the CPU: the state it saved, checked finite and with its
    normalisation recorded as fixed."""
    res = CliRunner().invoke(
        app,
        [
            "adapt",
            "--store",
            str(store.path),
            "--method",
            method,
            "--shots",
            "2",
            "--out",
            str(out),
            "--device",
            "cpu",
            *set_args(options or {}),
        ],
    )
    assert res.exit_code == 0, res.output
    state = load_state(out)
    assert all(torch.isfinite(v.float()).all() for v in state.tensors.values())
    assert "normalisation" in state.hparams and state.selected_on["normalisation"].startswith("fixed")
    return state


def cli_allway_accuracy(store: FeatureStore, out: Path) -> None:
    """``fskd eval --protocol allway`` of the state at 2 shots, seed 1: finite and above 3x chance."""
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "--store",
            str(store.path),
            "--state",
            str(out),
            "--protocol",
            "allway",
            "--shots",
            "2",
            "--seeds",
            "1",
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    r = json.loads(res.output.strip().splitlines()[-1])
    assert np.isfinite(r["accuracy"]) and r["accuracy"] > 3 * 100 / store.num_classes  # chance is 5%


# -- what every text baseline does ----------------------------------------------------------------
def assert_refuses_a_store_without_text(method: str, tmp_path: Path) -> None:
    splits, _ = synthetic_features(n_classes=12)
    st = FeatureStore.from_arrays(
        tmp_path / "notext.zarr",
        splits,
        [f"c{i}" for i in range(12)],
        {"base": list(range(6)), "val": [6, 7, 8], "novel": [9, 10, 11]},
    )
    with pytest.raises(StoreError, match="needs class text features"):
        api.adapt(AdaptConfig(store=str(st.path), method=method, shots=1, out=str(tmp_path / "x")), progress=None)


def assert_registered_as_text_baseline(method: str) -> None:
    """An adapt method that needs class text and classifies classes it got no shot of."""
    cls = METHODS.get(method)
    assert cls.kind == "adapt" and cls.needs_text and cls.transfers_to_new_classes


# -- references ---------------------------------------------------------------------------------------
def random_rows(E: int, N: int, K: int, D: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E episodes of N x K L2-normalised random rows (class-major), their way labels (E, N*K) and
    N L2-normalised random text weights (E, N, D), drawn in that order from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(E, N * K, D, generator=g), dim=-1)
    y = torch.arange(N).repeat_interleave(K)[None].expand(E, -1).contiguous()
    t = F.normalize(torch.randn(E, N, D, generator=g), dim=-1)
    return x, y, t


def torch_steps(
    opt: torch.optim.Optimizer, steps: int, lr_at: Callable[[int], float], loss: Callable[[], torch.Tensor]
) -> None:
    """The authors' loops with torch's own optimiser: ``steps`` steps of ``loss()``, at learning
    rate ``lr_at(step)`` (set before each step)."""
    for i in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(i)
        opt.zero_grad()
        loss().backward()
        opt.step()
