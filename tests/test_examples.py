"""The shipped examples stay true: examples/pipeline.py and examples/Makefile run end to end on
cub35 (on a copy of the cached store, so nothing is re-encoded) and print or report sane numbers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _seed_store(cub35_store: str, out: Path) -> Path:
    """A copy of the cached cub35 store standing in for the demo's (the examples' default)."""
    out.mkdir(parents=True)
    shutil.copytree(cub35_store, out / "cub-lite0-minilm.zarr")
    return out / "cub-lite0-minilm.zarr"


def test_python_pipeline_example(cub35_store, cub35_root, tmp_path):
    out = tmp_path / "py"
    store = _seed_store(cub35_store, out)
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "pipeline.py"),
            "--data",
            str(cub35_root),
            "--out",
            str(out),
            "--store",
            str(store),
            "--episodes",
            "100",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert "reused" in lines[0]  # same inputs: the store is not re-encoded
    proto = [float(m.group(1)) for m in re.finditer(r"prototype 5-way \d-shot novel: ([\d.]+)", res.stdout)]
    assert len(proto) == 2 and 70 < proto[0] < proto[1] < 100
    syn = re.search(r"syntrans\s+5-way 1-shot ([\d.]+)", res.stdout)
    assert syn and float(syn.group(1)) > 70
    assert "Student t over 3 seeds" in res.stdout
    for method in ("zero-shot", "tip-adapter", "syntrans"):
        assert all((out / f"{method}-seed{s}" / "state.json").exists() for s in (1, 2, 3))


def test_make_pipeline_example(cub35_store, cub35_root, tmp_path):
    out = tmp_path / "mk"
    store = _seed_store(cub35_store, out)
    fskd = Path(sys.executable).parent / "fskd"
    res = subprocess.run(
        [
            "make",
            "-f",
            "examples/Makefile",
            f"FSKD={fskd}",
            f"DATA={cub35_root}",
            f"OUT={out}",
            f"STORE={store}",
            "SHOTS=2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert " extract " not in res.stdout  # the store target was already there
    reports = {p.name: json.loads(p.read_text()) for p in (out / "reports").glob("*.json")}
    assert len(reports) == 4, sorted(reports)
    for name, rep in reports.items():
        acc = rep.get("accuracy", rep.get("result", {}).get("accuracy"))
        assert acc is not None and 30 < acc < 100, (name, acc)
    assert (out / "tip-adapter" / "state.json").exists() and (out / "fma-lite" / "state.json").exists()
