"""The README's first command (`make demo`) runs `fskd demo`; run that path end to end."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from fskd.cli import app

from .conftest import CACHE, ROOT


def test_make_demo_runs_fskd_demo_on_the_offline_default():
    recipe = re.search(r"^demo:.*?\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert "fskd demo" in recipe and "--data-root" in recipe


def test_demo_end_to_end(cub35_store, omniglot_store):
    # The stores cached by the fixtures are exactly what the demo writes (same inputs, same
    # names), so the demo reuses them: this test checks the whole path with fewer episodes.
    res = CliRunner().invoke(
        app, ["demo", "--data-root", str(ROOT.parent / "shared" / "data"), "--out", str(CACHE), "--episodes", "100"]
    )
    assert res.exit_code == 0, res.output
    rows = json.loads((CACHE / "demo.json").read_text())
    assert {r["dataset"] for r in rows} == {"cub", "omniglot"}
    cub_1shot = next(r for r in rows if r["dataset"] == "cub" and r["protocol"] == "5-way 1-shot novel")
    assert 72 < float(cub_1shot["accuracy"].split(" ")[0]) < 90
    assert "| cub | 5-way 5-shot novel |" in (CACHE / "demo.md").read_text()


def test_demo_rerun_replaces_its_reports_and_writes_one_plot(cub35_store, omniglot_store):
    args = ["demo", "--data-root", str(ROOT.parent / "shared" / "data"), "--out", str(CACHE), "--episodes", "50"]
    for _ in range(2):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
    reports = sorted(p.name for p in CACHE.glob("*.md") if p.name != "demo.md")
    assert len(reports) == 7, reports  # one per evaluation: no "-2" copies beside them
    assert (CACHE / "demo.png").stat().st_size > 10_000 and "plot:" in res.output
