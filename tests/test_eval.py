"""Evaluation: the batched episode sampler, FAISS vs numpy oracle, CI math, real-data accuracy."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fskd import api
from fskd.classifiers import CLASSIFIERS, ClassContext
from fskd.classifiers.prototype import PrototypeHead, faiss_nearest
from fskd.config import EvalConfig
from fskd.errors import ConfigError, EvaluationError
from fskd.evaluation.metrics import mean_ci95
from fskd.protocols.episodic import run_episodes, sample_episodes
from fskd.store.sampling import sample_shots


def _labels(counts):
    return np.repeat(np.arange(len(counts)), counts)


def test_sampler_shapes_disjointness_and_seed():
    labels = _labels([20, 25, 30, 22, 21, 40, 19])
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    classes = [1, 2, 3, 4, 5, 6]
    eps = sample_episodes(labels, classes, way=5, shot=2, query=7, episodes=300, seed=4)
    assert eps.support.shape == (300, 5, 2) and eps.query.shape == (300, 5, 7) and eps.classes.shape == (300, 5)
    rows = np.concatenate([eps.support, eps.query], axis=2)  # (E, N, K+Q)
    assert (labels[rows] == eps.classes[:, :, None]).all()  # every row belongs to its way's class
    for e in range(0, 300, 37):
        assert len(set(eps.classes[e])) == 5 and set(eps.classes[e]) <= set(classes)
        assert len(set(rows[e].ravel())) == 5 * 9  # no row used twice in an episode
    again = sample_episodes(labels, classes, way=5, shot=2, query=7, episodes=300, seed=4)
    np.testing.assert_array_equal(eps.query, again.query)
    other = sample_episodes(labels, classes, way=5, shot=2, query=7, episodes=300, seed=5)
    assert not np.array_equal(eps.query, other.query)
    # over many episodes, every class and row gets used (uniform sampling)
    assert set(np.unique(eps.classes)) == set(classes)


def test_sampler_names_the_short_class():
    labels = _labels([20, 20, 5, 20, 20, 20])
    with pytest.raises(EvaluationError, match=r"class 'heron' has 5 samples, fewer than shot \+ query = 1 \+ 15 = 16"):
        sample_episodes(labels, range(6), 5, 1, 15, 10, 0, class_names=["a", "b", "heron", "d", "e", "f"])
    with pytest.raises(EvaluationError, match="need at least 5 classes"):
        sample_episodes(labels, [0, 1, 2], 5, 1, 1, 10, 0)


def test_faiss_prototypes_match_numpy_argmax():
    rng = np.random.default_rng(0)
    protos = rng.normal(size=(50, 32)).astype(np.float32)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    queries = rng.normal(size=(5000, 32)).astype(np.float32)
    np.testing.assert_array_equal(faiss_nearest(protos, queries), (queries @ protos.T).argmax(1))
    # the head's FAISS path (one big episode) and its matmul path agree
    support = torch.from_numpy(rng.normal(size=(1, 50, 3, 32)).astype(np.float32))
    q = torch.from_numpy(queries)[None]
    head = PrototypeHead(ClassContext())
    fitted = head.fit(head.prepare(support), torch.arange(50)[None])
    q = head.prepare(q)
    np.testing.assert_array_equal(fitted.predict(q).numpy(), fitted.logits(q).argmax(-1).numpy())
    # support-centred variant (all-way): FAISS and matmul agree too
    head = PrototypeHead(ClassContext(), center_support=True)
    fitted = head.fit(support, torch.arange(50)[None])
    np.testing.assert_array_equal(fitted.predict(q).numpy(), fitted.logits(q).argmax(-1).numpy())


def test_batched_episodes_equal_a_plain_per_episode_loop():
    rng = np.random.default_rng(1)
    labels = _labels([30] * 10)
    feats = rng.normal(size=(len(labels), 16)).astype(np.float32) + np.eye(10, 16)[labels] * 1.5
    center = feats.mean(0)
    eps = sample_episodes(labels, range(10), 5, 3, 5, 200, seed=0)
    head = PrototypeHead(ClassContext(center=torch.from_numpy(center)))
    batched = run_episodes(torch.from_numpy(feats), eps, head, batch=64)
    loop = []
    for e in range(200):  # the oracle: one episode at a time, in numpy
        f = feats - center
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        protos = f[eps.support[e]].mean(1)
        protos /= np.linalg.norm(protos, axis=1, keepdims=True)
        q = f[eps.query[e].reshape(-1)]
        pred = (q @ protos.T).argmax(1)
        loop.append((pred == np.repeat(np.arange(5), 5)).mean())
    np.testing.assert_allclose(batched, loop, atol=1e-6)
    assert 0.4 < batched.mean() < 1.0


def test_ci95():
    acc = np.array([0.5, 0.7] * 50)
    mean, ci = mean_ci95(acc)
    assert mean == pytest.approx(60.0) and ci == pytest.approx(1.96 * np.std(acc * 100, ddof=1) / 10)


def test_allway_shot_sampling():
    labels = _labels([5, 8, 3])
    rows = sample_shots(labels, np.array([0, 1, 2]), 3, seed=1)
    assert rows.shape == (3, 3) and (labels[rows] == np.arange(3)[:, None]).all()
    with pytest.raises(
        EvaluationError, match="--shots 4 is larger than available: class '2' has 3 samples in the 'train' split"
    ):
        sample_shots(labels, np.array([0, 1, 2]), 4, seed=1)


def test_text_classifier_needs_joint_space(synthetic_store):
    pair = synthetic_store(joint=False)
    with pytest.raises(EvaluationError, match="needs class text features in image space"):
        api.evaluate(EvalConfig(store=str(pair.path), classifier="text", shots=1, episodes=10))
    joint = synthetic_store(joint=True, noise=0.3)
    r = api.evaluate(EvalConfig(store=str(joint.path), classifier="text", episodes=100, shots=1))
    assert r.accuracy > 60  # text anchors are the class means plus a shared gap


def test_eval_reports_and_protocols(synthetic_store, tmp_path):
    st = synthetic_store(joint=True)
    r = api.evaluate(EvalConfig(store=str(st.path), way=5, shots=1, query=5, episodes=100, report=str(tmp_path)))
    d = r.to_dict()
    for k in (
        "accuracy",
        "ci95",
        "episodes",
        "way",
        "shots",
        "query",
        "split",
        "classifier",
        "encoder",
        "seed",
        "seconds",
    ):
        assert k in d
    assert 20 < r.accuracy <= 100 and r.ci95 > 0 and r.classes == 5
    assert open(r.report[1]).read().count("Episodic: 5-way 1-shot") == 1
    a = api.evaluate(EvalConfig(store=str(st.path), protocol="allway", shots=2, seeds=(1, 2, 3), report=str(tmp_path)))
    assert a.classes == 20 and len(a.per_seed) == 3 and a.std >= 0 and a.n_seeds == 3
    # a real 95% interval over 3 seeds: Student t with 2 degrees of freedom, 4.303 std / sqrt(3)
    assert a.ci95 == pytest.approx(4.302653 * np.std(a.per_seed, ddof=1) / np.sqrt(3), abs=2e-3)
    assert "Student t" in a.statistic and "Student t over seeds" in a.protocol_text()
    assert 0 <= a.top5 <= 100 and a.top5 >= a.accuracy and 0 <= a.mean_per_class <= 100
    md = open(a.report[1]).read()
    assert "## Per-class accuracy" in md and len(re.findall(r"\| class \d+ \|", md)) == 20 and "None" not in md
    one = api.evaluate(EvalConfig(store=str(st.path), protocol="allway", shots=2, seeds=(2,)))
    assert one.ci95 is None and one.std is None and one.n_seeds == 1 and "no interval" in one.summary_line()
    assert one.per_seed == [a.per_seed[1]]


def test_real_cub35_prototype_accuracy(cub35_store):
    """ImageNet EfficientNet-Lite0 prototypes on unseen CUB species (for reference ~75-80% 1-shot)."""
    one = api.evaluate(EvalConfig(store=cub35_store, way=5, shots=1, episodes=600, seed=0))
    five = api.evaluate(EvalConfig(store=cub35_store, way=5, shots=5, episodes=600, seed=0))
    assert 74 < one.accuracy < 88 and one.ci95 < 1.5
    assert 90 < five.accuracy < 98 and five.accuracy > one.accuracy + 8
    allway = api.evaluate(EvalConfig(store=cub35_store, protocol="allway", shots=4))
    assert 50 < allway.accuracy < 75


def test_real_omniglot_prototype_accuracy(omniglot_store):
    one = api.evaluate(EvalConfig(store=omniglot_store, way=5, shots=1, episodes=600, seed=0))
    five = api.evaluate(EvalConfig(store=omniglot_store, way=5, shots=5, episodes=600, seed=0))
    assert 55 < one.accuracy < 95 and five.accuracy > one.accuracy + 5


def test_registered_classifiers_score_episodes(synthetic_store):
    st = synthetic_store(joint=True)
    x, y = st.gather(st.class_split("novel"))
    eps = sample_episodes(y, st.class_split("novel"), 5, 2, 3, 20, 0)
    ctx = ClassContext(text=torch.from_numpy(st.text_embeddings()), center=None)
    for name in CLASSIFIERS.names():
        acc = run_episodes(torch.from_numpy(x), eps, CLASSIFIERS.get(name)(ctx))
        assert acc.shape == (20,) and np.isfinite(acc).all()


def test_prototype_logits_are_cosines():
    s = torch.randn(2, 3, 4, 8)
    q = torch.randn(2, 6, 8)
    head = PrototypeHead(ClassContext())
    logits = head.fit(head.prepare(s), torch.zeros(2, 3, dtype=torch.long)).logits(head.prepare(q))
    manual = F.normalize(q, dim=-1) @ F.normalize(F.normalize(s, dim=-1).mean(2), dim=-1).transpose(1, 2)
    torch.testing.assert_close(logits, manual)


def _both_rules(context=None, prepare_rows=True):
    return {
        rule: PrototypeHead(context or ClassContext(), prepare_rows=prepare_rows, rule=rule)
        for rule in ("cosine", "simpleshot")
    }


@pytest.mark.parametrize("prepare_rows", [True, False])
def test_prototype_rules_disagree_on_a_hand_made_episode(prepare_rows):
    """Class A's two unit shots (0.6, +-0.8, 0) average to a = (0.6, 0, 0) (norm 0.6, renormalised
    (1, 0, 0)); class B's two shots are both b = (0, 1, 0). The unit query q = (0.48, 0.6, 0.64):
    cosine to the renormalised means 0.48 (A) < 0.6 (B): cosine says B; squared distances to the
    plain means |q - a|^2 = 1 + 0.36 - 2 (0.288) = 0.784 < |q - b|^2 = 2 - 2 (0.6) = 0.8: the
    SimpleShot authors' rule says A."""
    support = torch.tensor([[[[0.6, 0.8, 0.0], [0.6, -0.8, 0.0]], [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]]])
    query = torch.tensor([[[0.48, 0.6, 0.64]]])
    heads = _both_rules(prepare_rows=prepare_rows)
    fitted = {r: h.fit(h.prepare(support), torch.tensor([[0, 1]])) for r, h in heads.items()}
    logits = {r: f.logits(heads[r].prepare(query)) for r, f in fitted.items()}
    torch.testing.assert_close(logits["cosine"], torch.tensor([[[0.48, 0.6]]]))
    torch.testing.assert_close(logits["simpleshot"], torch.tensor([[[-0.784, -0.8]]]))
    assert fitted["cosine"].predict(heads["cosine"].prepare(query)).item() == 1  # B
    assert fitted["simpleshot"].predict(heads["simpleshot"].prepare(query)).item() == 0  # A
    assert heads["cosine"].name == "prototype" and heads["simpleshot"].name == "simpleshot"


def test_simpleshot_rule_matches_the_authors_per_episode_numpy():
    """The ``simpleshot`` head over batched episodes against the authors' rule written out per
    episode in numpy (simple_shot's metric_class_type, CL2N): subtract the base mean, L2-normalise
    shots and queries, average each class's shots (not renormalised), nearest in Euclidean distance."""
    rng = np.random.default_rng(3)
    labels = _labels([25] * 12)
    feats = (rng.normal(size=(len(labels), 24)) + 2.0 + np.eye(12, 24)[labels] * 1.2).astype(np.float32)
    base_mean = feats[labels >= 8].mean(0)  # stand-in base classes 8-11; episodes draw from 0-7
    eps = sample_episodes(labels, range(8), 5, 5, 6, 120, seed=2)
    head = CLASSIFIERS.get("simpleshot")(ClassContext(center=torch.from_numpy(base_mean)))
    batched = run_episodes(torch.from_numpy(feats), eps, head, batch=32)
    cosine = run_episodes(
        torch.from_numpy(feats),
        eps,
        CLASSIFIERS.get("prototype")(ClassContext(center=torch.from_numpy(base_mean))),
        batch=32,
    )
    loop = []
    for e in range(len(eps.classes)):
        gallery = feats[eps.support[e].reshape(-1)] - base_mean
        gallery = gallery / np.linalg.norm(gallery, 2, 1)[:, None]
        query = feats[eps.query[e].reshape(-1)] - base_mean
        query = query / np.linalg.norm(query, 2, 1)[:, None]
        gallery = gallery.reshape(5, 5, -1).mean(1)
        distance = np.linalg.norm(gallery[:, None, :] - query, 2, axis=-1)  # (way, queries)
        loop.append((distance.argmin(0) == np.repeat(np.arange(5), 6)).mean())
    np.testing.assert_allclose(batched, loop, atol=1e-6)
    assert 0.3 < batched.mean() < 1.0 and not np.array_equal(batched, cosine)  # the rules differ at 5 shots
    # the logits are minus the squared distances of the numpy rule (last episode)
    x = F.normalize(torch.from_numpy(feats - base_mean), dim=-1)
    fitted = head.fit(x[torch.from_numpy(eps.support[-1:])], torch.from_numpy(eps.classes[-1:]))
    want = -(torch.from_numpy(distance.T.astype(np.float32))[None] ** 2)
    torch.testing.assert_close(
        fitted.logits(x[torch.from_numpy(eps.query[-1:].reshape(1, -1))]), want, rtol=1e-5, atol=1e-5
    )


def test_prototype_rules_agree_at_one_shot():
    """One shot: the plain mean is the unit shot itself, and for unit vectors |q - c|^2 = 2 - 2 cos,
    so both rules rank the classes alike (on the FAISS path of a large episode too)."""
    g = torch.Generator().manual_seed(0)
    support = torch.randn(8, 5, 1, 16, generator=g)
    query = torch.randn(8, 40, 16, generator=g)
    heads = _both_rules(ClassContext(center=torch.randn(16, generator=g)), prepare_rows=False)
    fitted = {r: h.fit(support, torch.zeros(8, 5, dtype=torch.long)) for r, h in heads.items()}
    torch.testing.assert_close(fitted["simpleshot"].logits(query), 2 * fitted["cosine"].logits(query) - 2)
    assert torch.equal(fitted["simpleshot"].predict(query), fitted["cosine"].predict(query))
    big_s, big_q = torch.randn(1, 60, 1, 16, generator=g), torch.randn(1, 5000, 16, generator=g)
    big = {r: h.fit(big_s, torch.arange(60)[None]) for r, h in heads.items()}
    assert torch.equal(big["simpleshot"].predict(big_q), big["cosine"].predict(big_q))
    # the FAISS L2 path (one large episode) predicts as the matmul path
    big5 = heads["simpleshot"].fit(torch.randn(1, 60, 5, 16, generator=g), torch.arange(60)[None])
    np.testing.assert_array_equal(big5.predict(big_q).numpy(), big5.logits(big_q).argmax(-1).numpy())
    np.testing.assert_array_equal(big5.topk(big_q, 3).numpy(), big5.logits(big_q).topk(3, dim=-1).indices.numpy())


def test_eval_with_both_prototype_rules(synthetic_store):
    st = synthetic_store(joint=True, noise=1.5)  # hard enough that neither rule is perfect at 3 shots
    run = lambda classifier, **kw: api.evaluate(EvalConfig(store=str(st.path), classifier=classifier, **kw))  # noqa: E731
    one = {c: run(c, way=5, shots=1, query=5, episodes=100) for c in ("prototype", "simpleshot")}
    assert one["prototype"].accuracy == one["simpleshot"].accuracy  # the rules agree at 1 shot
    assert one["simpleshot"].classifier == "simpleshot" and "base-class mean" in one["simpleshot"].center
    three = {c: run(c, way=5, shots=3, query=5, episodes=100) for c in ("prototype", "simpleshot")}
    for r in three.values():
        assert 20 < r.accuracy < 100 and r.ci95 > 0
    allway = run("simpleshot", protocol="allway", shots=2, seeds=(1,))
    assert 5 < allway.accuracy <= 100 and allway.center.startswith("support mean")
    with pytest.raises(ConfigError, match="rule must be one of cosine, simpleshot"):
        PrototypeHead(ClassContext(), rule="euclid")


@pytest.mark.parametrize("protocol", ["episodic", "allway"])
def test_eval_uses_the_fits_thread_guard(synthetic_store, monkeypatch, protocol):
    """eval runs a small store's work on one intra-op thread, as adapt/align fits do
    (``fskd.runtime.compute_threads``: two threads fighting over 2 busy cores made small fits
    2-5x slower), and restores the thread count afterwards."""
    import fskd.protocols.allway as allway
    import fskd.protocols.episodic as episodic
    from fskd.runtime import SMALL_PROBLEM, store_numel

    store = synthetic_store(n_classes=12)
    assert store_numel(store) < SMALL_PROBLEM
    seen = []
    for module, name in ((episodic, "run_episodes"), (allway, "run_allway")):
        real = getattr(module, name)

        def spy(*a, _real=real, **k):
            seen.append(torch.get_num_threads())
            return _real(*a, **k)

        monkeypatch.setattr(module, name, spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = (
            EvalConfig(store=str(store.path), way=3, shots=1, query=5, episodes=20)
            if protocol == "episodic"
            else EvalConfig(store=str(store.path), protocol="allway", shots=2, seeds=(1,))
        )
        api.evaluate(cfg)
        assert seen == [1], seen
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
