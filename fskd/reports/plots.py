"""Accuracy-vs-shots figures in the style of CoOp's: one panel per dataset plus the average over
datasets, one line per method, shots on a log2 axis (matplotlib, PNG and SVG)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

STEM = "accuracy_vs_shots"


def _fit_y_range(ax, lines: dict[str, np.ndarray]) -> None:
    """Keep the y axis on the band where most lines are: a line far below the rest (a zero-shot
    baseline at 8% beside ten methods at 60-77%) would squeeze them into a sliver. Such a line is
    left below the axis and named, with its values, at the bottom of the panel."""
    if len(lines) < 3:
        return
    lows = {m: np.nanmin(y) for m, y in lines.items()}
    top = max(np.nanmax(y) for y in lines.values())
    mid = float(np.median(list(lows.values())))
    cut = mid - 2.0 * max(top - mid, 1.0)
    below = {m: y for m, y in lines.items() if np.nanmax(y) < cut}
    if not below or len(below) == len(lines):
        return
    floor = min(v for m, v in lows.items() if m not in below)
    pad = 0.06 * (top - floor)
    ax.set_ylim(floor - pad, top + pad)
    note = "; ".join(f"{m}: {np.nanmin(y):.1f}-{np.nanmax(y):.1f}%" for m, y in below.items())
    ax.text(0.02, 0.02, f"below the axis: {note}", transform=ax.transAxes, fontsize=8, va="bottom", alpha=0.8)


#: with more methods than this, a grid's TransCLIP rows are left to the tables (a dashed twin of
#: every line would hide the lines themselves)
MAX_METHODS_WITH_TRANSDUCTIVE = 5


def accuracy_vs_shots(out: Path, summarised, config: dict, series: dict | None = None) -> list[Path]:
    """Write ``OUT/accuracy_vs_shots.png`` and ``.svg``; returns their paths ([] with one K only:
    a line needs two points). ``series``: each table row's label -> (method, policy, TransCLIP
    setting or None, legend name) (:func:`fskd.reports.bench.plot_series`); one colour per method, one row of
    panels per --hp-selection policy, TransCLIP rows dashed (all rows at once) or dotted (batches)
    in their method's colour, or left to the tables when there are many methods."""
    summ, labels_all, datasets, shots = summarised
    if len(shots) < 2:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fskd.reports.summary import OK, average, selections

    series = series or {}
    spec = {m: series.get(m, (m, None, None, m)) for m in labels_all}
    methods = list(dict.fromkeys(v[0] for v in spec.values()))
    policies = list(dict.fromkeys(v[1] for v in spec.values()))
    draw_transductive = len(methods) <= MAX_METHODS_WITH_TRANSDUCTIVE
    left_out = sorted({v[2] for v in spec.values() if v[2]}) if not draw_transductive else []
    b2n = config.get("protocol") == "base-to-new"
    columns = list(datasets) + (
        [("Mean HM over datasets" if b2n else "Average over datasets")] if len(datasets) > 1 else []
    )
    panels = [(c, pol) for pol in policies for c in columns]
    ncols = len(columns) if len(policies) > 1 else min(3, len(panels))  # a row of panels per policy
    nrows = -(-len(panels) // ncols)
    n_legend = len({name for _, _, st, name in spec.values() if draw_transductive or not st})
    per_row = 6 if n_legend > 10 else 5
    legend_rows = -(-n_legend // per_row)
    # one panel still gets a figure wide enough for the title and a legend row of several methods
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(max(4.2 * ncols, 8.4), 3.4 * nrows + 0.4 + 0.25 * legend_rows), squeeze=False
    )
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    markers = "osD^v<>pP*Xh"
    styles = {None: "-", "all": "--"}
    for ax, (panel, pol) in zip(axes.flat, panels, strict=False):
        lines = {}
        for label, (m, p, setting, name) in spec.items():
            if p != pol or (setting and not draw_transductive):
                continue
            i = methods.index(m)
            if panel in datasets:
                cells = [summ.get((label, panel, k)) for k in shots]
            else:
                cells = [average(summ, label, datasets, k) for k in shots]
            ok = [c is not None and c.status == OK for c in cells]
            y = np.array([c.mean if o else np.nan for c, o in zip(cells, ok, strict=True)])
            if np.isnan(y).all():
                continue
            sd = np.array([c.std if o and c.std is not None else 0.0 for c, o in zip(cells, ok, strict=True)])
            ax.plot(
                shots,
                y,
                marker=markers[i % len(markers)],
                color=cmap(i),
                linestyle=styles.get(setting, ":"),
                label=name,
                linewidth=1.6,
                markersize=5,
            )
            if not setting:
                ax.fill_between(shots, y - sd, y + sd, color=cmap(i), alpha=0.15, linewidth=0)  # ± std over seeds
                lines[label] = y
        _fit_y_range(ax, lines)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots)
        ax.set_xticklabels([str(k) for k in shots])
        ax.set_title(panel if pol is None or len(policies) < 2 else f"{panel}: {pol}", fontsize=11)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("HM of base and new (%)" if b2n else "top-1 accuracy (%)")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    seeds = config.get("seeds") or []
    episodic = config.get("protocol") == "episodic"
    what = (
        "Base-to-new harmonic mean"
        if b2n
        else f"{config.get('way', 5)}-way episodic accuracy"
        if episodic
        else "All-way accuracy"
    )
    over = "class splits" if episodic and config.get("class_ratio") else "seeds"
    hs = selections(config)
    val = (
        "validation on val-class episodes"
        if episodic and hs == ["few-shot-val"]
        else "CoOp few-shot validation"
        if hs == ["few-shot-val"]
        else "full validation"
        if hs == ["full-val"]
        else "no validation data"
        if hs == ["none"]
        else f"one row of panels per --hp-selection ({', '.join(hs)})"
    )
    extra = (
        f"; the +TransCLIP rows ({', '.join(left_out)}) are in the tables only"
        if left_out
        else "; dashed: +TransCLIP (all test rows), dotted: in batches"
        if any(v[2] for v in spec.values())
        else ""
    )
    title = (
        f"{what} vs shots (mean ± std over {over} {', '.join(map(str, seeds))}; {val}"
        f"{'; methods with no new-class accuracy are not drawn' if b2n else ''}{extra})"
    )
    title = textwrap.fill(title, width=int(fig.get_figwidth() * 11), break_on_hyphens=False)
    fig.suptitle(title, fontsize=12)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), per_row), frameon=False, fontsize=10)
    fig_h = fig.get_figheight()
    fig.tight_layout(rect=(0, (0.15 + 0.25 * legend_rows) / fig_h, 1, 1 - (0.25 + 0.22 * title.count("\n")) / fig_h))
    paths = [Path(out) / f"{STEM}.png", Path(out) / f"{STEM}.svg"]
    for p in paths:
        tmp = p.with_name(f".{p.name}.tmp")
        fig.savefig(tmp, dpi=130, format=p.suffix[1:])
        tmp.replace(p)
    plt.close(fig)
    return paths


def demo_plot(path: Path, points: list[tuple], encoder: str, episodes: int) -> Path:
    """``fskd demo``'s one figure: accuracy vs shots per (dataset, protocol), each point with its
    95% CI as a band. ``points``: (dataset, protocol, K, accuracy %, ci95)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    series = sorted({(d, p) for d, p, *_ in points}, key=lambda t: (t[1], t[0]))
    for i, (d, p) in enumerate(series):
        pts = sorted((k, a, c) for dd, pp, k, a, c in points if (dd, pp) == (d, p))
        k, a, c = (np.array(v, dtype=float) for v in zip(*pts, strict=True))
        ax.plot(k, a, marker="os"[i % 2], color=f"C{i}", label=f"{d}, {p}", linewidth=1.6)
        ax.fill_between(k, a - c, a + c, color=f"C{i}", alpha=0.15, linewidth=0)
    ks = sorted({k for _, _, k, *_ in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False, fontsize=9)
    ax.set_title(
        textwrap.fill(
            f"fskd demo: SimpleShot prototypes on {encoder} features (bands: 95% CI; "
            f"5-way: {episodes} novel-class episodes; all-way: seeds 1-3)",
            70,
        ),
        fontsize=10,
    )
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=130, format="png")
    tmp.replace(path)
    plt.close(fig)
    return path
