"""The CLIP few-shot protocols: CoOp's few-shot validation rule."""

from __future__ import annotations

import numpy as np
import pytest

from fskd import api
from fskd.config import AdaptConfig
from fskd.errors import ConfigError
from fskd.store.sampling import sample_shots, validation_rows


def test_few_shot_validation_takes_min_k_4_per_class():
    labels = np.repeat(np.arange(5), [10, 10, 3, 10, 10])
    classes = np.array([0, 1, 2, 3])  # class 4 is not evaluated
    for k, want in [(1, [1, 1, 1, 1]), (2, [2, 2, 2, 2]), (4, [4, 4, 3, 4]), (16, [4, 4, 3, 4])]:
        rows = validation_rows(labels, classes, k, seed=1, rule="few-shot")
        assert np.bincount(labels[rows], minlength=5).tolist() == want + [0]
        assert (np.diff(rows) > 0).all()
    a, b = (validation_rows(labels, classes, 4, s, "few-shot") for s in (1, 2))
    assert not np.array_equal(a, b)  # seeded: another seed, other rows
    np.testing.assert_array_equal(a, validation_rows(labels, classes, 4, 1, "few-shot"))
    assert len(validation_rows(labels, classes, 0, 1, "few-shot")) == 0
    np.testing.assert_array_equal(validation_rows(labels, classes, 1, 1, "full"), np.flatnonzero(labels < 4))
    # the train shots of seed s do not move when validation rows are drawn
    np.testing.assert_array_equal(sample_shots(labels, classes, 2, 1), sample_shots(labels, classes, 2, 1))


def test_fit_records_the_validation_rule(synthetic_store, tmp_path):
    store = str(synthetic_store(n_classes=10).path)
    few = api.adapt(AdaptConfig(store=store, method="linear-probe", shots=2, out=str(tmp_path / "a")), progress=None)
    full = api.adapt(AdaptConfig(store=store, method="linear-probe", shots=2, out=str(tmp_path / "b"), val_rule="full"),
                     progress=None)
    task_few = few.metrics["allway.val_task"]
    assert "min(K, 4) = 2 per class of 10 classes" in task_few and "20 val-split rows" in task_few
    assert "full val split" in full.metrics["allway.val_task"]
    assert any("min(K, 4)" in str(v) for v in few.selected_on.values())
    with pytest.raises(ConfigError, match="--val-rule must be one of few-shot, full"):
        AdaptConfig(store=store, method="linear-probe", val_rule="all")
