"""Reports: one JSON and one Markdown file per result, with config, versions and git sha."""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from fskd import __version__


def versions() -> dict[str, str]:
    import faiss
    import numpy
    import open_clip
    import timm
    import torch
    import zarr

    return {
        "fskd": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "timm": timm.__version__,
        "zarr": zarr.__version__,
        "faiss": getattr(faiss, "__version__", "?"),
        "numpy": numpy.__version__,
    }


def git_sha(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd or Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def write_report(directory: str | Path, name: str, result: dict, protocol: str, config: dict) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` under ``directory``; returns both paths."""
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
    jpath, mpath = directory / f"{name}.json", directory / f"{name}.md"
    jpath.write_text(json.dumps(payload, indent=2, default=str))
    rows = "\n".join(f"| {k} | {v} |" for k, v in result.items() if not isinstance(v, (list, dict)))
    mpath.write_text(
        f"# {name}\n\n**Protocol.** {protocol}\n\n| field | value |\n|---|---|\n{rows}\n\n"
        f"fskd {__version__}, git {payload['git_sha'] or 'n/a'}, written {payload['written']}.\n"
    )
    return jpath, mpath


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "\n".join("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows) + "\n"
