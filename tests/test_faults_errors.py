"""Issue 29: bounds and one-line errors. Episodes sampled in bounded batches (and a bound on their
number), ceilings and finite numbers for method options, each method taking only its own options,
``fskd methods --json``, and tracebacks that became one ``error:`` line: malformed bench rows, a
grid nested thousands deep, a store removed during a grid, forged states, and the Python API given
wrong types."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch

from fskd import api
from fskd.config import MAX_EPISODES, EvalConfig
from fskd.errors import ConfigError, StoreError
from fskd.methods import load_state
from fskd.methods.base import save_state
from fskd.protocols.episodic import iter_episodes, sample_episodes
from fskd.store import FeatureStore
from tests import test_faults
from tests.test_faults import ENV, cli, user_error

images, store = test_faults.images, test_faults.store  # the fault battery's fixtures: 6 classes of PNGs, their store

EVAL = ("--way", "2", "--shots", "1", "--query", "1", "--device", "cpu")


def _bench(store, out, *extra: str):
    return cli(
        "bench",
        "--stores",
        store,
        "--methods",
        "prototype",
        "--shots",
        "1",
        "--seeds",
        "1",
        "--out",
        out,
        "--device",
        "cpu",
        *extra,
        ok=False,
    )


# -- 1. episodes: sampled in bounded batches, their number bounded ---------------------------------
def test_episodes_are_sampled_in_bounded_batches_and_their_number_is_bounded(store):
    res = cli("eval", "--store", store, "--episodes", "1000000000", ok=False)
    user_error(res, "--episodes", str(MAX_EPISODES), "1000000000")
    # the batches are the very episodes of one draw (results for a seed unchanged) ...
    labels = np.random.default_rng(0).integers(0, 12, 700)
    whole = sample_episodes(labels, range(12), 5, 2, 7, 3001, 4)
    for multiple, keys in ((1, 1000), (50, 5000), (7, 1)):
        parts = list(iter_episodes(labels, range(12), 5, 2, 7, 3001, 4, multiple=multiple, max_keys=keys))
        assert len(parts) > 1 and all(len(p.support) % multiple == 0 for p in parts[:-1])
        for f in ("support", "query", "classes"):
            assert np.array_equal(np.concatenate([getattr(p, f) for p in parts]), getattr(whole, f))
    # ... and a million episodes of 600-row classes (24 GB of keys at once) take the memory of a few batches
    big = np.repeat(np.arange(20), 600)
    tracemalloc.start()
    try:
        batches = iter_episodes(big, range(20), 5, 1, 15, MAX_EPISODES, 0, multiple=50)
        for _, part in zip(range(3), batches, strict=False):
            assert len(part.support) < 5_000
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 300 << 20, peak
    # end to end: a million episodes run, and the peak memory hardly grows over 600 episodes
    script = (
        "import resource, sys\nfrom fskd import api\nfrom fskd.config import EvalConfig\n"
        "kw = dict(store=sys.argv[1], way=2, shots=1, query=1, device='cpu')\n"
        "api.evaluate(EvalConfig(episodes=600, **kw))\nbase = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "r = api.evaluate(EvalConfig(episodes=1_000_000, **kw))\n"
        "print(len(r.per_episode), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(store)], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    n, grown_kb = map(int, out.stdout.split())
    assert n == 1_000_000 and grown_kb < 250 << 10, grown_kb


# -- 2. method options: upper bounds and finite numbers ---------------------------------------------
def test_options_have_upper_bounds_and_finite_numbers(store, tmp_path):
    out = tmp_path / "st"
    adapt = ("adapt", "--store", store, "--method", "tip-adapter-f", "--out", out, "--device", "cpu", "--set")
    user_error(
        cli(*adapt, "steps=100000000000000000000", "--set", "form=span", ok=False),
        "--set steps",
        ">= 0 and <= 1000000",
        "100000000000000000000",
    )
    user_error(cli(*adapt, "steps=[10,2000000]", ok=False), "--set steps", "<= 1000000", "2000000")
    user_error(cli(*adapt, "epochs=1e20", ok=False), "--set epochs", "must be an integer")
    user_error(cli(*adapt, "epochs=99999999", ok=False), "--set epochs", "<= 10000", "99999999")
    for bad in ("NaN", "Infinity", "-Infinity", "inf"):
        user_error(cli(*adapt, f"lr={bad}", ok=False), "--set lr", "finite number")
    user_error(
        cli(
            "align",
            "--store",
            store,
            "--method",
            "fma",
            "--set",
            "recipe=lite",
            "--set",
            "iters=1000000000",
            "--out",
            out,
            ok=False,
        ),
        "--set iters",
        "<= 1000000",
    )
    user_error(
        cli("distill", "--store", store, "--epochs", "100000000", "--out", out, ok=False), "--epochs", "<= 10000"
    )
    assert not out.exists()
    info = json.loads(cli("methods", "tip-adapter-f", "--json").stdout)
    steps = next(o for o in info["options"] if o["name"] == "steps")
    assert steps["range"] == ">= 0" and steps["max"] == "1000000"
    assert "<= 1000000" in cli("methods", "tip-adapter-f").stdout


# -- 3. each method lists and accepts only its own options -----------------------------------------
def test_each_method_takes_only_its_own_options(store, tmp_path):
    names = {o["name"] for o in json.loads(cli("methods", "tip-adapter", "--json").stdout)["options"]}
    assert names == {
        "alpha",
        "beta",
        "ridge",
        "val_way",
        "val_query",
        "val_episodes",
        "regime",
    }  # regime: every adapt method
    f_names = {o["name"] for o in json.loads(cli("methods", "tip-adapter-f", "--json").stdout)["options"]}
    assert f_names == names | {"form", "epochs", "steps", "lr"}
    for kv in ("epochs=5", "form=span", "lr=0.01"):
        user_error(
            cli("adapt", "--store", store, "--method", "tip-adapter", "--set", kv, "--out", tmp_path / "st", ok=False),
            "unknown key(s) " + kv.split("=")[0],
        )
    assert not (tmp_path / "st").exists()


# -- 4. fskd methods --json --------------------------------------------------------------------------
def test_methods_json_lists_every_method():
    info = json.loads(cli("methods", "--json").stdout)
    by_name = {m["name"]: m for m in info["methods"]}
    assert by_name["tip-adapter"]["kind"] == "adapt" and by_name["fma"]["kind"] == "align"
    assert by_name["mtkd"]["kind"] == "distill" and all(m["description"] for m in info["methods"])
    assert not by_name["tip-adapter"]["description"].startswith("[")


# -- 5. tracebacks that are one line now ---------------------------------------------------------------
def test_malformed_bench_rows_are_one_line(store, tmp_path):
    out = tmp_path / "bench"
    assert _bench(store, out).exit_code == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    results = out / "results.jsonl"
    for edit, needles in (
        (lambda r: r.pop("dataset"), ("row 1", "lacks 'dataset'")),
        (lambda r: r.update(shots="x"), ("row 1", "shots 'x'", "an integer")),
        (lambda r: r.update(accuracy="high"), ("row 1", "accuracy 'high'", "a finite number")),
        (lambda r: r.update(status=5), ("row 1", "status 5")),
    ):
        row = copy.deepcopy(rows[0])
        edit(row)
        results.write_text(json.dumps(row) + "\n")
        user_error(cli("bench", "--report", out, ok=False), str(results), *needles)
        user_error(_bench(store, out), str(results), *needles)  # a run reads them too
    results.write_text(json.dumps(rows[0]) + "\n[1, 2]\n")
    user_error(cli("bench", "--report", out, ok=False), "row 2 is a JSON list")
    results.write_text(json.dumps(rows[0]) + "\n")
    meta = json.loads((out / "bench.json").read_text())
    (out / "bench.json").write_text(json.dumps({**meta, "cells": "all"}))
    user_error(cli("bench", "--report", out, ok=False), "bench.json", "'cells' a list of strings")
    (out / "bench.json").write_text(json.dumps({**meta, "config": {**meta["config"], "way": "five"}}))
    user_error(cli("bench", "--report", out, ok=False), "bench.json", "way must be an integer")


def test_deeply_nested_grid_and_set_values_are_one_line(tmp_path):
    grid = tmp_path / "deep.toml"
    grid.write_text("stores = " + "[" * 5000 + "]" * 5000 + "\n")
    user_error(cli("bench", "--grid", grid, ok=False), str(grid), "nested too deeply")
    grid.write_text(
        'stores = ["a.zarr"]\nmethods = ["prototype"]\noptions = ' + "{a = " * 5000 + "1" + "}" * 5000 + "\n"
    )
    user_error(cli("bench", "--grid", grid, ok=False), "nested too deeply")
    deep = "[" * 50_000 + "]" * 50_000
    user_error(
        cli("adapt", "--store", tmp_path / "s.zarr", "--set", f"alpha={deep}", ok=False),
        "--set alpha",
        "nested too deeply",
    )


def test_a_store_removed_during_a_grid_stops_it_with_one_line(store, tmp_path, monkeypatch):
    def remove_after_first_cell(point: str) -> None:
        if point == "bench:cell-1":
            shutil.rmtree(store)

    monkeypatch.setattr("fskd.reports.bench.fault_point", remove_after_first_cell)
    out = tmp_path / "bench"
    res = cli(
        "bench",
        "--stores",
        store,
        "--methods",
        "prototype,zero-shot",
        "--shots",
        "1",
        "--seeds",
        "1,2",
        "--out",
        out,
        "--device",
        "cpu",
        ok=False,
    )
    user_error(res, f"feature store {store} was removed while fskd bench ran", "results.jsonl")
    assert len((out / "results.jsonl").read_text().splitlines()) == 1  # the finished cell is kept


def test_a_store_removed_while_open_is_a_store_error(store):
    fs = FeatureStore.open(store)
    shutil.rmtree(store)  # zarr's KeyError otherwise, deep inside a fit
    for read in (lambda: fs.labels("train"), fs.text_embeddings, lambda: fs.class_names):
        with pytest.raises(StoreError, match=f"feature store {store} was removed"):
            read()


def test_forged_state_tensors_and_hparams_are_one_line(store, tmp_path):
    st = tmp_path / "st"
    cli("adapt", "--store", store, "--method", "tip-adapter", "--shots", "1", "--out", st, "--device", "cpu")
    state = load_state(st)
    good = copy.deepcopy(state)
    text = state.tensors["text"]
    for tensors in (
        {**good.tensors, "text": torch.zeros(text.shape[0], text.shape[1] + 3)},
        {**good.tensors, "text": torch.zeros(2, 2, 2, 2)},
    ):
        state.tensors = tensors
        save_state(st, state)  # forged: every hash matches
        user_error(
            cli("eval", "--store", store, "--state", st, *EVAL, ok=False),
            f"state {st} does not fit the store",
            "fit it again",
        )
    state.tensors = good.tensors
    for bad in ("x", [1, 2], None):
        state.hparams = {**good.hparams, "episodic.beta": bad}
        save_state(st, state)
        user_error(cli("eval", "--store", store, "--state", st, *EVAL, ok=False), "does not fit the store")
    state.hparams = {**good.hparams, "class_split": "all of them"}
    save_state(st, state)
    user_error(cli("eval", "--store", store, "--state", st, *EVAL, ok=False), "does not fit the store")
    save_state(st, good)
    cli("eval", "--store", store, "--state", st, *EVAL)


def test_the_python_api_rejects_wrong_types(store):
    for kwargs, needles in (
        ({"way": "5"}, ("--way", "an integer", "'5'")),
        ({"way": 5.5}, ("--way", "5.5")),
        ({"episodes": True}, ("--episodes",)),
        ({"seeds": (1, "2")}, ("--seeds",)),
        ({"shots": None}, ("--shots",)),
    ):
        with pytest.raises(ConfigError) as e:
            EvalConfig(store=str(store), **kwargs)
        assert all(n in str(e.value) for n in needles), (kwargs, str(e.value))
    cfg = EvalConfig(store=store, seeds=[1, 2], way=np.int64(2), shots=1, query=1, episodes=5, device="cpu")
    assert cfg.store == str(store) and cfg.seeds == (1, 2) and type(cfg.way) is int  # Python forms are converted
    assert api.evaluate(cfg).episodes == 5
    for call, needle in (
        (lambda: api.evaluate(None), "fskd.api.evaluate takes an EvalConfig, got NoneType"),
        (lambda: api.evaluate({"store": str(store)}), "takes an EvalConfig, got dict"),
        (lambda: api.adapt(cfg), "fskd.api.adapt takes an AdaptConfig, got EvalConfig"),
        (lambda: api.bench_report(3), "bench_report: out must be a path"),
    ):
        with pytest.raises(ConfigError, match=needle):
            call()


def test_eval_config_takes_shots_as_the_cli_does(store):
    from fskd import api

    r = api.evaluate(EvalConfig(store=str(store), protocol="allway", shots=2, seeds=(1,), device="cpu"))
    assert r.shots == 2 and r.to_dict()["shots"] == 2
    with pytest.raises(TypeError):
        EvalConfig(store=str(store), shot=2)  # one name: shots, as on the CLI and in every other verb
    import fskd.api as fa

    assert {"extract", "evaluate", "adapt", "bench"} <= set(fa.__all__)
    assert not {"np", "os", "torch", "json"} & set(fa.__all__)
