"""fskd bench: a grid run end to end through the CLI, killed and resumed, tables and plots,
and the bad input a user meets."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from fskd import api
from fskd.cli import app
from fskd.config import BenchConfig
from fskd.errors import ConfigError, OutputError, RegistryError, StoreError
from fskd.store import FeatureStore
from fskd.store.synthetic import make_synthetic_store, synthetic_features

runner = CliRunner()
METHODS = "prototype,linear-probe,zero-shot"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench-stores")
    a = make_synthetic_store(d / "a.zarr", n_classes=8, joint=True, seed=0)
    splits, _ = synthetic_features(n_classes=6, seed=3)  # a store without class text
    b = FeatureStore.from_arrays(
        d / "b.zarr",
        splits,
        [f"c{i}" for i in range(6)],
        {"base": [0, 1, 2], "val": [3], "novel": [4, 5]},
        encoder={"spec": "no-text"},
        dataset="notext",
        chunk_rows=64,
    )
    return str(a.path), str(b.path)


def test_grid_end_to_end_killed_and_resumed_equals_uninterrupted(stores, tmp_path):
    grid = [
        "--stores",
        ",".join(stores),
        "--methods",
        METHODS,
        "--shots",
        "1,2",
        "--seeds",
        "1,2",
        "--baseline",
        "prototype",
    ]
    ref = runner.invoke(app, ["bench", *grid, "--out", str(tmp_path / "ref")])
    assert ref.exit_code == 0, ref.output
    assert "24 cells (0 already done, 20 run, 4 not applicable, 0 failed)" in ref.output
    # the same grid killed after its 5th cell, then run again
    killed = subprocess.run(
        [sys.executable, "-m", "fskd", "bench", *grid, "--out", str(tmp_path / "k")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "FSKD_FAULT": "bench:cell-5"},
    )
    assert killed.returncode == -9
    rows = (tmp_path / "k" / "results.jsonl").read_text().splitlines()
    assert len(rows) == 5
    with open(tmp_path / "k" / "results.jsonl", "a") as f:  # a line cut by the kill is dropped, not read
        f.write('{"key": "half a line')
    again = runner.invoke(app, ["bench", *grid, "--out", str(tmp_path / "k")])
    assert again.exit_code == 0, again.output
    assert "24 cells (5 already done, 15 run, 4 not applicable, 0 failed)" in again.output
    for name in ("table.md", "table.csv", "table.tex"):
        assert (tmp_path / "k" / name).read_text() == (tmp_path / "ref" / name).read_text(), name
    assert len((tmp_path / "k" / "results.jsonl").read_text().splitlines()) == 24
    # a third run has nothing to do
    third = runner.invoke(app, ["bench", *grid, "--out", str(tmp_path / "k")])
    assert "(24 already done, 0 run" in third.output


def test_tables_plots_and_report_rebuild(stores, tmp_path):
    out = tmp_path / "b"
    r = api.bench(
        BenchConfig(
            stores=stores,
            methods=tuple(METHODS.split(",")),
            shots=(1, 2, 4),
            seeds=(1, 2, 3),
            out=str(out),
            baseline="prototype",
        ),
        progress=None,
    )
    assert r.counts["failed"] == 0 and r.counts["n/a"] == 9  # zero-shot on the store without text
    md = (out / "table.md").read_text()
    assert "min(K, 4) val-split images per class" in md and "## 4 shots" in md and "Average" in md
    assert "Paired difference to prototype" in md and "zero-shot on notext: zero-shot needs class text features" in md
    rows = list(csv.DictReader(open(out / "table.csv")))
    res = [json.loads(line) for line in open(out / "results.jsonl")]
    ok = [x for x in res if x["status"] == "ok"]
    assert all(0 <= x["accuracy"] <= 100 and x["fit_seconds"] >= 0 and x["versions"]["fskd"] for x in ok)
    # a table entry is the mean and std over the seeds of the rows
    lp = [
        x["accuracy"] for x in ok if x["method"] == "linear-probe" and x["shots"] == 2 and x["dataset"] == "synthetic"
    ]
    entry = next(x for x in rows if x["method"] == "linear-probe" and x["shots"] == "2" and x["dataset"] == "synthetic")
    assert float(entry["mean"]) == pytest.approx(np.mean(lp), abs=1e-3)
    assert float(entry["std"]) == pytest.approx(np.std(lp, ddof=1), abs=1e-3)
    # the paired difference to the baseline: mean and Student-t CI of the per-seed differences
    proto = [
        x["accuracy"] for x in ok if x["method"] == "prototype" and x["shots"] == 2 and x["dataset"] == "synthetic"
    ]
    d = np.subtract(
        [
            x["accuracy"]
            for x in sorted(
                (x for x in ok if x["method"] == "linear-probe" and x["shots"] == 2 and x["dataset"] == "synthetic"),
                key=lambda x: x["seed"],
            )
        ],
        [
            x["accuracy"]
            for x in sorted(
                (x for x in ok if x["method"] == "prototype" and x["shots"] == 2 and x["dataset"] == "synthetic"),
                key=lambda x: x["seed"],
            )
        ],
    )
    half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)
    section = md.split("Paired difference to prototype")[1].split("### 2 shots")[1].split("###")[0]
    assert f"| linear-probe | {d.mean():+.2f} ± {half:.2f}" in section and len(proto) == 3
    assert any("min(K, 4)" in str(v) for r in ok if r["method"] == "linear-probe" for v in r["selected_on"].values())
    for ext in ("png", "svg"):
        assert (out / f"accuracy_vs_shots.{ext}").stat().st_size > 1000
    before = {n: (out / n).read_text() for n in ("table.md", "table.csv")}
    for n in before:
        (out / n).unlink()
    rebuilt = runner.invoke(app, ["bench", "--report", str(out)])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert {n: (out / n).read_text() for n in before} == before


def test_grid_file_and_its_errors(stores, tmp_path):
    g = tmp_path / "grid.toml"
    g.write_text(
        f'stores = {json.dumps(list(stores[:1]))}\nmethods = ["prototype", "linear-probe-tuned=linear-probe", '
        f'"short=linear-probe"]\nshots = [1]\nseeds = [1]\nout = "{tmp_path / "g"}"\n'
        f'[options.linear-probe-tuned]\nrecipe = "tuned"\nsteps = [50]\n'
        f'[options.short]\nrecipe = "tuned"\nsteps = [0]\n'
    )
    r = runner.invoke(app, ["bench", "--grid", str(g), "--json"])
    assert r.exit_code == 0, r.output
    res = {x["method"]: x for x in map(json.loads, open(tmp_path / "g" / "results.jsonl"))}
    assert list(res) == ["prototype", "linear-probe-tuned", "short"]
    # variant rows: a method's recipe under its own label with its own options; 0 steps keeps the prototype init
    for label, steps in (("linear-probe-tuned", 50), ("short", 0)):
        assert res[label]["variant_of"] == "linear-probe" and res[label]["options"] == {
            "recipe": "tuned",
            "steps": [steps],
        }
        assert res[label]["hparams"]["recipe"] == "tuned" and res[label]["hparams"]["allway.steps"] == steps
    table = (tmp_path / "g" / "table.md").read_text()
    assert "| short |" in table and "| linear-probe-tuned |" in table
    g.write_text(
        f'stores = {json.dumps(list(stores[:1]))}\nmethods = ["lp=linear-probe"]\nshots = [1]\n'
        f'[options.lp]\nrecipe = "tuned"\nc = 1.0\n'
    )
    r = runner.invoke(app, ["bench", "--grid", str(g)])  # a key of the other recipe: named before any cell
    assert r.exit_code == 2 and "unknown key(s) c" in r.output and "recipe=published takes c" in r.output, r.output
    g.write_text('stores = ["a.zarr"]\nmethods = ["prototype"]\nshot = [1]\n')
    r = runner.invoke(app, ["bench", "--grid", str(g)])
    assert r.exit_code == 2 and "unknown key(s) shot" in r.output and str(g) in r.output and "valid keys" in r.output


def test_bad_input_is_named_before_any_cell(stores, tmp_path):
    base = dict(stores=stores, shots=(1,), seeds=(1,), out=str(tmp_path / "x"))
    with pytest.raises(RegistryError, match="Unknown method 'protoype'.*Available: .*prototype"):
        api.bench(BenchConfig(methods=("protoype",), **base), progress=None)
    with pytest.raises(StoreError, match="not extracted from an image dataset"):  # a student needs the images
        api.bench(BenchConfig(methods=("mtkd",), **base), progress=None)
    with pytest.raises(ConfigError, match="names a row twice"):
        BenchConfig(methods=("prototype", "prototype=linear-probe"), **base)
    with pytest.raises(ConfigError, match="options are given for method.* fma"):
        BenchConfig(methods=("prototype",), options={"fma": {"iters": 3}}, **base)
    with pytest.raises(ConfigError, match="unknown key"):
        api.bench(BenchConfig(methods=("linear-probe",), options={"linear-probe": {"epoch": 3}}, **base), progress=None)
    with pytest.raises(Exception, match="nope.zarr"):
        api.bench(BenchConfig(methods=("prototype",), **{**base, "stores": ("nope.zarr",)}), progress=None)
    assert not (tmp_path / "x").exists()  # nothing was written for a grid that cannot run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="did not write"):
        api.bench(BenchConfig(methods=("prototype",), **{**base, "out": str(mine)}), progress=None)
    assert (mine / "notes.txt").read_text() == "keep" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    r = runner.invoke(app, ["bench", "--stores", stores[0], "--methods", "prototype", "--shots", "1,x"])
    assert r.exit_code == 2 and "--shots" in r.output


def test_base_to_new_grid_tables(stores, tmp_path):
    out = tmp_path / "b2n"
    r = runner.invoke(
        app,
        [
            "bench",
            "--stores",
            stores[0],
            "--methods",
            "prototype,zero-shot",
            "--shots",
            "2,4",
            "--seeds",
            "1,2",
            "--protocol",
            "base-to-new",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    md = (out / "table.md").read_text()
    assert "Protocol: base-to-new (CoCoOp)" in md and "| synthetic base | synthetic new | synthetic HM |" in md
    assert "prototype on synthetic: cannot classify classes it has no shot of" in md
    res = [json.loads(line) for line in open(out / "results.jsonl")]
    zs = [x for x in res if x["method"] == "zero-shot" and x["shots"] == 4]
    assert all(
        x["new"] is not None and x["hm"] == pytest.approx(2 * x["base"] * x["new"] / (x["base"] + x["new"]), abs=0.01)
        for x in zs
    )
    line = next(row for row in md.split("## 4 shots")[1].splitlines() if row.startswith("| zero-shot"))
    assert f"{np.mean([x['hm'] for x in zs]):.2f} ± {np.std([x['hm'] for x in zs], ddof=1):.2f}" in line
    assert (out / "accuracy_vs_shots.png").exists()


def test_cross_dataset_and_domain_shift_grids(two_worlds, tmp_path):
    a, b, shifted = two_worlds
    r = api.bench(
        BenchConfig(
            stores=(a, b),
            methods=("prototype", "zero-shot", "tip-adapter"),
            shots=(2, 4),
            seeds=(1, 2),
            protocol="cross-dataset",
            out=str(tmp_path / "x"),
        ),
        progress=None,
    )
    assert r.counts == {"skipped": 0, "ok": 20, "n/a": 4, "failed": 0}  # prototype cannot transfer to b's classes
    md = (tmp_path / "x" / "table.md").read_text()
    assert "| method | a (source) | b |" in md and "prototype on b: prototype cannot classify" in md
    res = [json.loads(line) for line in open(tmp_path / "x" / "results.jsonl")]
    zs = [x for x in res if x["method"] == "zero-shot" and x["dataset"] == "b"]
    assert all(x["accuracy"] > 30 for x in zs)  # chance 10%
    # one fit serves the source row and every target row: the states were not refitted per target
    by_fit: dict = {}
    for x in res:
        if x["status"] == "ok":
            by_fit.setdefault((x["method"], x["shots"], x["seed"]), set()).add(x["fit_seconds"])
    assert all(len(v) == 1 for v in by_fit.values())
    with pytest.raises(ConfigError, match="not classes of the source"):  # b's classes are not a's: before any cell
        api.bench(
            BenchConfig(
                stores=(a, shifted, b),
                methods=("prototype",),
                shots=(4,),
                seeds=(1,),
                protocol="domain-shift",
                out=str(tmp_path / "d"),
            ),
            progress=None,
        )
    d = api.bench(
        BenchConfig(
            stores=(a, shifted),
            methods=("prototype", "tip-adapter"),
            shots=(4,),
            seeds=(1, 2),
            protocol="domain-shift",
            out=str(tmp_path / "d"),
        ),
        progress=None,
    )
    md = (tmp_path / "d" / "table.md").read_text()
    assert d.counts["ok"] == 8 and "| method | a (source) | shifted |" in md and "Protocol: domain-shift" in md
    assert not list((tmp_path / "d").glob(".cell-state-*"))


def test_episodic_grid_over_seeded_class_splits(tmp_path):
    """--protocol episodic with --class-ratio: seed s fits on its own seeded base/val/novel class
    split and scores episodes of that split's novel classes; the table's spread and the paired
    CI are over class splits; a cell equals fitting and evaluating that split by hand."""
    from fskd.config import AdaptConfig, EvalConfig

    store = make_synthetic_store(tmp_path / "ep.zarr", n_classes=20, joint=True, seed=2)
    grid = [
        "--stores",
        str(store.path),
        "--methods",
        "prototype,linear-probe",
        "--shots",
        "1",
        "--seeds",
        "1,2,3",
        "--protocol",
        "episodic",
        "--class-ratio",
        "0.5,0.25,0.25",
        "--episodes",
        "40",
        "--baseline",
        "prototype",
    ]
    res = runner.invoke(app, ["bench", *grid, "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "6 cells (0 already done, 6 run, 0 not applicable, 0 failed)" in res.output
    rows = [json.loads(line) for line in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    novel = {r["seed"]: tuple(r["class_split"]["novel"]) for r in rows if r["method"] == "prototype"}
    assert len(set(novel.values())) == 3 and all(len(v) == 5 for v in novel.values())  # three different splits
    assert all(r["ci95_episodes"] > 0 for r in rows)
    # one cell by hand: the split of split seed 2, fit seed 2, 40 5-way 1-shot episodes with episode seed 0
    out = str(tmp_path / "by-hand")
    api.adapt(
        AdaptConfig(
            store=str(store.path),
            method="linear-probe",
            shots=1,
            seed=2,
            out=out,
            class_ratio=(0.5, 0.25, 0.25),
            split_seed=2,
        ),
        progress=None,
    )
    ev = api.evaluate(EvalConfig(store=str(store.path), state=out, way=5, shots=1, query=15, episodes=40, seed=0))
    cell = next(r for r in rows if r["method"] == "linear-probe" and r["seed"] == 2)
    assert cell["accuracy"] == pytest.approx(ev.accuracy, abs=1e-9)
    table = (tmp_path / "b" / "table.md").read_text()
    assert "Protocol: episodic" in table and "spread over class splits" in table
    assert "Paired difference to prototype" in table
    bad = runner.invoke(
        app,
        [
            "bench",
            "--stores",
            str(store.path),
            "--methods",
            "prototype",
            "--class-ratio",
            "0.5,0.25,0.25",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert bad.exit_code == 2 and "class_ratio" in bad.output and "--protocol episodic" in bad.output


def test_tables_follow_the_grid_order_not_the_order_cells_ran():
    """A method added to a grid later (its cells run last) is still listed where the grid puts it."""
    from fskd.reports.bench import _grid_rows, summarise

    def row(method, seed):
        return {
            "key": f"{method}-{seed}",
            "method": method,
            "dataset": "d",
            "shots": 1,
            "seed": seed,
            "status": "ok",
            "accuracy": 50.0,
        }

    ran = [row("b", 1), row("c", 1), row("a", 1), row("a", 1)]  # a re-ran: its last row counts
    ordered = _grid_rows(ran, ["a-1", "b-1", "c-1"])
    assert [r["method"] for r in ordered] == ["a", "b", "c"]
    assert summarise(ordered)[1] == ["a", "b", "c"]
    assert [r["method"] for r in _grid_rows(ran, {"a-1", "b-1"})] == ["b", "a"]  # a set: the order they ran
