"""Which modules each command loads: the listings, --help and ``fskd info`` import no torch; eval
imports no image-model library (torchvision, open_clip, timm, transformers). Each command runs in
a fresh interpreter, so ``sys.modules`` shows exactly what it pulled in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = [
    "torch",
    "torchvision",
    "open_clip",
    "timm",
    "transformers",
    "sentence_transformers",
    "faiss",
    "sklearn",
    "matplotlib",
]
MODEL_LIBS = {"torchvision", "open_clip", "timm", "transformers", "sentence_transformers"}

PROBE = """
import json, sys
from typer.main import get_command
from fskd.cli import app
try:
    get_command(app).main(args=sys.argv[1:], prog_name="fskd", standalone_mode=False)
    code = 0
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "loaded": [m for m in HEAVY if m in sys.modules]}), file=sys.stderr)
""".replace("HEAVY", repr(HEAVY))


def loaded_by(*args: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300)
    last = json.loads(r.stderr.strip().splitlines()[-1])
    assert last["code"] in (0, None), (args, r.stdout[-2000:], r.stderr[-2000:])
    return last["loaded"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from fskd import api
    from fskd.config import AdaptConfig, AlignConfig
    from fskd.store.synthetic import make_synthetic_store

    root = tmp_path_factory.mktemp("startup")
    store = str(make_synthetic_store(root / "s.zarr").path)
    api.adapt(AdaptConfig(store=store, method="linear-probe", shots=2, out=str(root / "lp")), progress=None)
    api.align(
        AlignConfig(store=store, method="fma", shots=2, out=str(root / "fma"), options={"iters": 20}), progress=None
    )
    return store, str(root / "lp"), str(root / "fma")


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["datasets"],
        ["encoders"],
        ["classifiers"],
        ["methods"],
        ["methods", "tip-adapter"],
        ["methods", "fma", "--json"],
        ["adapt", "--help"],
        ["eval", "--help"],
    ],
)
def test_listings_and_help_import_no_torch(args):
    assert loaded_by(*args) == []


def test_info_imports_no_torch(fitted):
    assert loaded_by("info", fitted[0]) == []


@pytest.mark.parametrize("how", ["episodic", "allway", "linear-probe state", "fma state"])
def test_eval_imports_no_image_model_library(fitted, how, tmp_path):
    store, lp, fma = fitted
    args = {
        "episodic": ["--shots", "1", "--episodes", "20"],
        "allway": ["--protocol", "allway", "--shots", "1"],
        "linear-probe state": ["--state", lp, "--shots", "2", "--episodes", "20"],
        "fma state": ["--state", fma, "--protocol", "allway", "--shots", "2", "--seeds", "1"],
    }[how]
    loaded = set(loaded_by("eval", "--store", store, *args, "--report", str(tmp_path / "r")))
    assert "torch" in loaded  # it computes
    assert not loaded & MODEL_LIBS, loaded
    assert list((tmp_path / "r").glob("*.json")), "the report (with package versions) was written"


def test_the_method_options_file_is_current():
    """``fskd methods NAME`` reads fskd/methods/method_options.json (no torch); it must equal the
    live options. When this fails, regenerate it: ``python -m fskd.catalog``."""
    import json
    from pathlib import Path

    from fskd import catalog
    from fskd.methods import METHODS

    written = json.loads((Path(catalog.__file__).parent / "methods" / catalog.OPTIONS_FILE).read_text())
    live = {n: json.loads(json.dumps(catalog.live_method_info(n))) for n in METHODS.names()}
    assert written == live, "fskd/methods/method_options.json is stale: run `python -m fskd.catalog`"
