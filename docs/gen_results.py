"""mkdocs hook: one results page per table in ``docs/bench/``, generated at build time.

``docs/bench/NAME_table.md`` is what a benchmark command wrote (``fskd bench`` copies its
``OUT/table.md`` there; ``benchmarks/views_cub35.py`` prints its own). For each table this hook
adds the page ``results/tables/NAME.md`` to the site and to the nav (under "Results"), holding:

- the command that produces the table: from ``COMMANDS`` below, else the grid file
  ``benchmarks/grid_NAME.toml``, else the command in the table's first-line HTML comment; for a
  grid file, what the grid runs (stores, methods, shots, seeds, protocol) and where it writes;
- the date the table file was last committed (``git log -1 --format=%cs -- FILE``), when git
  and the repository's history are there (omitted otherwise);
- the plots ``docs/bench/NAME_*.png`` and the raw rows ``docs/bench/NAME_*.jsonl`` beside it;
- the table itself, its headings one level down.

Any other ``docs/bench/NAME.md`` (a write-up that explains its own inputs and commands) becomes
``results/tables/NAME.md`` as it is, with its commit date; so no file in ``docs/bench/`` is left
out of the site or breaks ``mkdocs build --strict``.

Hand-written pages link to ``../bench/NAME_table.md`` or ``../bench/NAME.md`` (a file that
exists, so the link works on GitHub too); on the site the link goes to the generated page
instead (``on_page_markdown``), and the raw files are left out of the site
(``exclude_docs: bench/*.md`` in mkdocs.yml).
``<!-- fskd-bench-tables -->`` on a page of its own line becomes the list of generated pages.

Run ``python docs/gen_results.py`` to print what would be generated.
"""

from __future__ import annotations

import posixpath
import re
import shutil
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
BENCH = DOCS / "bench"
OUT_DIR = "results/tables"  # inside docs/: where the generated pages go
NAV_SECTION = "Results"
NAV_SUBSECTION = "Tables from the benchmarks"

#: table name -> (title, command) where the grid file is not benchmarks/grid_NAME.toml
COMMANDS = {
    "allway": ("All-way grid: cub35 and Omniglot", "fskd bench --grid benchmarks/grid_offline.toml"),
    "base_to_new": ("Base-to-new grid: cub35 and Omniglot", "fskd bench --grid benchmarks/grid_offline_b2n.toml"),
    "coop": ("Prompt learning on cub35, all-way", "fskd bench --grid benchmarks/grid_coop.toml"),
    "coop_base_to_new": (
        "Prompt learning on cub35, base-to-new",
        "fskd bench --grid benchmarks/grid_coop.toml --protocol base-to-new --shots 4 --out runs/bench/coop-b2n",
    ),
    "views": ("Augmented views on cub35", "python benchmarks/views_cub35.py"),
}
#: what a reader needs to know about a table beyond its command (shown above it)
NOTES = {
    "coop": "The plot covers 1 and 4 shots; the 16-shot rows were run into another bench folder "
    "(`--shots 16`), and their cells are in `coop_16shot_results.jsonl`. The command above runs all "
    "three shot counts into one folder and draws them together: about 2 h 15 min on a 2-core CPU.",
}
#: titles of the tables whose command is their grid file's
TITLES = {
    "distill_more_base": "Distilled student with more base classes (24 / 5 / 6)",
    "hp_selection": "Cached-feature baselines under each hyper-parameter selection policy, with TransCLIP",
    "hp_selection_slow": "Cross-modal LP and APE-T under each hyper-parameter selection policy, with TransCLIP",
    "distill_semi": "Distilled student, semi regime, all-way (one student per seed)",
    "distill_splits": "Distilled student over 5 class splits",
    "episodic_splits": "Episodic methods over 5 class splits",
    "seed_allway": "MTKD in one and two stages, a fitted teacher and DHO: all-way over 5 seeds",
    "seed_episodic": "SynTrans end to end over 5 class splits",
    "linear_probe": "Linear probes: lpclip against fskd's tuned probe",
}


def table_names() -> list[str]:
    """NAME of every docs/bench/NAME_table.md."""
    return sorted(p.name[: -len("_table.md")] for p in BENCH.glob("*_table.md"))


def note_names() -> list[str]:
    """NAME of every other docs/bench/NAME.md."""
    return sorted(p.stem for p in BENCH.glob("*.md") if not p.name.endswith("_table.md"))


def page_names() -> list[str]:
    return table_names() + [n for n in note_names() if n not in table_names()]


def source(name: str) -> Path:
    """The docs/bench file behind page NAME."""
    table = BENCH / f"{name}_table.md"
    return table if table.exists() else BENCH / f"{name}.md"


def page_path(name: str) -> str:
    """The generated page of NAME, relative to docs/."""
    return f"{OUT_DIR}/{name}.md"


def generated_pages() -> list[str]:
    return [page_path(n) for n in page_names()]


def title_of(name: str) -> str:
    if name in table_names():
        return command_of(name)[0]
    h1 = re.search(r"^# (.+)$", source(name).read_text(), re.M)
    return h1.group(1).strip() if h1 else name.replace("_", " ")


def _owner(filename: str, names: list[str]) -> str | None:
    """The table a plot or results file belongs to: the longest NAME with filename = NAME_..."""
    owners = [n for n in names if filename.startswith(n + "_")]
    return max(owners, key=len) if owners else None


def attachments(suffix: str) -> dict[str, list[str]]:
    """Files docs/bench/*SUFFIX grouped by the table they belong to (None: no table)."""
    names = page_names()
    out: dict[str, list[str]] = {}
    for p in sorted(BENCH.glob(f"*{suffix}")):
        out.setdefault(_owner(p.name, names), []).append(p.name)
    return out


def _git_date(path: Path) -> str | None:
    """The date the file was last committed, or None without git or history."""
    if shutil.which("git") is None:
        return None
    try:
        res = subprocess.run(
            ["git", "log", "-1", "--format=%cs", "--", str(path.relative_to(ROOT))],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(path.read_text())


def command_of(name: str) -> tuple[str, str, Path | None]:
    """(title, command, grid file or None) of table NAME."""
    text = (BENCH / f"{name}_table.md").read_text()
    title = TITLES.get(name)
    if name in COMMANDS:
        title, command = COMMANDS[name]
    elif (ROOT / "benchmarks" / f"grid_{name}.toml").exists():
        command = f"fskd bench --grid benchmarks/grid_{name}.toml"
    else:
        m = re.match(r"<!--\s*((?:fskd|python)\s[^(]*?)\s*(?:\(.*)?-->", text)
        command = m.group(1) if m else ""
    if title is None:
        h1 = re.search(r"^# (.+)$", text, re.M)
        title = h1.group(1) if h1 else name.replace("_", " ")
    grid = re.search(r"--grid (\S+)", command)
    return title, command, (ROOT / grid.group(1)) if grid else None


def _grid_text(grid: Path, command: str) -> list[str]:
    g = _load_toml(grid)

    def names(key):
        return ", ".join(f"`{v}`" for v in g.get(key, []))

    out_dir = re.search(r"--out (\S+)", command)
    out = out_dir.group(1) if out_dir else g.get("out", "")
    lines = [f"The grid file `{grid.relative_to(ROOT).as_posix()}` runs"]
    parts = [
        f"stores {names('stores')}",
        f"methods {names('methods')}",
        f"shots {', '.join(map(str, g.get('shots', [])))}",
        f"seeds {', '.join(map(str, g.get('seeds', [])))}",
        f"protocol `{g.get('protocol', 'allway')}`",
    ]
    if g.get("class_ratio"):
        parts.append(f"class ratio {', '.join(map(str, g['class_ratio']))} (a seeded class split per seed)")
    for override in ("protocol", "shots"):
        m = re.search(rf"--{override} (\S+)", command)
        if m:
            parts.append(f"with `--{override} {m.group(1)}` given on the command line")
    lines.append("; ".join(parts) + ".")
    if out:
        lines.append(
            f"It writes `{out}/table.md` (this table), `{out}/table.csv`, `{out}/table.tex`, the plot "
            f"and `{out}/results.jsonl` (one line per cell); `fskd bench --report {out}` redraws the "
            "tables and plots from the results without fitting anything."
        )
    if any(str(s).startswith("runs/demo/") for s in g.get("stores", [])):
        lines.append("The stores are the ones `make demo` writes: run it first.")
    return [" ".join(lines)]


def _escape_brackets(row: str) -> str:
    """`gda +TransCLIP[64:4] [none]` in a table row would read as a reference link to "none":
    escape the bracket."""
    return re.sub(r"\](\s?)\[", r"]\1\\[", row)


def _table_body(text: str, command: str) -> tuple[list[str], list[str]]:
    """(notes, body) of a table file: its H1 dropped, headings one level down, a note that it is
    stale in place of a hand-made relabelling note, first-line HTML comments dropped."""
    notes, body = [], []
    for line in text.splitlines():
        if re.match(r"^# ", line) or re.match(r"^<!--.*-->$", line.strip()):
            continue
        if line.startswith("> ") and ("Relabelled by hand" in line or "not rerun" in line):
            notes.append(
                f'!!! warning "Regenerate this table"\n    These rows come from an older run: some method '
                f"names were updated by hand and the plot may still show older names. `{command}` "
                "regenerates the table and its plot."
            )
            continue
        if re.match(r"^#{2,5} ", line):
            line = "#" + re.sub(r"\s*\(run \d{4}-\d{2}-\d{2}.*\)\s*$", "", line)
        if line.startswith("| "):  # a row label that tells the method's earlier name
            line = re.sub(r"^(\| [^|]*?) \((?:run as|named) [^)|]*\)", r"\1", line)
            line = _escape_brackets(line)
        body.append(line)
    return notes, body


def render_note(name: str) -> str:
    """A write-up from docs/bench as it is, with its commit date under its title."""
    path = source(name)
    lines = [_escape_brackets(x) if x.startswith("| ") else x for x in path.read_text().splitlines()]
    date = _git_date(path)
    stamp = [f"File `docs/bench/{path.name}` last committed on {date}.", ""] if date else []
    if lines and lines[0].startswith("# "):
        out = [lines[0], "", *stamp, *lines[1:]]
    else:
        out = [f"# {title_of(name)}", "", *stamp, *lines]
    for png in attachments(".png").get(name, []):
        out += ["", f"![{png[:-4].replace('_', ' ')}](../../bench/{png})"]
    return "\n".join(out).rstrip() + "\n"


def render(name: str) -> str:
    if name not in table_names():
        return render_note(name)
    title, command, grid = command_of(name)
    table = BENCH / f"{name}_table.md"
    text = table.read_text()
    notes, body = _table_body(text, command or "its benchmark command")
    lines = [f"# {title}", ""]
    if command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    else:
        lines += ["The command that produced this table is not recorded in it.", ""]
    if grid is not None and grid.exists():
        lines += _grid_text(grid, command) + [""]
    date = _git_date(table)
    if date:
        lines += [f"Table file `docs/bench/{table.name}` last committed on {date}.", ""]
    lines += notes + ([""] if notes else [])
    if name in NOTES:
        lines += [NOTES[name], ""]
    for png in attachments(".png").get(name, []):
        date_png = _git_date(BENCH / png)
        caption = png[:-4].replace("_", " ")
        lines += [f"![{caption}](../../bench/{png})", ""]
        if date_png and date_png != date:
            lines += [f"Plot `docs/bench/{png}` last committed on {date_png}.", ""]
    raw = attachments(".jsonl").get(name, [])
    if raw:
        lines += [
            "Raw rows (one JSON object per cell): " + ", ".join(f"[`{r}`](../../bench/{r})" for r in raw) + ".",
            "",
        ]
    lines += body
    return "\n".join(lines).rstrip() + "\n"


def index_list() -> str:
    rows = [f"- [{command_of(n)[0]}]({page_path(n)}): `{command_of(n)[1]}`" for n in table_names()]
    rows += [f"- [{title_of(n)}]({page_path(n)})" for n in page_names() if n not in table_names()]
    loose = attachments(".jsonl").get(None, [])
    if loose:
        rows.append("- Raw rows without a table: " + ", ".join(f"[`{r}`](bench/{r})" for r in loose))
    return "\n".join(rows)


# mkdocs hook -------------------------------------------------------------------------------------

_LINK = re.compile(r"\]\(((?:\.\./)*)bench/([A-Za-z0-9_]+?)(_table)?\.md(#[^)\s]*)?\)")


def on_config(config):
    """Add the generated pages to the nav, under "Results"."""
    entries = [{title_of(n): page_path(n)} for n in page_names()]
    nav = config.get("nav")
    if nav is None or not entries:
        return config
    for item in nav:
        if isinstance(item, dict) and NAV_SECTION in item and isinstance(item[NAV_SECTION], list):
            item[NAV_SECTION].append({NAV_SUBSECTION: entries})
            break
    else:
        nav.append({NAV_SUBSECTION: entries})
    return config


def on_files(files, config):
    from mkdocs.structure.files import File

    for name in page_names():
        files.append(File.generated(config, page_path(name), content=render(name)))
    return files


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001 - mkdocs' signature
    here = posixpath.dirname(page.file.src_uri)

    def link(m: re.Match) -> str:
        filename = m.group(2) + (m.group(3) or "") + ".md"
        target = posixpath.normpath(posixpath.join(here, m.group(1) + "bench/" + filename))
        if target != f"bench/{filename}" or not (BENCH / filename).exists():
            return m.group(0)
        rel = posixpath.relpath(page_path(m.group(2)), here or ".")
        return f"]({rel}{m.group(4) or ''})"

    markdown = _LINK.sub(link, markdown)
    if "<!-- fskd-bench-tables -->" in markdown:
        listing = index_list()
        if here:  # links in index_list() are relative to docs/
            listing = re.sub(
                r"\]\((?!https?:)([^)]+)\)", lambda m: f"]({posixpath.relpath(m.group(1), here)})", listing
            )
        markdown = markdown.replace("<!-- fskd-bench-tables -->", listing)
    return markdown


if __name__ == "__main__":
    for n in page_names():
        sys.stdout.write(f"==> {page_path(n)}\n{render(n)}\n")
