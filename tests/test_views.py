"""Methods on a store with augmented views (``fskd extract --augment-views``): tip-adapter builds
its cache from the mean of each shot's views, tip-adapter-f and fma train on the views, each says
so in its state; without views they say why not. (The store side, kills and repairs: test_faults.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fskd import api
from fskd.config import AdaptConfig, AlignConfig, EvalConfig, ExtractConfig
from fskd.methods import load_state
from fskd.methods.adapt.text_space import TextSpace
from fskd.store import FeatureStore, sampling
from fskd.store.extract import random_view, view_seed


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """(plain store, the same store with 4 views per train row): 6 classes x 10 noise images."""
    d = tmp_path_factory.mktemp("views")
    rng = np.random.default_rng(1)
    for c in range(6):
        (d / "img" / f"c{c}").mkdir(parents=True)
        for i in range(10):
            arr = (rng.random((32, 40, 3)) * 90 + c * 25).astype("uint8")
            Image.fromarray(arr).save(d / "img" / f"c{c}" / f"{i}.png")
    kw = dict(
        dataset="folder",
        root=str(d / "img"),
        encoder="synthetic:12",
        workers=0,
        batch_size=8,
        chunk_rows=8,
        sample_split=(0.5, 0.25, 0.25),
        class_ratio=(0.5, 0.34, 0.16),
    )
    api.extract(ExtractConfig(**kw, store=str(d / "plain.zarr")))
    api.extract(ExtractConfig(**kw, store=str(d / "views.zarr"), augment_views=4))
    return str(d / "plain.zarr"), str(d / "views.zarr")


def test_random_view_is_a_function_of_its_seed():
    img = Image.fromarray((np.random.default_rng(0).random((30, 50, 3)) * 255).astype("uint8"))
    a, b = random_view(img, view_seed(0, 3, 1), 16, (0.5, 1.0)), random_view(img, view_seed(0, 3, 1), 16, (0.5, 1.0))
    assert a.size == (16, 16) and np.array_equal(np.asarray(a), np.asarray(b))
    others = [np.asarray(random_view(img, view_seed(0, 3, v), 16, (0.5, 1.0))) for v in range(2, 6)]
    assert any(not np.array_equal(np.asarray(a), o) for o in others)
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    random_view(img, 123, 16, (0.5, 1.0))  # the global torch stream is untouched
    assert torch.equal(torch.rand(3), before)


def _fit(method, store, out, **kw):
    Cfg, run = (AlignConfig, api.align) if method.startswith("fma") else (AdaptConfig, api.adapt)
    return load_state(run(Cfg(store=store, method=method, shots=2, seed=1, out=str(out), force=True, **kw)).out)


def test_tip_adapter_cache_is_the_mean_of_the_views(stores, tmp_path):
    plain, views = stores
    sp, sv = _fit("tip-adapter", plain, tmp_path / "p"), _fit("tip-adapter", views, tmp_path / "v")
    assert sp.hparams["allway.views"] == 0 and sp.selected_on["allway.views"].startswith("none: no augmented views")
    assert sv.hparams["allway.views"] == 4 and "4 augmented views per shot" in sv.selected_on["allway.views"]
    # the kept keys: normalize(mean of a shot's raw views - the support mean), class-major
    st = FeatureStore.open(views)
    x, _, classes = sampling.allway_shots(st, 2, 1)
    v, _ = sampling.allway_shot_views(st, 2, 1)
    center = torch.from_numpy(x).mean(0)
    want = F.normalize(torch.from_numpy(v).mean(1) - center, dim=-1)
    torch.testing.assert_close(sv.tensors["allway.fitted.keys"][0], want, atol=1e-5, rtol=1e-5)
    # eval on the state's own shots uses those keys; the plain store's state has none
    assert "allway.fitted.keys" not in sp.tensors
    acc = [
        api.evaluate(EvalConfig(store=s, state=str(tmp_path / n), protocol="allway", shots=2, seeds=(1,))).accuracy
        for s, n in ((plain, "p"), (views, "v"))
    ]
    assert all(0 <= a <= 100 for a in acc)


def test_tip_adapter_f_trains_on_the_views_and_eval_keeps_its_keys(stores, tmp_path, monkeypatch):
    _, views = stores
    st = _fit("tip-adapter-f", views, tmp_path / "f")
    assert st.hparams["allway.views"] == 4
    if st.hparams["allway.epochs"] > 0:
        import fskd.methods.adapt.tip_adapter_f as tf

        monkeypatch.setattr(tf, "train_keys", lambda *a, **k: (_ for _ in ()).throw(AssertionError("refit")))
    r = api.evaluate(EvalConfig(store=views, state=str(tmp_path / "f"), protocol="allway", shots=2, seeds=(1,)))
    assert 0 <= r.accuracy <= 100


def test_train_keys_with_views_starts_at_their_cache_and_moves():
    from fskd.methods.adapt.tip_adapter_f import train_keys

    g = torch.Generator().manual_seed(0)
    sup = F.normalize(torch.randn(1, 3, 2, 8, generator=g), dim=-1)
    views = F.normalize(sup.reshape(1, 1, 6, 8) + 0.3 * torch.randn(1, 4, 6, 8, generator=g), dim=-1)
    space = TextSpace(F.normalize(torch.randn(1, 3, 8, generator=g), dim=-1), lambda t: F.normalize(t, dim=-1), sup)
    keys0 = F.normalize(views.mean(1), dim=-1)
    assert torch.equal(train_keys(space, 2.0, 5.5, epochs=3, stop=0, views=views, keys0=keys0).keys, keys0)
    run = train_keys(space, 2.0, 5.5, epochs=3, views=views, keys0=keys0)
    assert run.epoch == 3 and torch.isfinite(run.keys).all() and not torch.allclose(run.keys, keys0)
    again = train_keys(space, 2.0, 5.5, epochs=3, views=views, keys0=keys0)
    assert torch.equal(again.keys, run.keys)  # seeded


def test_fma_trains_on_the_views(stores, tmp_path):
    plain, views = stores
    opts = {"options": {"recipe": "lite", "iters": 30}}
    sv, sp = _fit("fma", views, tmp_path / "a", **opts), _fit("fma", plain, tmp_path / "b", **opts)
    assert sv.hparams["allway.views"] == 4 and "augmented views" in sv.selected_on["allway.views"]
    assert sp.hparams["allway.views"] == 0 and sp.selected_on["allway.views"].startswith("none")
    a, b = sv.metrics["allway.train_loss"], sp.metrics["allway.train_loss"]
    assert np.isfinite(a).all() and a != b


def test_train_field_with_identical_views_is_the_run_without_views():
    from fskd.methods.align.flow import make_field, train_field

    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g)
    curves = []
    for views in (None, x0[:, None].expand(10, 3, 6).contiguous()):
        torch.manual_seed(0)
        f = make_field("mlp", 6, 16, 1)
        curves.append(
            train_field(f, x0, x1, iters=20, batch_size=4, lr=1e-2, weight_decay=0.0, gamma=0.5, seed=3, x0_views=views)
        )
    assert curves[0] == curves[1]
