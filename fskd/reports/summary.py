"""A bench's rows summarised per (method, dataset, shots): mean and std over seeds, the average over
datasets, the grid's selection policies. Read by the tables (:mod:`fskd.reports.bench`) and the
plots (:mod:`fskd.reports.plots`), so neither imports the other for them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fskd.evaluation.metrics import seed_summary

#: a cell's status in results.jsonl
OK, NA, FAILED = "ok", "n/a", "failed"


@dataclass
class Summary:
    """Mean and std over seeds of one (method, dataset, shots), with the per-seed values."""

    mean: float | None
    std: float | None
    per_seed: dict[int, float]
    status: str
    message: str = ""

    def text(self, digits: int = 2) -> str:
        if self.status != OK:
            return "n/a" if self.status == NA else "failed"
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def summarise(
    rows: list[dict], metric: str = "accuracy"
) -> tuple[dict[tuple[str, str, int], Summary], list[str], list[str], list[int]]:
    """(method, dataset, shots) -> Summary of ``metric`` (accuracy; base, new or hm for
    base-to-new), with methods, datasets and shots in grid order."""
    methods, datasets, shots = [], [], []
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for r in rows:
        for lst, v in ((methods, r["method"]), (datasets, r["dataset"]), (shots, r["shots"])):
            if v not in lst:
                lst.append(v)
        groups.setdefault((r["method"], r["dataset"], r["shots"]), []).append(r)
    out = {}
    for k, rs in groups.items():
        ok = {r["seed"]: r.get(metric) for r in rs if r["status"] == OK}
        bad = [r for r in rs if r["status"] != OK]
        if bad:  # one n/a or failed seed makes the cell n/a: a mean over other seeds is another number
            out[k] = Summary(None, None, ok, bad[0]["status"], bad[0].get("message", ""))
            continue
        if any(v is None for v in ok.values()):
            out[k] = Summary(None, None, {}, NA, f"{k[0]} cannot classify classes it has no shot of")
            continue
        s = seed_summary(np.asarray([ok[seed] for seed in sorted(ok)]) / 100)
        out[k] = Summary(s.mean, s.std, ok, OK)
    return out, methods, datasets, sorted(shots)


def average(summ: dict, method: str, datasets: list[str], k: int) -> Summary:
    """Mean over datasets of the per-dataset means (std: of the per-seed averages over datasets)."""
    cells = [summ.get((method, d, k)) for d in datasets]
    if not cells or any(c is None or c.status != OK for c in cells):
        return Summary(None, None, {}, NA, "not every dataset has a result")
    seeds = set.intersection(*(set(c.per_seed) for c in cells))
    per_seed = {s: float(np.mean([c.per_seed[s] for c in cells])) for s in sorted(seeds)}
    st = seed_summary(np.asarray(list(per_seed.values())) / 100)
    return Summary(float(np.mean([c.mean for c in cells])), st.std, per_seed, OK)


def selections(config: dict) -> list[str]:
    """The grid's --hp-selection policies (a bench folder of an earlier build: CoOp's few-shot rule)."""
    h = config.get("hp_selection") or ["few-shot-val"]
    return [h] if isinstance(h, str) else list(h)
