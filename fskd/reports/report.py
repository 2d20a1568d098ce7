"""Reports: one JSON and one Markdown file per result, with config, versions and git sha."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from fskd import __version__

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    """Installed versions of the stack, read from package metadata (imports none of them)."""
    from importlib.metadata import PackageNotFoundError, version

    def _v(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "?"

    faiss = next((v for v in (_v("faiss-cpu"), _v("faiss-gpu-cu12"), _v("faiss-gpu"), _v("faiss")) if v != "?"), "?")
    return {
        "fskd": __version__,
        "python": platform.python_version(),
        "torch": _v("torch"),
        "open_clip": _v("open_clip_torch"),
        "timm": _v("timm"),
        "zarr": _v("zarr"),
        "faiss": faiss,
        "numpy": _v("numpy"),
    }


def git_sha(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=cwd or Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-") or "x"


def report_name(result) -> str:
    """A file stem that tells results apart: store, state (or classifier), protocol, shots and
    seeds, e.g. ``cub-lite0-minilm_fma-16shot_allway_16shot_seeds1-2-3``."""
    store = _slug(Path(result.store).name.removesuffix(".zarr"))
    who = _slug(Path(result.state).name) if result.state else _slug(result.classifier)
    if result.protocol == "episodic":
        what = f"episodic_{result.split}_{result.way}way{result.shots}shot_q{result.query}_e{result.episodes}_seed{result.seed}"
    else:
        kind = {"base-to-new": "base2new", "cross-dataset": "crossdataset", "domain-shift": "domainshift"}.get(
            result.protocol, "allway"
        )
        what = f"{kind}_{result.shots}shot_seeds{'-'.join(map(str, result.seeds))}"
        if not getattr(result, "inductive", True):  # --transductive: another experiment, another file
            what += "_transclip"
            setting = getattr(result, "transductive_setting", None)
            if isinstance(setting, dict):  # realistic batches: another experiment again
                what += f"-b{setting['batch']}c{setting['active_classes']}"
    return f"{store}_{who}_{what}"


def _free_stem(directory: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``, ... : a report never replaces an earlier one."""
    stem, n = name, 1
    while (directory / f"{stem}.json").exists() or (directory / f"{stem}.md").exists():
        n += 1
        stem = f"{name}-{n}"
    return stem


def _cell(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def write_report(directory: str | Path, name: str, result: dict, protocol: str, config: dict) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` under ``directory`` (``<name>-2`` ... when taken:
    never over an earlier report); returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "result": result,
        "protocol": protocol,
        "config": config,
        "versions": versions(),
        "git_sha": git_sha(),
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    stem = _free_stem(directory, name)
    if stem != name:
        log.warning("report %s exists; writing %s beside it", directory / name, stem)
    jpath, mpath = directory / f"{stem}.json", directory / f"{stem}.md"
    jpath.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    rows = "\n".join(f"| {k} | {_cell(v)} |" for k, v in result.items() if not isinstance(v, (list, dict)))
    md = f"# {stem}\n\n**Protocol.** {protocol}\n\n| field | value |\n|---|---|\n{rows}\n\n"
    if result.get("per_seed"):
        md += (
            "Per seed: "
            + ", ".join(f"seed {s}: {a:.2f}%" for s, a in zip(result["seeds"], result["per_seed"], strict=True))
            + ".\n\n"
        )
    if result.get("per_class"):
        md += (
            "## Per-class accuracy (mean over seeds)\n\n"
            + markdown_table(result["per_class"], ["class", "accuracy", "test_rows"])
            + "\n"
        )
    if result.get("warnings"):
        md += "## Warnings\n\n" + "\n".join(f"- {w}" for w in result["warnings"]) + "\n\n"
    md += f"fskd {__version__}, git {payload['git_sha'] or 'n/a'}, written {payload['written']}.\n"
    mpath.write_text(md, encoding="utf-8")  # class names and "±": not the locale's encoding
    return jpath, mpath


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "\n".join("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows) + "\n"
