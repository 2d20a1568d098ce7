"""Accuracy-vs-shots figures in the style of CoOp's: one panel per dataset plus the average over
datasets, one line per method, shots on a log2 axis (matplotlib, PNG and SVG)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

STEM = "accuracy_vs_shots"


def accuracy_vs_shots(out: Path, summarised, config: dict) -> list[Path]:
    """Write ``OUT/accuracy_vs_shots.png`` and ``.svg``; returns their paths ([] with one K only:
    a line needs two points)."""
    summ, methods, datasets, shots = summarised
    if len(shots) < 2:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fskd.reports.bench import OK, _average

    b2n = config.get("protocol") == "base-to-new"
    panels = list(datasets) + ([("Mean HM over datasets" if b2n else "Average over datasets")]
                               if len(datasets) > 1 else [])
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    # one panel still gets a figure wide enough for the title and a legend row of several methods
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(4.2 * ncols, 8.4), 3.4 * nrows + 0.6), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    markers = "osD^v<>pP*Xh"
    for ax, panel in zip(axes.flat, panels, strict=False):
        for i, m in enumerate(methods):
            if panel in datasets:
                cells = [summ.get((m, panel, k)) for k in shots]
            else:
                cells = [_average(summ, m, datasets, k) for k in shots]
            y = np.array([c.mean if c is not None and c.status == OK else np.nan for c in cells])
            if np.isnan(y).all():
                continue
            ax.plot(shots, y, marker=markers[i % len(markers)], color=cmap(i), label=m, linewidth=1.6, markersize=5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots)
        ax.set_xticklabels([str(k) for k in shots])
        ax.set_title(panel, fontsize=11)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("HM of base and new (%)" if b2n else "top-1 accuracy (%)")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    seeds = config.get("seeds") or []
    episodic = config.get("protocol") == "episodic"
    what = ("Base-to-new harmonic mean" if b2n else
            f"{config.get('way', 5)}-way episodic accuracy" if episodic else "All-way accuracy")
    over = "class splits" if episodic and config.get("class_ratio") else "seeds"
    val = ("validation on val-class episodes" if episodic else
           "CoOp few-shot validation" if config.get("val_rule", "few-shot") == "few-shot" else "full validation")
    title = (f"{what} vs shots (mean over {over} {', '.join(map(str, seeds))}; {val}"
             f"{'; methods with no new-class accuracy are not drawn' if b2n else ''})")
    title = textwrap.fill(title, width=int(fig.get_figwidth() * 11), break_on_hyphens=False)
    fig.suptitle(title, fontsize=12)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), frameon=False, fontsize=10)
    legend_rows = -(-len(labels) // 5)
    fig.tight_layout(rect=(0, 0.05 + 0.045 * legend_rows, 1, 0.95 - 0.05 * title.count("\n")))
    paths = [Path(out) / f"{STEM}.png", Path(out) / f"{STEM}.svg"]
    for p in paths:
        tmp = p.with_name(f".{p.name}.tmp")
        fig.savefig(tmp, dpi=130, format=p.suffix[1:])
        tmp.replace(p)
    plt.close(fig)
    return paths
