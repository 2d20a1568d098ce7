"""Issue 11: statistics that mean what they say, reports and states you can find again, and a
CLI that follows the conventions, each checked as a user meets it (CliRunner, reopened files)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fskd import __version__, api
from fskd.cli import app
from fskd.config import AdaptConfig, AlignConfig, DistillConfig, EvalConfig
from fskd.errors import EvaluationError
from fskd.methods import load_state
from fskd.store import FeatureStore

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def ok(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def test_version_aliases_and_choices(synthetic_store):
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == __version__
    st = synthetic_store(joint=True)
    a = json.loads(ok("eval", "--store", st.path, "--shots", "2", "--episodes", "20", "--json").stdout)
    b = json.loads(ok("eval", "--store", st.path, "--shot", "2", "--episodes", "20", "--json").stdout)  # hidden alias
    assert a["shots"] == b["shots"] == 2 and a["accuracy"] == b["accuracy"] and a["seed"] == 1
    c = json.loads(ok("eval", "--store", st.path, "--protocol", "all-way", "--shots", "1", "--json").stdout)
    assert c["protocol"] == "allway"
    for opt, bad, close in (
        ("--split", "nvel", "novel"),
        ("--center", "mean", None),
        ("--protocol", "allways", "allway"),
    ):
        res = runner.invoke(app, ["eval", "--store", str(st.path), opt, bad])
        errors = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(errors) == 1 and errors[0].startswith(f"error: {opt} '{bad}' is not one of")
        assert (f"did you mean '{close}'?" in errors[0]) if close else "did you mean" not in errors[0]
    res = runner.invoke(app, ["adapt", "--store", str(st.path), "--method", "fma"])
    assert res.exit_code == 2 and "--method 'fma' is not one of" in res.output and "tip-adapter" in res.output
    res = runner.invoke(app, ["eval", "--store", str(st.path), "--shots", "x", "--json"])  # option errors too
    assert res.exit_code == 2 and json.loads(res.stderr)["type"] == "UsageError" and "--shots" in res.stderr
    res = runner.invoke(app, ["align", "--help"])
    assert "--flow-steps" in res.output and "Output" in res.output and "KEY=VALUE" in res.output


def test_grammar_of_the_kind_message(synthetic_store):
    st = synthetic_store(joint=True)
    with pytest.raises(Exception, match="method 'fma' is an align method, not an adapt method; adapt methods: "):
        api.adapt(AdaptConfig(store=str(st.path), method="fma"))


def test_methods_lists_set_options_with_defaults_and_meaning():
    out = ok("methods", "fma").stdout
    assert "epochs" in out and "default 200" in out and "passes over the training pairs" in out
    assert "recipes (--set recipe=NAME):" in out and "published (default)" in out
    assert "--set options of recipe lite (fskd align --method fma --set recipe=lite --set KEY=VALUE):" in out
    assert "default 600" in out.split("recipe lite")[-1]  # fskd's variant: 600 steps
    info = json.loads(ok("methods", "linear-probe", "--json").stdout)
    assert [(r["name"], r["default"]) for r in info["recipes"]] == [("published", True), ("tuned", False)]
    assert info["options"][0]["name"] == "recipe" and info["options"][1:] == info["recipes"][0]["options"]
    steps = next(o for o in info["recipes"][1]["options"] if o["name"] == "steps")
    assert steps["range"] == ">= 0" and steps["meaning"]
    for name in api.registries()["methods"]:  # every option of every method (and recipe) says what it means
        info = api.method_info(name)
        assert all(o["meaning"] for o in info["options"]), name
        assert all(o["meaning"] and r["description"] for r in info.get("recipes", []) for o in r["options"]), name


def test_fit_provenance_summary_and_state_files(synthetic_store, tmp_path):
    st = synthetic_store(joint=True)
    out = tmp_path / "fm"
    res = ok(
        "align",
        "--store",
        st.path,
        "--shots",
        "2",
        "--set",
        "iters=30",
        "--gamma",
        "0",
        "--flow-steps",
        "1,2",
        "--out",
        out,
    )
    lines = res.stdout.splitlines()
    assert max(len(x) for x in lines) < 200  # a short table, not a 2,000-character line
    state = load_state(out)
    assert state.selected_on["iters"] == "user-set (iters=30)" and state.selected_on["width"] == "default"
    assert state.selected_on["allway.steps"].startswith("chosen on val split")
    assert Path(state.store_path).is_absolute() and state.metrics["fit_seconds"] > 0
    tensor_file = out / json.loads((out / "state.json").read_text())["tensors_file"]
    assert stat.S_IMODE(tensor_file.stat().st_mode) == 0o644
    full = json.loads(
        ok(
            "adapt", "--store", st.path, "--method", "prototype", "--shots", "1", "--out", tmp_path / "p", "--json"
        ).stdout
    )
    assert full["out"] == str(tmp_path / "p") and "hparams" in full


def test_a_state_bound_to_its_shots_refuses_other_seeds(synthetic_store, tmp_path):
    st = synthetic_store(joint=True)
    out = str(tmp_path / "fm")
    api.align(AlignConfig(store=str(st.path), shots=2, seed=2, out=out, options={"iters": 20}))
    with pytest.raises(EvaluationError, match=r"seed 2.*--shots 2 --seeds 2.*fit one state per seed"):
        api.evaluate(EvalConfig(store=str(st.path), state=out, protocol="allway", shots=2, seeds=(1, 2, 3)))
    with pytest.raises(EvaluationError, match="--shots 2 --seeds 2"):
        api.evaluate(EvalConfig(store=str(st.path), state=out, protocol="allway", shots=4, seeds=(2,)))
    r = api.evaluate(EvalConfig(store=str(st.path), state=out, protocol="allway", shots=2, seeds=(2,)))
    assert r.n_seeds == 1 and r.ci95 is None
    # a method that refits on the shots it is given: other seeds are allowed, with a warning
    api.adapt(AdaptConfig(store=str(st.path), method="prototype", shots=2, seed=1, out=str(tmp_path / "p")))
    r = api.evaluate(EvalConfig(store=str(st.path), state=str(tmp_path / "p"), protocol="allway", shots=2))
    assert any("chosen for 2 shots and seed 1" in w for w in r.warnings)


def test_compare_gives_the_paired_difference(synthetic_store, tmp_path):
    st = synthetic_store(joint=True, noise=0.6)
    rep = tmp_path / "rep"
    common = ["eval", "--store", st.path, "--shots", "1", "--episodes", "200", "--report", rep, "--json"]
    a = json.loads(ok(*common, "--classifier", "prototype").stdout)
    b = json.loads(ok(*common, "--classifier", "text").stdout)
    out = json.loads(ok("compare", a["report"][0], b["report"][0], "--json").stdout)
    pa = json.loads(Path(a["report"][0]).read_text())["result"]["per_episode"]
    pb = json.loads(Path(b["report"][0]).read_text())["result"]["per_episode"]
    d = (np.asarray(pa) - np.asarray(pb)) * 100
    assert out["difference"] == pytest.approx(d.mean(), abs=1e-3) and out["n"] == 200
    assert out["ci95"] == pytest.approx(1.96 * d.std(ddof=1) / np.sqrt(200), abs=1e-3)
    assert out["difference"] == pytest.approx(a["accuracy"] - b["accuracy"], abs=2e-3)
    text = ok("compare", a["report"][0], b["report"][0]).stdout
    assert "paired difference" in text and "interval" in text
    other = json.loads(
        ok("eval", "--store", st.path, "--shots", "1", "--episodes", "100", "--report", rep, "--json").stdout
    )
    res = runner.invoke(app, ["compare", a["report"][0], other["report"][0]])
    assert res.exit_code == 2 and "differ in episodes (200 vs 100)" in res.output
    seeds = [
        json.loads(
            ok(
                "eval",
                "--store",
                st.path,
                "--protocol",
                "allway",
                "--shots",
                "2",
                "--classifier",
                c,
                "--report",
                rep,
                "--json",
            ).stdout
        )
        for c in ("prototype", "text")
    ]
    r = json.loads(ok("compare", seeds[0]["report"][0], seeds[1]["report"][0], "--json").stdout)
    assert r["n"] == 3 and "Student t" in r["statistic"]


def test_class_split_override_is_recorded_and_reused(synthetic_store, tmp_path):
    st = synthetic_store(joint=True, n_classes=12)
    names = st.class_names
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"base": names[:6], "val": names[6:9], "novel": names[9:]}))
    out = tmp_path / "p"
    res = ok("adapt", "--store", st.path, "--method", "prototype", "--shots", "1", "--class-split", split, "--out", out)
    assert "only 3 val classes" in res.stderr  # too few to choose anything: said
    state = load_state(out)
    assert state.hparams["class_split"]["novel"] == [9, 10, 11]
    assert state.selected_on["class_split"].startswith("override: file")
    # eval with the state uses the state's split: 3 novel classes, not the store's
    r = json.loads(
        ok(
            "eval", "--store", st.path, "--state", out, "--shots", "1", "--way", "3", "--episodes", "10", "--json"
        ).stdout
    )
    assert r["classes"] == 3
    res = runner.invoke(
        app, ["eval", "--store", str(st.path), "--state", str(out), "--shots", "1", "--class-ratio", "0.5,0.25,0.25"]
    )
    assert res.exit_code == 2 and "another class split" in res.output
    r = json.loads(
        ok(
            "eval",
            "--store",
            st.path,
            "--shots",
            "1",
            "--class-ratio",
            "0.5,0.25,0.25",
            "--way",
            "3",
            "--episodes",
            "10",
            "--json",
        ).stdout
    )
    assert r["classes"] == 3
    assert FeatureStore.open(st.path).attrs["class_split"]["source"] != "override"  # the store is untouched


def test_every_verb_has_the_same_shots_default():
    """One name per idea all the way down: each verb's ``--shots`` (one number; bench sweeps a
    list) has the same default on the command line and in its Python config."""
    import dataclasses

    import click
    from typer.main import get_command

    def commands(group, prefix=()):
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                yield from commands(cmd, (*prefix, name))
            else:
                yield " ".join((*prefix, name)), cmd

    cli_defaults = {
        name: p.default
        for name, cmd in commands(get_command(app))
        for p in cmd.params
        if p.name == "shots" and name != "bench"
    }
    assert {"eval", "adapt", "align", "distill"} <= set(cli_defaults), cli_defaults
    config_defaults = {
        cfg.__name__: next(f.default for f in dataclasses.fields(cfg) if f.name == "shots")
        for cfg in (EvalConfig, AdaptConfig, AlignConfig, DistillConfig)
    }
    assert set(cli_defaults.values()) == set(config_defaults.values()) == {4}, (cli_defaults, config_defaults)


def test_info_is_for_people_and_json_for_scripts(synthetic_store):
    st = synthetic_store(joint=True)
    text = ok("info", st.path).stdout
    assert "classes" in text and "novel" in text and st.class_names[st.class_split("novel")[0]] in text
    assert "on disk" in text and "created" in text
    data = json.loads(ok("info", st.path, "--json").stdout)
    assert data["dtype"] and data["size_bytes"] > 0 and set(data["class_names"]) == {"base", "val", "novel"}


def test_cli_sets_the_thread_policy_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    code = (
        "import fskd.cli, os, torch; from fskd.runtime import available_cores, torch_threads_per_core; "
        "torch_threads_per_core(); print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads() == available_cores())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["PASSIVE", "True"], out.stderr[-2000:]
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # the user's choice wins
    out = subprocess.run(
        [sys.executable, "-c", "import fskd.cli, os; print(os.environ['OMP_WAIT_POLICY'])"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.strip() == "ACTIVE"


def test_api_progress_is_off_when_stderr_is_not_a_terminal():
    from fskd.progress import extract_bar, resolve

    assert resolve("auto", extract_bar) is None  # pytest captures stderr: not a terminal
    assert resolve(None, extract_bar) is None
    fn = lambda *a: None  # noqa: E731
    assert resolve(fn, extract_bar) is fn


def test_shipped_descriptions_example(cub35_store, tmp_path):
    path = ROOT / "examples" / "descriptions.json"
    r = api.adapt(
        AdaptConfig(store=cub35_store, method="zero-shot", shots=0, descriptions=str(path), out=str(tmp_path / "zs"))
    )
    state = load_state(r.out)
    assert "descriptions" in json.dumps(state.selected_on).lower() or "descriptions" in json.dumps(state.metrics)
    ev = api.evaluate(EvalConfig(store=cub35_store, state=r.out, way=5, shots=1, episodes=100))
    assert 20 < ev.accuracy <= 100
