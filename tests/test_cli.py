"""The CLI as a user drives it (CliRunner), reopening what it wrote."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fskd.cli import app
from fskd.datasets import DATASETS
from fskd.encoders import ENCODERS
from fskd.store import FeatureStore

runner = CliRunner()


def test_listings_come_from_the_registries():
    out = runner.invoke(app, ["datasets"]).output
    assert all(n in out for n in DATASETS.names())
    out = runner.invoke(app, ["encoders"]).output
    assert all(n in out for n in ENCODERS.names())
    helptext = runner.invoke(app, ["extract", "--help"]).output
    assert "cifar-fs" in helptext and "lite0-minilm" in helptext
    assert runner.invoke(app, ["--version"]).output.strip()


def test_extract_info_eval_json(image_folder, tmp_path):
    store = tmp_path / "s.zarr"
    res = runner.invoke(
        app,
        [
            "extract",
            "folder",
            "--root",
            str(image_folder),
            "--store",
            str(store),
            "--encoder",
            "synthetic:24",
            "--workers",
            "0",
            "--class-ratio",
            "0.17,0.0,0.83",
        ],
    )
    assert res.exit_code == 0, res.output
    info = json.loads(runner.invoke(app, ["info", str(store), "--json"]).output)
    assert info["complete"] and info["dim"] == 24 and info["class_split"] == {"base": 1, "val": 0, "novel": 5}
    res = runner.invoke(
        app,
        [
            "eval",
            "--store",
            str(store),
            "--way",
            "5",
            "--shot",
            "1",
            "--query",
            "2",
            "--episodes",
            "50",
            "--json",
            "--report",
            str(tmp_path / "rep"),
        ],
    )
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["episodes"] == 50 and r["way"] == 5 and r["split"] == "novel" and 0 <= r["accuracy"] <= 100
    assert r["report"] == [
        str(tmp_path / "rep" / f"s_prototype_episodic_novel_5way1shot_q2_e50_seed{r['seed']}.{x}")
        for x in ("json", "md")
    ]
    saved = json.loads(open(r["report"][0]).read())
    assert saved["result"]["accuracy"] == r["accuracy"] and "git_sha" in saved and saved["versions"]["torch"]
    assert len(saved["result"]["per_episode"]) == 50 and "per_episode" not in r
    # the same evaluation again writes beside the first report, never over it
    again = json.loads(
        runner.invoke(
            app,
            [
                "eval",
                "--store",
                str(store),
                "--way",
                "5",
                "--shot",
                "1",
                "--query",
                "2",
                "--episodes",
                "50",
                "--json",
                "--report",
                str(tmp_path / "rep"),
            ],
        ).stdout
    )
    assert again["report"][0].endswith(f"seed{r['seed']}-2.json") and len(list((tmp_path / "rep").iterdir())) == 4
    assert FeatureStore.open(store).attrs["config"]["class_ratio"] == [0.17, 0.0, 0.83]


def test_bad_input_exits_2_with_a_clear_message(image_folder, tmp_path):
    store = tmp_path / "s.zarr"
    runner.invoke(
        app,
        [
            "extract",
            "folder",
            "--root",
            str(image_folder),
            "--store",
            str(store),
            "--encoder",
            "synthetic:8",
            "--workers",
            "0",
            "--class-ratio",
            "0.17,0.0,0.83",
        ],
    )
    res = runner.invoke(app, ["eval", "--store", str(store), "--shot", "5", "--query", "15"])
    assert res.exit_code == 2 and "fewer than shot + query = 5 + 15 = 20" in res.output
    res = runner.invoke(app, ["eval", "--store", str(tmp_path / "missing.zarr")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["eval", "--store", str(store), "--protocol", "bogus"])  # a real choice: fails in parsing
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "--protocol 'bogus' is not one of episodic" in errors[0]
    res = runner.invoke(app, ["eval", "--store", str(store), "--shots", "1", "--split", "val"])
    assert res.exit_code == 2 and "'val' class split is empty" in res.output
    res = runner.invoke(
        app,
        [
            "extract",
            "folder",
            "--root",
            str(image_folder),
            "--store",
            str(tmp_path / "x.zarr"),
            "--sample-split",
            "0.5,0.5",
        ],
    )
    assert res.exit_code == 2 and "--sample-split must be 3 non-negative ratios" in res.output
