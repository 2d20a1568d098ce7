"""coop / kgcoop: prompt learning on cached image features, with real text towers (a tiny open_clip
model of random weights, and the offline pair's MiniLM)."""

from __future__ import annotations

import pytest
import torch

from fskd import api
from fskd.config import AdaptConfig, EvalConfig, ExtractConfig
from fskd.methods import METHODS, load_state
from fskd.store import FeatureStore

CPU = torch.device("cpu")
FAST = {"epochs": 3, "val_episodes": 20, "val_way": 2}
N_CTX = {"coop": {"n_ctx": 4}, "kgcoop": {}}  # the tiny model takes 16 positions


@pytest.fixture(scope="module")
def photo_store(image_folder, tiny_clip_dir, tmp_path_factory):
    """The image folder under the tiny open_clip, class text from the single template 'a photo of a {}.'."""
    d = tmp_path_factory.mktemp("coop-store")
    (d / "templates.txt").write_text("a photo of a {}.\n")
    path = d / "tiny.zarr"
    api.extract(
        ExtractConfig(
            dataset="folder",
            root=str(image_folder),
            encoder=f"openclip:local-dir:{tiny_clip_dir}",
            store=str(path),
            workers=0,
            batch_size=16,
            chunk_rows=16,
            sample_split=(0.5, 0.25, 0.25),
            templates=str(d / "templates.txt"),
        )
    )
    return FeatureStore.open(path)


def _adapt(store, method, out, **options):
    r = api.adapt(
        AdaptConfig(
            store=str(store.path),
            method=method,
            shots=2,
            seed=1,
            out=str(out),
            device="cpu",
            options={**FAST, **options},
            force=True,
        )
    )
    return load_state(r.out)


def test_prompt_towers_equal_the_encoders_text_features(tiny_clip_dir):
    """encode(embed(ids)) is the encoder's own encode_texts (open_clip's sequences cut after the
    last end-of-text token; MiniLM's mean pooling), so learned context replaces words exactly."""
    from fskd.encoders import build_encoder

    texts = ["a photo of a house finch.", "a photo of a cat.", "X X X X a very long bird name indeed."]
    for spec in (f"openclip:local-dir:{tiny_clip_dir}", "lite0-minilm"):
        enc = build_encoder(spec)
        tower = enc.prompt_tower()
        ids, mask = tower.tokenize(texts)
        with torch.no_grad():
            out = tower.encode(tower.embed(ids), ids, mask)
        torch.testing.assert_close(out.float(), enc.encode_texts(texts), atol=1e-5, rtol=1e-5)
        assert tower.word_count(["cat"]) == [1] and tower.word_count(["cat cat cat"]) == [3]


def test_gradient_reaches_the_context_and_nothing_else(photo_store):
    from fskd.methods.adapt.coop import PromptLearner, prompt_tower

    tower = prompt_tower(photo_store.encoder_spec, CPU, "coop")
    for position in ("end", "middle", "front"):
        learner = PromptLearner(tower, photo_store.class_names, 4, "", False, position, seed=0)
        t = learner.text(torch.arange(photo_store.num_classes))
        assert t.shape == (photo_store.num_classes, tower.text_dim) and torch.isfinite(t).all()
        t.square().sum().backward()
        assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
        assert all(p.grad is None and not p.requires_grad for m in tower.modules() for p in m.parameters())
    csc = PromptLearner(tower, photo_store.class_names, 4, "", True, "end", seed=0)
    assert csc.ctx.shape == (photo_store.num_classes, 4, tower.width)


def test_zero_epochs_from_a_photo_of_a_equals_zero_shot(photo_store, tmp_path):
    """coop with 'a photo of a' as its initial context and no training is zero-shot with the
    template 'a photo of a {}.' (the store's class text): same text features, same logits."""
    st = _adapt(photo_store, "coop", tmp_path / "coop", epochs=0, ctx_init="a photo of a")
    zs = load_state(
        api.adapt(
            AdaptConfig(
                store=str(photo_store.path), method="zero-shot", shots=2, seed=1, out=str(tmp_path / "zs"), device="cpu"
            )
        ).out
    )
    assert st.hparams["n_ctx"] == 4 and st.hparams["allway.epochs"] == 0
    for r in ("allway", "episodic"):
        torch.testing.assert_close(st.tensors[f"{r}.text"], zs.tensors["text"], atol=2e-5, rtol=1e-4)
    x, _ = photo_store.gather(None, ["test"])
    q = torch.from_numpy(x)[None]
    sup = torch.zeros(1, photo_store.num_classes, 0, photo_store.dim)
    cls = torch.arange(photo_store.num_classes)[None]
    a = METHODS.get("coop")().head(st, photo_store, CPU).fit(sup, cls).logits(q)
    b = METHODS.get("zero-shot")().head(zs, photo_store, CPU).fit(sup, cls).logits(q)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["coop", "kgcoop"])
def test_states_are_deterministic_and_evaluate_without_the_text_encoder(method, photo_store, tmp_path, monkeypatch):
    st = _adapt(photo_store, method, tmp_path / "a", **N_CTX[method])
    again = _adapt(photo_store, method, tmp_path / "b", **N_CTX[method])
    assert st.tensors.keys() == again.tensors.keys() and st.hparams == again.hparams
    assert all(torch.equal(st.tensors[k], again.tensors[k]) for k in st.tensors)
    assert st.selected_on["allway.epochs"] == "chosen on val split (min(K, 4) per class)" and "test" not in str(
        st.selected_on.values()
    )
    ctx = st.tensors["allway.ctx"]
    assert ctx.shape == (4, 64) and torch.isfinite(ctx).all()
    assert not torch.equal(st.tensors["allway.text"], st.tensors["text"])  # training moved the prompts

    import fskd.encoders.base as eb

    def no_encoder(*a, **k):
        raise AssertionError("evaluation built an encoder")

    monkeypatch.setattr(eb, "build_encoder", no_encoder)
    monkeypatch.setattr("fskd.encoders.build_encoder", no_encoder, raising=False)
    r = api.evaluate(
        EvalConfig(
            store=str(photo_store.path), state=str(tmp_path / "a"), protocol="allway", shots=2, seeds=(1,), device="cpu"
        )
    )
    assert 0 <= r.accuracy <= 100 and r.classes == photo_store.num_classes


def test_kgcoop_stays_nearer_the_hand_crafted_prompts(photo_store, tmp_path):
    """The knowledge-guided term holds the learned class text near the store's class text."""
    import torch.nn.functional as F

    cos = {}
    for m, lam in (("coop", 0.0), ("kgcoop", 50.0)):
        st = _adapt(photo_store, m, tmp_path / m, ctx_init="a photo of a", epochs=20, lr=0.5, lam=lam)
        cos[m] = float(F.cosine_similarity(st.tensors["allway.text"], st.tensors["text"], dim=-1).mean())
    assert cos["kgcoop"] > cos["coop"], cos


def test_prompt_learning_refuses_stores_without_a_usable_text_tower(synthetic_store, tmp_path):
    from fskd.errors import ConfigError, EncoderError

    st = synthetic_store(joint=True)
    with pytest.raises(EncoderError, match="coop learns prompts with the store's text encoder"):
        api.adapt(AdaptConfig(store=str(st.path), method="coop", shots=2, out=str(tmp_path / "x"), device="cpu"))
    with pytest.raises(ConfigError, match="--set position must be one of end, middle, front"):
        api.adapt(
            AdaptConfig(
                store=str(st.path),
                method="coop",
                shots=2,
                out=str(tmp_path / "y"),
                device="cpu",
                options={"position": "left"},
            )
        )


def test_fma_builds_on_the_text_coop_learned(photo_store, tmp_path):
    """``fskd align --method fma --base-state <coop state>``: the flow's targets are CoOp's learned
    class text features (not the store's), and the state evaluates on its own."""
    from fskd.config import AlignConfig
    from fskd.methods.align.fma import FMA

    coop = _adapt(photo_store, "coop", tmp_path / "coop", n_ctx=4)
    r = api.align(
        AlignConfig(
            store=str(photo_store.path),
            method="fma",
            shots=2,
            seed=1,
            out=str(tmp_path / "fma"),
            device="cpu",
            base_state=str(tmp_path / "coop"),
            options={"recipe": "lite", "width": 32, "depth": 2, "iters": 30, "batch_size": 16, "pca": 0},
        )
    )
    st = load_state(r.out)
    assert st.hparams["base_method"] == "coop" and "coop learned" in st.selected_on["allway.targets"]
    part = FMA().parts(st, photo_store, CPU)["allway"]
    want = part.space.to_flow(part.space.bridge.text_to_image(coop.tensors["allway.text"]))
    torch.testing.assert_close(part.targets, want)
    e = api.evaluate(
        EvalConfig(store=str(photo_store.path), state=r.out, protocol="allway", shots=2, seeds=(1,), device="cpu")
    )
    assert 0 <= e.accuracy <= 100


def test_base_to_new_scores_new_classes_through_their_names(photo_store, tmp_path):
    """A base-to-new coop fit sees the base half's shots only; the new half is classified by the
    learned context with the new classes' names (an HM is reported)."""
    r = api.adapt(
        AdaptConfig(
            store=str(photo_store.path),
            method="coop",
            shots=2,
            seed=1,
            out=str(tmp_path / "b2n"),
            device="cpu",
            base_to_new=True,
            options={**FAST, "n_ctx": 4},
        )
    )
    st = load_state(r.out)
    assert "hidden" in st.metrics["base_to_new"] and st.hparams["episodic.train_rows"] == 2 * 3
    ev = api.evaluate(
        EvalConfig(store=str(photo_store.path), state=r.out, protocol="base-to-new", shots=2, seeds=(1,), device="cpu")
    )
    assert ev.protocol == "base-to-new" and 0 <= ev.base <= 100 and ev.new is not None and 0 <= ev.new <= 100
    assert ev.hm is not None


def test_one_regime_fits_learn_one_context_and_refuse_the_other_protocol(photo_store, tmp_path):
    """regime=allway (what fskd bench asks for all-way cells) learns only the all-way context: the
    same tensors as the both-regime fit's all-way part, and a clear refusal where the other is needed."""
    from fskd.config import AlignConfig
    from fskd.errors import ConfigError, EvaluationError

    both = _adapt(photo_store, "coop", tmp_path / "both", n_ctx=4)
    one = _adapt(photo_store, "coop", tmp_path / "one", n_ctx=4, regime="allway")
    assert "episodic.ctx" not in one.tensors and one.selected_on["episodic.epochs"] == "not fitted: regime=allway"
    for k in ("allway.ctx", "allway.text"):
        assert torch.equal(one.tensors[k], both.tensors[k])  # the all-way part does not depend on the other
    head = METHODS.get("coop")().head(one, photo_store, CPU)
    novel = torch.as_tensor(photo_store.class_split("novel"))[None]  # an episode the episodic context would serve
    support = torch.zeros(1, novel.shape[1], 1, photo_store.dim)
    with pytest.raises(EvaluationError, match="not fitted: regime=allway; evaluate it with --protocol allway"):
        head.fit(support, novel)
    with pytest.raises(ConfigError, match="fma regime=episodic needs its episodic text"):
        api.align(
            AlignConfig(
                store=str(photo_store.path),
                method="fma",
                shots=2,
                seed=1,
                out=str(tmp_path / "f"),
                device="cpu",
                base_state=str(tmp_path / "one"),
                options={"recipe": "lite", "regime": "episodic"},
            )
        )
    with pytest.raises(ConfigError, match="regime=episodic has nothing to learn"):
        _adapt(photo_store, "coop", tmp_path / "csc", n_ctx=4, csc=True, regime="episodic")
    with pytest.raises(ConfigError, match="--set regime must be one of both, allway, episodic"):
        _adapt(photo_store, "coop", tmp_path / "bad", regime="all")


def test_bench_fits_only_the_context_its_cells_score(photo_store, tmp_path):
    """fskd bench asks a method with regimes for the one part its protocol scores: an all-way cell's
    coop state has no episodic context (half the text-tower work), a base-to-new cell's has both."""
    from fskd.config import BenchConfig

    for protocol, want in (("allway", {"allway.ctx"}), ("base-to-new", {"allway.ctx", "episodic.ctx"})):
        out = tmp_path / protocol
        r = api.bench(
            BenchConfig(
                stores=(str(photo_store.path),),
                methods=("coop",),
                shots=(2,),
                seeds=(1,),
                protocol=protocol,
                out=str(out),
                keep_states=True,
                device="cpu",
                options={"coop": {**FAST, "n_ctx": 4}},
            ),
            progress=None,
        )
        assert not r.failed, r.failed
        (state_dir,) = (out / "states").glob("*/coop/2shot-seed1")
        st = load_state(state_dir)
        assert {k for k in st.tensors if k.endswith(".ctx")} == want, protocol


@pytest.fixture(scope="module")
def other_store(tiny_clip_dir, tmp_path_factory):
    """A second store of the same tiny encoder: cub35's classes 3-8 (3-5 are also photo_store's)."""
    from PIL import Image

    from .conftest import SHARED_DATA

    src = SHARED_DATA / "cub35" / "images"
    if not src.exists():
        pytest.skip("needs ../shared/data/cub35")
    d = tmp_path_factory.mktemp("coop-other")
    for cdir in sorted(src.iterdir())[3:9]:
        (d / "images" / cdir.name).mkdir(parents=True)
        for f in sorted(cdir.iterdir())[:6]:
            Image.open(f).convert("RGB").resize((64, 64)).save(d / "images" / cdir.name / f.name)
    (d / "templates.txt").write_text("a photo of a {}.\n")
    api.extract(
        ExtractConfig(
            dataset="folder",
            root=str(d / "images"),
            encoder=f"openclip:local-dir:{tiny_clip_dir}",
            store=str(d / "other.zarr"),
            workers=0,
            batch_size=16,
            chunk_rows=16,
            sample_split=(0.5, 0.25, 0.25),
            templates=str(d / "templates.txt"),
        )
    )
    return FeatureStore.open(d / "other.zarr")


def test_cross_dataset_encodes_the_targets_names_with_the_learned_context(photo_store, other_store, tmp_path):
    """coop across stores: the target's class text is the learned context with the target's names,
    so the classes both stores have get exactly the source's learned text; fma over a coop base
    moves its targets the same way (not the source classes' text)."""
    from fskd.config import AlignConfig
    from fskd.methods.align.fma import FMA

    src_names, dst_names = photo_store.class_names, other_store.class_names
    shared = [n for n in dst_names if n in src_names]
    assert len(shared) == 3
    coop = _adapt(photo_store, "coop", tmp_path / "coop", n_ctx=4)
    moved = METHODS.get("coop")().transfer_state(coop, other_store)
    for r in ("allway", "episodic"):
        t = moved.tensors[f"{r}.text"]
        assert t.shape == (other_store.num_classes, coop.tensors[f"{r}.text"].shape[1])
        for n in shared:
            torch.testing.assert_close(
                t[dst_names.index(n)], coop.tensors[f"{r}.text"][src_names.index(n)], atol=1e-5, rtol=1e-5
            )
    ev = api.evaluate(
        EvalConfig(store=str(other_store.path), state=str(tmp_path / "coop"), protocol="cross-dataset", device="cpu")
    )
    assert ev.classes == other_store.num_classes and 0 <= ev.accuracy <= 100

    r = api.align(
        AlignConfig(
            store=str(photo_store.path),
            method="fma",
            shots=2,
            seed=1,
            out=str(tmp_path / "fma"),
            device="cpu",
            base_state=str(tmp_path / "coop"),
            options={"recipe": "lite", "width": 32, "depth": 2, "iters": 30, "batch_size": 16, "pca": 0},
        )
    )
    fma_moved = FMA().transfer_state(load_state(r.out), other_store)
    part = FMA().parts(fma_moved, other_store, CPU)["allway"]
    want = part.space.to_flow(part.space.bridge.text_to_image(moved.tensors["allway.text"]))
    torch.testing.assert_close(part.targets, want)
    ev = api.evaluate(EvalConfig(store=str(other_store.path), state=r.out, protocol="cross-dataset", device="cpu"))
    assert ev.classes == other_store.num_classes and 0 <= ev.accuracy <= 100
