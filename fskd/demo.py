"""``fskd demo``, the main job on the embedded default: an application of :mod:`fskd.api` (extract,
then evaluate), not part of the library's API."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from fskd.api import EvalConfig, ExtractConfig, evaluate, extract
from fskd.config import DemoConfig
from fskd.errors import ConfigError, DatasetError
from fskd.progress import AUTO
from fskd.reports import markdown_table
from fskd.store.extract import Progress


@dataclass
class DemoResult:
    rows: list[dict]
    report: str
    seconds: float
    plot: str = ""  # demo.png: accuracy vs shots with 95% CIs


def _forget_demo_reports(out: Path) -> None:
    """A rerun of the demo replaces its evaluation reports (not ``-2`` copies beside them): delete
    the ones the previous run's ``demo.json`` names, and only those, inside ``out``."""
    try:
        rows = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    base = out.resolve()
    for row in rows if isinstance(rows, list) else []:
        for p in (row.get("report") or []) if isinstance(row, dict) else []:
            path = Path(str(p)).resolve()
            if path.parent == base and path.suffix in (".json", ".md") and path.name != "demo.json":
                path.unlink(missing_ok=True)


def demo(config: DemoConfig, progress: Progress | str | None = AUTO) -> DemoResult:
    """The main job on the embedded default: encode the offline datasets with the offline
    encoder once, then evaluate 5-way 1-shot and 5-shot prototypes on their novel classes and
    the all-way protocol on CUB. Writes ``<out>/demo.md`` and ``<out>/demo.json``."""
    if not isinstance(config, DemoConfig):
        raise ConfigError(f"fskd.demo.demo takes a DemoConfig, got {type(config).__name__} {config!r:.80}")
    t0 = time.perf_counter()
    root = Path(config.data_root)
    roots = {"cub": root / "cub35", "omniglot": root / "omniglot"}
    rows: list[dict] = []
    points: list[tuple] = []  # (dataset, protocol, K, accuracy, 95% CI) for the plot
    out = Path(config.out)
    _forget_demo_reports(out)
    for ds in config.datasets:
        if ds not in roots:
            raise DatasetError(f"demo datasets are {', '.join(roots)}; got {ds!r}")
        if not roots[ds].exists():
            raise DatasetError(
                f"demo data {roots[ds]} not found; pass --data-root to the folder holding cub35/ and omniglot/"
            )
        store = out / f"{ds}-{config.encoder}.zarr"
        extract(
            ExtractConfig(
                dataset=ds, root=str(roots[ds]), encoder=config.encoder, store=str(store), workers=config.workers
            ),
            progress,
        )
        for shot in (1, 5):
            r = evaluate(
                EvalConfig(store=str(store), way=5, shots=shot, query=15, episodes=config.episodes, report=str(out))
            )
            points.append((ds, "5-way novel", shot, r.accuracy, r.ci95))
            rows.append(
                {
                    "dataset": ds,
                    "protocol": f"5-way {shot}-shot novel",
                    "accuracy": f"{r.accuracy:.2f} ± {r.ci95:.2f}",
                    "classes": r.classes,
                    "episodes": r.episodes,
                    "eval s": r.eval_seconds,
                    "report": r.report,
                }
            )
        if ds == "cub":
            for shot in (1, 4, 16):
                r = evaluate(EvalConfig(store=str(store), protocol="allway", shots=shot, report=str(out)))
                points.append((ds, "all-way", shot, r.accuracy, r.ci95))
                rows.append(
                    {
                        "dataset": ds,
                        "protocol": f"all-way {shot}-shot",
                        "accuracy": f"{r.accuracy:.2f} ± {r.ci95:.2f}",
                        "classes": r.classes,
                        "episodes": "seeds 1-3",
                        "eval s": r.eval_seconds,
                        "report": r.report,
                    }
                )
    table = markdown_table(rows, ["dataset", "protocol", "accuracy", "classes", "episodes", "eval s"])
    out.mkdir(parents=True, exist_ok=True)
    report = out / "demo.md"
    report.write_text(
        f"# fskd demo\n\nEncoder `{config.encoder}`, prototype classifier (SimpleShot: base-mean centring, L2). "
        f"Episodic rows: mean accuracy and 95% CI over {config.episodes} episodes on novel classes. "
        f"All-way rows: mean over seeds 1-3 and 95% CI (Student t over the 3 seeds).\n\n{table}",
        encoding="utf-8",
    )

    (out / "demo.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    from fskd.reports.plots import demo_plot

    plot = demo_plot(out / "demo.png", points, config.encoder, config.episodes)
    return DemoResult(rows=rows, report=str(report), seconds=round(time.perf_counter() - t0, 2), plot=str(plot))
