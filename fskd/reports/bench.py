"""The benchmark grid as data: one row per (store, method, shots, seed) cell in
``OUT/results.jsonl``, appended (and fsynced) as each cell finishes, so a rerun skips what is done
and a killed run loses at most the cell in flight; tables and plots are rebuilt from the rows.

```
OUT/
  bench.json      format marker, the grid's config, versions, when it ran (rewritten per run)
  results.jsonl   one JSON row per finished cell (ok, n/a or failed), in finishing order
  table.md        the paper tables: methods x datasets + average (mean ± std over seeds), per K;
                  methods x shots averaged over datasets; paired differences to --baseline
  table.csv       one line per (method, dataset, shots): mean, std, seeds, n/a reasons
  table.tex       the per-K tables as LaTeX (booktabs)
  timing.md       the mean fit seconds of a cell, methods x shots (apart: times vary run to run)
  accuracy_vs_shots.png/.svg   one panel per dataset + the average, one line per method
  states/         the fitted states when --keep-states
```
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fskd.errors import ConfigError, OutputError
from fskd.evaluation.metrics import paired_difference
from fskd.fsutil import atomic_write_text, fault_point
from fskd.protocols import PROTOCOLS, other_store_protocols
from fskd.reports.summary import FAILED, NA, OK, Summary, average, selections, summarise

log = logging.getLogger(__name__)

BENCH_FORMAT = "fskd-bench"
BENCH_JSON = "bench.json"
RESULTS = "results.jsonl"
#: grid protocols whose cells score a state fitted on the first store on the other stores
TRANSFER_PROTOCOLS = other_store_protocols()
SOURCE_TAG = " (source)"


@dataclass(frozen=True)
class Cell:
    """One (store, method, shots, seed) cell; ``key`` identifies it across runs (the store by its
    fingerprint, the method by its options too, so a changed option refits that method's cells)."""

    store: str
    store_fingerprint: str
    dataset: str
    method: str
    shots: int
    seed: int
    protocol: str
    hp_selection: str
    options: str  # JSON of the method's options (sorted keys)
    source_fingerprint: str = ""  # cross-dataset / domain-shift: the store every cell's state is fitted on
    setting: str = ""  # episodic: JSON of way, query, episodes, episode seed and class ratio
    fit_method: str = ""  # a variant row (LABEL=METHOD): the registered method fitted under the label ``method``
    stages: str = ""  # a chain row: its stages, "mtkd(base-novel) -> syntrans" (fskd.bench.chains)
    transductive: str = ""  # JSON list of the TransCLIP settings also scored ("all", "B:C"; --transductive)

    @property
    def key(self) -> str:
        parts = [
            self.store_fingerprint,
            self.method,
            self.shots,
            self.seed,
            self.protocol,
            self.hp_selection,
            self.options,
        ]
        return json.dumps(
            parts
            + ([self.source_fingerprint] if self.source_fingerprint else [])
            + ([self.setting] if self.setting else [])
            + ([{"variant_of": self.fit_method}] if self.fit_method else [])
            + ([{"stages": self.stages}] if self.stages else [])
            + ([{"transductive": self.transductive}] if self.transductive else [])
        )

    def label(self) -> str:
        return f"{self.dataset} {self.method} {self.shots}-shot seed {self.seed}"


def is_bench_dir(path: Path) -> bool:
    meta = Path(path) / BENCH_JSON
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("format") == BENCH_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _whole_row(tail: bytes) -> bool:
    """True when ``tail`` (the bytes after the last newline) is a complete JSON row of a cell."""
    try:
        row = json.loads(tail.decode("utf-8"))
    except ValueError:
        return False
    return isinstance(row, dict) and "key" in row and "status" in row


class Results:
    """``OUT/results.jsonl``: read once, appended one whole line per finished cell."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / RESULTS
        self.rows: list[dict] = []
        self._cut: int | None = None  # length to truncate to before the next append (a cut last line)
        self._newline = False  # the last row lacks its newline: the next append writes it first
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            if _whole_row(data[end:]):  # a finished row whose newline was lost (an editor): keep it
                self._newline = True
                end = len(data)
            else:  # a line cut by a kill: ours, and never a finished cell; left to the next append
                log.warning(
                    "%s: ignoring an unfinished last line (%d bytes) left by an interrupted run",
                    self.path,
                    len(data) - end,
                )
                self._cut = end
        for i, line in enumerate(data[:end].decode("utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise OutputError(
                    f"{self.path}: line {i + 1} is not JSON ({e}); the results file was edited. Fix or remove that line"
                ) from None
            self.rows.append(row)

    def done(self) -> dict[str, dict]:
        """Finished cells by key: the last row of each key wins; failed cells are not finished."""
        out = {}
        for r in self.rows:
            if r.get("status") in (OK, NA):
                out[r["key"]] = r
            else:
                out.pop(r.get("key"), None)
        return out

    def append(self, row: dict) -> None:
        line = (json.dumps(row, sort_keys=True) + "\n").encode("utf-8")
        if self._cut is not None:  # drop the cut line only now, when a run (not --report) writes
            with open(self.path, "r+b") as f:
                f.truncate(self._cut)
                os.fsync(f.fileno())
            self._cut = None
        if self._newline:
            line, self._newline = b"\n" + line, False
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.rows.append(row)


def cell_row(cell: Cell, result: dict) -> dict:
    """A cell's row in ``results.jsonl``: what identifies the cell, then its result."""
    return {
        "key": cell.key,
        "store": cell.store,
        "store_fingerprint": cell.store_fingerprint,
        "dataset": cell.dataset,
        "method": cell.method,
        "shots": cell.shots,
        "seed": cell.seed,
        "protocol": cell.protocol,
        "hp_selection": cell.hp_selection,
        "options": json.loads(cell.options),
        **({"variant_of": cell.fit_method} if cell.fit_method else {}),
        **({"stages": cell.stages} if cell.stages else {}),
        **result,
    }


def run_grid(
    cells: list[Cell],
    results: Results,
    run_cell: Callable[[Cell], dict],
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, int]:
    """Run every cell not finished in ``results``; append each row as it finishes. Returns counts
    of done-before / ok / n/a / failed."""
    done = results.done()
    todo = [c for c in cells if c.key not in done]
    counts = {"skipped": len(cells) - len(todo), OK: 0, NA: 0, FAILED: 0}
    if progress:
        progress(0, len(todo), "")
    for i, cell in enumerate(todo):
        if progress:
            progress(i, len(todo), cell.label())
        t0 = time.perf_counter()
        row = cell_row(cell, run_cell(cell))
        seconds = time.perf_counter() - t0
        results.append(row)
        fault_point(f"bench:cell-{i + 1}")  # tests kill a grid after its i-th new cell
        counts[row["status"]] += 1
        if row["status"] == FAILED:
            log.warning("bench cell %s failed: %s", cell.label(), row.get("message"))
        elif row["status"] == NA:  # why a cell is empty in the table, said where the user looks
            log.warning("bench cell %s is n/a: %s", cell.label(), row.get("message"))
        if progress:
            result = f"{row['accuracy']:.2f}%" if row["status"] == OK else row["status"]
            progress(i + 1, len(todo), f"{cell.label()}: {result} in {seconds:.1f} s")
    return counts


# -- tables ------------------------------------------------------------------------------------
def _grid_rows(rows: Iterable[dict], keys: Sequence[str] | set[str] | None) -> list[dict]:
    """The last row of each cell of ``keys``; in the order of ``keys`` when it is a sequence (the
    grid's cell order, so tables list methods as the grid does, not in the order cells ran)."""
    last: dict[str, dict] = {}
    for r in rows:
        if keys is None or r["key"] in keys:
            last[r["key"]] = r
    if keys is None or isinstance(keys, (set, frozenset)):
        out = list(last.values())
    else:
        out = [last[k] for k in dict.fromkeys(keys) if k in last]
    return by_selection(with_transductive(out))


def transductive_label(method: str, setting: str) -> str:
    """A TransCLIP row's name: ``tip-adapter +TransCLIP`` (all test rows at once) or
    ``tip-adapter +TransCLIP[64:4]`` (batches of 64 test rows from 4 classes)."""
    return f"{method} +TransCLIP" if setting == "all" else f"{method} +TransCLIP[{setting}]"


def with_transductive(rows: list[dict]) -> list[dict]:
    """Each row followed by a row per TransCLIP setting its cell also scored (bench --transductive):
    the same fit, its test rows classified jointly; a table row and a curve of their own. "all"
    first, then the batch settings in the row's order (a results.jsonl rewritten with sorted keys
    gives the same table)."""
    out = []
    for r in rows:
        out.append(r)
        for setting, m in sorted((r.get("transductive") or {}).items(), key=lambda sm: sm[0] != "all"):
            out.append(
                {
                    **{k: v for k, v in r.items() if k not in ("transductive", "ece", "nll")},
                    **m,
                    "key": f"{r['key']}#transductive={setting}",
                    "method": transductive_label(r["method"], setting),
                    "transductive_of": r["method"],
                    "transductive_setting": setting,
                }
            )
    return out


def by_selection(rows: list[dict]) -> list[dict]:
    """Rows of a grid that sweeps --hp-selection, each method named with its policy
    (``gda [none]``): one table row and one curve per method and policy."""
    hs = {r.get("hp_selection", "few-shot-val") for r in rows}
    if len(hs) < 2:
        return rows
    return [
        {**r, "method": f"{r['method']} [{r.get('hp_selection', 'few-shot-val')}]", "method_of_policy": r["method"]}
        for r in rows
    ]


def plot_series(rows: list[dict]) -> dict[str, tuple[str, str, str | None, str]]:
    """Each table row's label -> (the method it draws, its --hp-selection policy, its TransCLIP
    setting or None, its legend name: the label without the policy): the plot draws one colour
    per method, one panel row per policy, and a TransCLIP row dashed in its method's colour."""
    out = {}
    for r in rows:
        name = r.get("method_of_policy", r["method"])
        setting = r.get("transductive_setting")
        method = r["transductive_of"] if setting else name
        out[r["method"]] = (method, r.get("hp_selection", "few-shot-val"), setting, name)
    return out


def _md(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _shots_title(k: int, level: str = "##") -> str:
    return f"{level} {k} shot{'s' if k > 1 else ''}\n"


def _tex_table(k: int, header: list[str], body: list[list[str]]) -> list[str]:
    """One booktabs tabular: a header row and body rows of text cells (the first is the method)."""
    out = [
        f"% {k} shots",
        "\\begin{tabular}{l" + "c" * (len(header) - 1) + "}",
        "\\toprule",
        " & ".join(_tex(h) for h in header) + " \\\\",
        "\\midrule",
    ]
    out += [" & ".join([_tex(r[0])] + [c.replace("±", "$\\pm$") for c in r[1:]]) + " \\\\" for r in body]
    return out + ["\\bottomrule", "\\end{tabular}", ""]


def _csv_cells(c: Summary) -> list:
    """mean, std, n_seeds, per_seed, status, message of one table entry, for table.csv."""
    return [
        "" if c.mean is None else f"{c.mean:.3f}",
        "" if c.std is None else f"{c.std:.3f}",
        len(c.per_seed),
        json.dumps({str(s): round(v, 3) for s, v in c.per_seed.items()}),
        c.status,
        c.message,
    ]


def _paired_section(
    summ: dict, methods: list[str], datasets: list[str], shots: list[int], baseline: str, title: str, intro: str
) -> list[str]:
    """Per K, every method's paired difference to ``baseline`` per dataset (see :func:`_diff`)."""
    md = [f"## {title}\n", intro]
    for k in shots:
        body = [[m] + [_diff(summ, m, baseline, d, k) for d in datasets] for m in methods if m != baseline]
        md += [_shots_title(k, "###"), _md(["method"] + datasets, body), ""]
    return md


def _notes(notes: list[tuple[str, str, str]]) -> list[str]:
    if not notes:
        return []
    return ["## Not applicable or failed\n"] + [f"- {m} on {d}: {msg}" for m, d, msg in notes] + [""]


def primary_metric(config: dict) -> str:
    return "hm" if config.get("protocol") == "base-to-new" else "accuracy"


def build_tables(rows: list[dict], config: dict, baseline: str | None) -> dict[str, str]:
    """``table.md``, ``table.csv`` and ``table.tex`` contents from the result rows."""
    if config.get("protocol") == "base-to-new":
        return build_b2n_tables(rows, config, baseline)
    summ, methods, datasets, shots = summarise(rows)
    transfer = config.get("protocol") in TRANSFER_PROTOCOLS
    avg_over = [d for d in datasets if not d.endswith(SOURCE_TAG)] if transfer else datasets
    avg_label = "Average (targets)" if transfer else "Average"
    cols = datasets + ([avg_label] if len(avg_over) > 1 else [])

    def row_cells(m: str, k: int) -> list[Summary]:
        cells = [summ.get((m, d, k), Summary(None, None, {}, NA, "not run")) for d in datasets]
        return cells + ([average(summ, m, avg_over, k)] if len(avg_over) > 1 else [])

    seeds = sorted({r["seed"] for r in rows})
    md = [
        f"# fskd bench: {config.get('protocol', 'allway')}\n",
        protocol_text(config, seeds) + _student_text(rows, config),
        "",
    ]
    tex = ["% fskd bench: " + protocol_text(config, seeds).replace("%", "\\%")]
    for k in shots:
        body = [[m] + [c.text() for c in row_cells(m, k)] for m in methods]
        md += [_shots_title(k), _md(["method"] + cols, body), ""]
        tex += _tex_table(k, ["Method"] + cols, body)
    if len(shots) > 1:
        label = "average over datasets" if len(datasets) > 1 else datasets[0]
        md += [
            f"## Accuracy vs shots ({label})\n",
            _md(
                ["method"] + [f"{k}-shot" for k in shots],
                [[m] + [row_cells(m, k)[-1].text() for k in shots] for m in methods],
            ),
            "",
        ]
    md += _calibration_section(rows, config, methods, avg_over, shots)
    if baseline:
        md += _paired_section(
            summ,
            methods,
            datasets,
            shots,
            baseline,
            f"Paired difference to {baseline}",
            (
                f"Mean over class splits of (method - {baseline}) on the same split's episodes, in points, "
                f"with its 95% CI (Student t over the splits); * where the interval excludes 0.\n"
                if config.get("protocol") == "episodic" and config.get("class_ratio")
                else f"Mean over seeds of (method - {baseline}) on the same seeds' shots, in points, with its "
                f"95% CI (Student t over the seeds); * where the interval excludes 0.\n"
            ),
        )
    md += _notes(_failed_cells(rows))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "dataset", "shots", "mean", "std", "n_seeds", "per_seed", "status", "message"])
    for m in methods:
        for k in shots:
            for d, c in zip(cols, row_cells(m, k), strict=True):
                w.writerow([m, d, k, *_csv_cells(c)])
    out = {"table.md": "\n".join(md).rstrip() + "\n", "table.csv": buf.getvalue(), "table.tex": "\n".join(tex)}
    timing = _fit_seconds_section(rows, methods, shots)
    if timing:  # apart from the tables: times differ run to run, the tables do not
        out["timing.md"] = (
            "\n".join([f"# fskd bench: fit times ({config.get('protocol', 'allway')})\n"] + timing).rstrip() + "\n"
        )
    return out


def _calibration_section(
    rows: list[dict], config: dict, methods: list[str], datasets: list[str], shots: list[int]
) -> list[str]:
    """All-way grids whose every finished head row has an ECE and NLL (the ``+TransCLIP`` rows, joint
    assignments rather than a softmax, have none and are left out): methods x shots, a table per dataset."""
    own = [r for r in rows if not r.get("transductive_setting")]
    ok = [r for r in own if r["status"] == OK]
    if config.get("protocol", "allway") != "allway" or not ok or any(r.get("ece") is None for r in ok):
        return []
    heads = [m for m in methods if any(r["method"] == m for r in own)]
    md = []
    for key, title, text in (
        (
            "ece",
            "Calibration: expected calibration error (%",
            "ECE over 15 equal-width bins (b/15, (b+1)/15] of the top-1 softmax probability of each head's logits "
            "as they are (lower is better; a cosine head's unscaled scores give near-uniform probabilities, so a "
            "large ECE), mean ± std over seeds. `+TransCLIP` rows have none (joint assignments, not a softmax).\n",
        ),
        (
            "nll",
            "Calibration: negative log-likelihood (nats per test row",
            "Mean -log softmax probability of the true class, mean ± std over seeds (lower is better).\n",
        ),
    ):
        if any(r.get(key) is None for r in ok):
            continue
        summ, *_ = summarise(own, key)
        for d in datasets:  # one table per dataset: a dataset without some K (Omniglot: no 16) blanks no other
            md += [
                f"## {title}, {d})\n",
                text,
                _md(
                    ["method"] + [f"{k}-shot" for k in shots],
                    [
                        [m] + [summ.get((m, d, k), Summary(None, None, {}, NA, "not run")).text() for k in shots]
                        for m in heads
                    ],
                ),
                "",
            ]
    return md


def _fit_seconds_section(rows: list[dict], methods: list[str], shots: list[int]) -> list[str]:
    """Methods x shots: the mean fit time of a cell (over datasets and seeds), where rows have one;
    a TransCLIP row (the same fit, scored jointly) shows the seconds of its joint inference instead."""

    def seconds(r: dict) -> object:
        return r.get("eval_seconds") if r.get("transductive_setting") else r.get("fit_seconds")

    ok = [r for r in rows if r["status"] == OK and isinstance(seconds(r), (int, float))]
    if not ok:
        return []
    cell = {}
    for m in methods:
        for k in shots:
            t = [seconds(r) for r in ok if r["method"] == m and r["shots"] == k]
            cell[m, k] = f"{np.mean(t):.2f}" if t else "n/a"
    transductive = any(r.get("transductive_setting") for r in ok)
    return [
        "## Fit seconds (mean over datasets and seeds)\n",
        "Wall seconds of one fit, hyper-parameter search included (the machine of the run; compare rows of "
        "one table only)."
        + (
            " A `+TransCLIP` row shows the seconds of its joint inference over the test rows instead (its fit "
            "is the row above it)."
            if transductive
            else ""
        )
        + "\n",
        _md(["method"] + [f"{k}-shot" for k in shots], [[m] + [cell[m, k] for k in shots] for m in methods]),
        "",
    ]


def build_b2n_tables(rows: list[dict], config: dict, baseline: str | None) -> dict[str, str]:
    """Base-to-new: per K, base / new / HM per dataset and their average (HM of the average base
    and new accuracy, as CoCoOp's tables), mean ± std over seeds."""
    from fskd.protocols.base_to_new import harmonic_mean

    parts = {}
    for p in ("base", "new", "hm"):
        parts[p], methods, datasets, shots = summarise(rows, p)
    seeds = sorted({r["seed"] for r in rows})
    avg = len(datasets) > 1
    md = ["# fskd bench: base-to-new\n", protocol_text(config, seeds), ""]
    tex = ["% fskd bench: " + protocol_text(config, seeds).replace("%", "\\%")]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "dataset", "shots", "part", "mean", "std", "n_seeds", "per_seed", "status", "message"])
    for k in shots:
        header = ["method"] + [f"{d} {p}" for d in datasets for p in ("base", "new", "HM")]
        header += ["Average base", "Average new", "Average HM"] if avg else []
        body = []
        for m in methods:
            row = [m]
            for d in datasets:
                for p in ("base", "new", "hm"):
                    c = parts[p].get((m, d, k), Summary(None, None, {}, NA, "not run"))
                    row.append(c.text())
                    w.writerow([m, d, k, p, *_csv_cells(c)])
            if avg:
                ab, an = (average(parts[p], m, datasets, k) for p in ("base", "new"))
                row += [
                    ab.text(),
                    an.text(),
                    f"{harmonic_mean(ab.mean, an.mean):.2f}" if ab.status == OK and an.status == OK else "n/a",
                ]
            body.append(row)
        md += [_shots_title(k), _md(header, body), ""]
        tex += _tex_table(k, header, body)
    if baseline:
        md += _paired_section(
            parts["hm"],
            methods,
            datasets,
            shots,
            baseline,
            f"Paired difference of HM to {baseline}",
            f"Mean over seeds of (method - {baseline}) harmonic mean, with its 95% CI (Student t over the seeds).\n",
        )
    notes = _failed_cells(rows)
    notes += sorted(
        {
            (m, d, "cannot classify classes it has no shot of: base only")
            for (m, d, k), c in parts["new"].items()
            if c.status == NA and not c.per_seed and "cannot classify" in c.message
        }
    )
    md += _notes(notes)
    return {"table.md": "\n".join(md).rstrip() + "\n", "table.csv": buf.getvalue(), "table.tex": "\n".join(tex)}


def _student_text(rows: list[dict], config: dict) -> str:
    """What a distill row scores (rows with ``extract_seconds`` distilled a student) and what a chain
    row runs (rows with ``stages``), else ''."""
    students = sorted({r["method"] for r in rows if "extract_seconds" in r and not r.get("stages")})
    chains = {r["method"]: r["stages"] for r in rows if r.get("stages")}
    if not students and not chains:
        return ""
    regime = (
        "base-novel: trained on the base classes' images and labels, distilling the store's encoder"
        if config.get("protocol") == "episodic"
        else "semi: K labelled shots per class of seed s plus the rest of the train split unlabelled, distilling the "
        "store's encoder"
    )
    text = (
        f" Distill rows ({', '.join(students)}): each cell distils one student (regime {regime}; seed s), encodes "
        f"the store's images with it (`fskd extract --encoder student:DIR`) and scores the same protocol on the "
        f"student's features."
        if students
        else ""
    )
    if chains:
        text += (
            f" Chain rows ({'; '.join(f'{m} = {s}' for m, s in chains.items())}): each cell runs the stages in "
            f"turn with its K and seed: a teacher stage is fitted on the store and is the student's teacher "
            f"(`--teacher-state`); the student is distilled (regime {regime}; seed s) and encodes the store's "
            f"images; a head stage (after the student) is fitted on the student's features (`fskd adapt` on the "
            f"student's store) with the cell's K shots; the last stage's state scores the same protocol on the "
            f"student's features."
        )
    return text + " The other rows score the store's own (teacher) features."


def _failed_cells(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(method, dataset, message) of every cell that is n/a or failed, sorted."""
    return sorted({(r["method"], r["dataset"], r.get("message", "")) for r in rows if r["status"] != OK})


def _diff(summ, m: str, base: str, d: str, k: int) -> str:
    a, b = summ.get((m, d, k)), summ.get((base, d, k))
    if a is None or b is None or a.status != OK or b.status != OK:
        return "n/a"
    seeds = sorted(set(a.per_seed) & set(b.per_seed))
    r = paired_difference([a.per_seed[s] / 100 for s in seeds], [b.per_seed[s] / 100 for s in seeds], "seeds")
    if r["ci95"] is None:
        return f"{r['difference']:+.2f} (one seed)"
    return f"{r['difference']:+.2f} ± {r['ci95']:.2f}{' *' if r['excludes_zero'] else ''}"


def _tex(s: str) -> str:
    return "".join("\\" + c if c in "&%$#_{}" else c for c in s)


#: how each --hp-selection policy chooses hyper-parameters, in a table's protocol sentence
SELECTION_TEXT = {
    "few-shot-val": "hyper-parameters chosen on min(K, 4) val-split images per class (CoOp's few-shot validation)",
    "full-val": "hyper-parameters chosen on the full val split",
    "none": "no validation data (each method's fixed values)",
}


def selection_text(config: dict) -> str:
    hs = selections(config)
    if len(hs) == 1:
        return SELECTION_TEXT.get(hs[0], hs[0])
    return "hyper-parameters chosen by the policy in brackets after the method (--hp-selection): " + "; ".join(
        f"{h}: {SELECTION_TEXT[h]}" for h in hs
    )


def protocol_text(config: dict, seeds: list[int]) -> str:
    """The sentence under a bench table: its protocol's own (:meth:`fskd.protocols.base.Protocol.bench_text`);
    a bench folder that names no protocol (an earlier build) is all-way."""
    name = config.get("protocol")
    text = PROTOCOLS.get(name if name in PROTOCOLS else "allway")().bench_text(config, seeds, selection_text(config))
    settings = config.get("transductive") or []
    if settings:
        text += (
            " Rows `METHOD +TransCLIP` score the same fitted state with its test rows classified jointly "
            "(TransCLIP, Zanella et al. 2024, on top of the state's logits; `fskd eval --transductive`): "
            + "; ".join(
                "all test rows at once"
                if t == "all"
                else f"`[{t}]`: in batches of {t.split(':')[0]} test rows drawn from {t.split(':')[1]} random "
                f"classes, until every test row is scored (`--batch {t.split(':')[0]} --active-classes {t.split(':')[1]}`)"
                for t in settings
            )
            + ". Their accuracy is of the joint assignments (no ECE: not the head's softmax); their shot "
            "weight is chosen on the val rows of the cell's --hp-selection policy (`none`, or no shots: "
            "the last of its schedule; each row's `shot_weight` in results.jsonl)."
        )
    return text


#: what the tables read of every row of results.jsonl: field -> type
ROW_FIELDS = {"key": str, "status": str, "dataset": str, "method": str, "shots": int, "seed": int}
#: metrics of a row: a number or null where present
ROW_METRICS = ("accuracy", "top5", "mean_per_class", "base", "new", "hm", "ci95_episodes")


def _row_problem(row) -> str | None:
    """What is wrong with one row of results.jsonl (a JSON value), or None."""
    import math

    if not isinstance(row, dict):
        return f"is a JSON {type(row).__name__}, not an object"
    for name, typ in ROW_FIELDS.items():
        v = row.get(name)
        if name not in row:
            return f"lacks {name!r}"
        if not isinstance(v, typ) or isinstance(v, bool):
            return f"has {name} {v!r:.60} ({'an integer' if typ is int else 'a string'} expected)"
    if row["status"] not in (OK, NA, FAILED):
        return f"has status {row['status']!r:.60} (ok, n/a or failed expected)"
    if not isinstance(row.get("message", ""), str):
        return f"has message {row['message']!r:.60} (a string expected)"
    for name in ROW_METRICS:
        v = row.get(name)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
            return f"has {name} {v!r:.60} (a finite number or null expected)"
    tr = row.get("transductive")
    if tr is not None:
        if not isinstance(tr, dict) or not all(isinstance(m, dict) for m in tr.values()):
            return f"has transductive {tr!r:.60} (an object of TransCLIP settings, each an object expected)"
        for setting, m in tr.items():
            why = _row_problem({**{k: row[k] for k in ROW_FIELDS}, **{k: m.get(k) for k in ROW_METRICS}})
            if why:
                return f"has transductive[{setting!r}] that {why}"
    return None


def check_rows(rows: list, path: Path) -> None:
    """Refuse a results file whose rows parse as JSON but are not cells' rows (a key missing, a value
    of the wrong type: edited, or written by something else), naming the first such row, so that
    neither a run nor ``--report`` ends in a traceback."""
    for i, row in enumerate(rows, 1):
        why = _row_problem(row)
        if why:
            raise OutputError(
                f"{path}: row {i} {why}; the results file was edited or damaged. Fix or remove that "
                f"row (each row is one line)"
            )


def check_meta(meta, path: Path) -> tuple[dict, list[str]]:
    """(config, cell keys) of a bench.json, or an OutputError saying what it lacks."""
    from fskd.config import BenchConfig

    config = meta.get("config") if isinstance(meta, dict) else None
    cells = meta.get("cells") if isinstance(meta, dict) else None
    if not isinstance(config, dict) or not isinstance(cells, list) or not all(isinstance(c, str) for c in cells):
        raise OutputError(
            f"{path} lacks its grid ('config' an object, 'cells' a list of strings); it was edited "
            f"or damaged. Run the grid again into a new --out"
        )
    try:  # the keys this fskd knows, with their types and ranges (an older bench may lack or have others)
        BenchConfig.from_dict({k: v for k, v in config.items() if k in BenchConfig.__dataclass_fields__})
    except ConfigError as e:
        raise OutputError(f"{path}: its grid config is not valid ({e}); it was edited or damaged") from None
    return config, cells


def write_outputs(
    out: Path, rows: list[dict], config: dict, keys: Sequence[str] | set[str] | None = None
) -> list[Path]:
    """Rebuild tables and plots from ``rows`` (those of ``keys`` when given). Returns the paths."""
    rows = _grid_rows(rows, keys)
    if not rows:
        raise ConfigError(f"{out / RESULTS} has no finished cells to report")
    paths = []
    baseline = config.get("baseline")
    if baseline and len(selections(config)) > 1:  # the baseline under the grid's first policy
        baseline = f"{baseline} [{selections(config)[0]}]"
    for name, text in build_tables(rows, config, baseline).items():
        atomic_write_text(out / name, text)
        paths.append(out / name)
    from fskd.reports.plots import accuracy_vs_shots

    paths += accuracy_vs_shots(out, summarise(rows, primary_metric(config)), config, plot_series(rows))
    _record_outputs(out, paths)
    return paths


def _record_outputs(out: Path, paths: list[Path]) -> None:
    """Name this report's files in ``bench.json`` and delete the ones an earlier report of this
    folder wrote and this one did not (a plot of a grid that had more shot counts): tables and plots
    always come from one run. Only files ``bench.json`` names are deleted."""
    meta_path = out / BENCH_JSON
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    names = sorted(p.name for p in paths)
    for old in meta.get("outputs", []) if isinstance(meta.get("outputs"), list) else []:
        if isinstance(old, str) and Path(old).name == old and old not in names and old not in (BENCH_JSON, RESULTS):
            (out / old).unlink(missing_ok=True)
    meta["outputs"] = names
    atomic_write_text(meta_path, json.dumps(meta, indent=2))
