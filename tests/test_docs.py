"""The documentation stays whole: every CLI verb and every registered method has its page or
section in docs/, README.md stays a landing page (at most 250 lines), every relative link in
README.md and docs/ points to a file that exists, the generated parts name real commands,
methods and benchmark commands, and (with mkdocs installed) the site builds with --strict."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from fskd import config as fskd_config
from fskd.catalog import registries
from fskd.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MAX_README_LINES = 250


def _own_pages() -> list[Path]:
    """The hand-written pages: docs/**/*.md except docs/bench/ (benchmark output)."""
    return sorted(p for p in DOCS.rglob("*.md") if "bench" not in p.relative_to(DOCS).parts[:1])


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code spans."""
    text = re.sub(r"^(```|~~~).*?^\1[ \t]*$", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _headings_and_rows() -> str:
    lines = []
    for page in _own_pages():
        lines += [x for x in page.read_text().splitlines() if x.startswith("#") or x.startswith("|")]
    return "\n".join(lines)


def _verbs() -> list[str]:
    return list(typer.main.get_command(app).commands)


def _gen(module: str):
    spec = importlib.util.spec_from_file_location(f"docs_{module}", DOCS / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("verb", _verbs())
def test_every_cli_verb_has_a_page_or_section(verb):
    page = DOCS / "cli" / f"{verb}.md"
    heading = re.compile(rf"^#+ .*`fskd {re.escape(verb)}`", re.M)
    assert page.exists() or any(heading.search(p.read_text()) for p in _own_pages()), (
        f"`fskd {verb}` has no page docs/cli/{verb}.md and no heading `fskd {verb}` in docs/"
    )


@pytest.mark.parametrize("method", list(registries()["methods"]))
def test_every_method_has_a_heading_or_table_row(method):
    text = _headings_and_rows()
    name = re.escape(method)
    heading = re.search(rf"^#+ .*`{name}`", text, re.M)
    row = re.search(rf"^\| *(\[)?`{name}`", text, re.M)
    assert heading or row, f"method {method!r} has no heading or table row on any page in docs/"


def test_readme_is_a_landing_page():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    setup = re.search(r"^## Set up: two commands\n(.*?)^## ", text, re.M | re.S).group(1)
    assert re.search(r"^make demo +# install into \.venv, then run the main job on the offline default$", setup, re.M)
    assert re.search(r"^make test +# install into \.venv, then run the test suite$", setup, re.M)
    assert "make docs" in text and "site/" in text


def _links(path: Path) -> list[str]:
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _prose(path.read_text()))


@pytest.mark.parametrize("path", [README, *_own_pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(path):
    broken = []
    for target in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor on the same page
        file = target.split("#", 1)[0]
        if not (path.parent / file).exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)} links to files that do not exist: {broken}"


def test_generated_sections_name_real_commands_and_methods():
    from fskd.catalog import method_info

    verbs, methods = set(_verbs()), set(registries()["methods"])
    recipes = {f"{m}:{r['name']}" for m in methods for r in method_info(m).get("recipes", [])}
    for page in _own_pages():
        for kind, arg in re.findall(r"^<!-- fskd-(cli|method-options)(?::\s*(\S+))?\s*-->", page.read_text(), re.M):
            known = (verbs | {"all"}) if kind == "cli" else methods | recipes  # METHOD:RECIPE: one recipe's options
            assert arg in known, f"{page.relative_to(ROOT)}: <!-- fskd-{kind}: {arg} --> names nothing known"


@pytest.mark.parametrize("path", [README, *_own_pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_snippets_use_real_config_fields(path):
    """Every ``XConfig(key=...)`` in a ```python block names fields the config has."""
    for block in re.findall(r"^```python\n(.*?)^```", path.read_text(), re.M | re.S):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.endswith("Config"):
                cls = getattr(fskd_config, node.func.id)
                fields = {f.name for f in dataclasses.fields(cls)}
                unknown = [k.arg for k in node.keywords if k.arg not in fields]
                assert not unknown, f"{path.relative_to(ROOT)}: {node.func.id} has no field(s) {unknown}"


def test_every_benchmark_table_has_its_command():
    gen = _gen("gen_results")
    assert gen.table_names(), "docs/bench holds no *_table.md"
    for name in gen.table_names():
        title, command, grid = gen.command_of(name)
        assert command, f"docs/bench/{name}_table.md: no command (add it to COMMANDS in docs/gen_results.py)"
        assert grid is None or grid.exists(), f"{name}: {grid} does not exist"
        page = gen.render(name)
        assert command in page and page.startswith(f"# {title}")
    assert set(gen.generated_pages()) >= {gen.page_path(n) for n in gen.table_names()}


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (the docs extra)")
def test_the_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert all(f"fskd {v}" in cli for v in _verbs())
    assert (tmp_path / "site" / "results" / "tables" / "allway" / "index.html").exists()
