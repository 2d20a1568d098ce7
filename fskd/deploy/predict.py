"""``fskd predict``: a fitted state's all-way head on new images, or on a store split's features.

Streams: paths are read a window at a time, encoded in batches (extract's loader and forward),
scored, and their rows written before the next window is read, so memory does not grow with the
number of images. The output (CSV, JSON Lines, or Parquet with the ``parquet`` extra) is built
under a hidden temporary name beside ``--out`` and renamed when complete; beside it
``OUT.fskd.json`` records what wrote it (config, state, store, counts, the unreadable files
skipped, the SHA-256 of the output and of the confusion matrix), which is also how a later
``--force`` knows the files are fskd's to replace. With ``--skip-bad`` an unreadable image is a row
of its own: its path, no prediction, and the reason in the ``error`` column. With ``--split`` a
row-normalised confusion matrix is drawn to ``OUT.confusion.png``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from fskd import __version__
from fskd.config import PredictConfig
from fskd.deploy.classifier import QUERY_BATCH, Classifier, error_row, prediction_rows
from fskd.deploy.output import building, guard_output_file
from fskd.errors import ConfigError, EvaluationError, Interrupted, OutputError
from fskd.fsutil import atomic_write_bytes, atomic_write_text, fault_point, sha256_file

log = logging.getLogger(__name__)

#: progress(stage, images_done, images_total, images_per_second), as extract's
Progress = Callable[[str, int, int, float], None]
FORMAT = "fskd-predictions"
MANIFEST_SUFFIX = ".fskd.json"
CONFUSION_SUFFIX = ".confusion.png"
#: rows per Parquet row group (what a Parquet output holds in memory before writing it)
PARQUET_ROW_GROUP = 16_384
#: paths encoded per DataLoader (a window): bounded memory (16,384 paths at the default batch of
#: 64, a few MB), whatever the number of images; each window starts the loader's workers again
WINDOW_BATCHES = 256
#: unreadable files named in the manifest (the count is always exact)
MAX_SKIPPED_LISTED = 10_000


@dataclass
class PredictResult:
    out: str
    manifest: str
    format: str
    count: int  # rows written
    skipped: int  # unreadable images left out (--skip-bad)
    seconds: float
    images_per_s: float
    source: str
    accuracy: float | None = None  # percent, top-1, when predicting a store split (it has labels)
    confusion: str | None = None  # the confusion-matrix PNG (--split)
    skipped_files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + MANIFEST_SUFFIX)


def confusion_path(out: Path) -> Path:
    return out.with_name(out.name + CONFUSION_SUFFIX)


def is_prediction_file(path: Path) -> bool:
    """True when ``path`` is a predictions file fskd wrote and nobody changed since: its manifest
    names it and its SHA-256 matches."""
    try:
        meta = json.loads(manifest_path(path).read_text(encoding="utf-8"))
        return (
            isinstance(meta, dict)
            and meta.get("format") == FORMAT
            and meta.get("output") == path.name
            and meta.get("bytes") == path.stat().st_size
            and meta.get("sha256") == sha256_file(path)
        )
    except (OSError, ValueError):
        return False


class _Writer:
    """CSV (a header, then one line per row) or JSON Lines, hashed as written."""

    def __init__(self, f, fmt: str, columns: list[str]) -> None:
        self.f, self.fmt, self.columns, self.sha, self.rows = f, fmt, columns, hashlib.sha256(), 0
        if fmt == "csv":
            self._emit(self._csv_line(columns))

    def _emit(self, text: str) -> None:
        data = text.encode("utf-8")
        self.sha.update(data)
        self.f.write(data)

    @staticmethod
    def _csv_line(values) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(values)
        return buf.getvalue()

    def write(self, rows: list[dict]) -> None:
        if self.fmt == "csv":
            self._emit("".join(self._csv_line([_fmt(r[c]) for c in self.columns]) for r in rows))
        else:
            self._emit(
                "".join(json.dumps({c: _round(r[c]) for c in self.columns}, ensure_ascii=False) + "\n" for r in rows)
            )
        self.rows += len(rows)

    def close(self, path: Path) -> str:
        """Flush; the SHA-256 of what was written to ``path``."""
        self.f.flush()
        return self.sha.hexdigest()


class _ParquetWriter:
    """Parquet: the same columns, typed (names string, probabilities float32, nulls where a row has
    none), written a row group at a time so memory stays bounded."""

    def __init__(self, f, columns: list[str]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa, self.f, self.columns, self.rows, self.pending = pa, f, columns, 0, []
        self.schema = pa.schema([(c, pa.float32() if c.endswith("probability") else pa.string()) for c in columns])
        self.writer = pq.ParquetWriter(f, self.schema, compression="zstd")

    def write(self, rows: list[dict]) -> None:
        self.pending += rows
        self.rows += len(rows)
        if len(self.pending) >= PARQUET_ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            data = {c: [r[c] for r in self.pending] for c in self.columns}
            self.writer.write_table(self.pa.Table.from_pydict(data, schema=self.schema))
            self.pending = []

    def close(self, path: Path) -> str:
        self._flush()
        self.writer.close()  # the footer, through our file object (still open): flushed before it is hashed
        if not self.f.closed:
            self.f.flush()
        return sha256_file(path)


def _parquet_module() -> None:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--out *.parquet needs the package pyarrow, which is not installed: pip install "
            "'fskd[parquet]' (or write .csv or .jsonl)"
        ) from None


def _round(v):
    return round(v, 6) if isinstance(v, float) else v


def _fmt(v) -> str:
    return f"{v:.6f}" if isinstance(v, float) else ("" if v is None else str(v))


def columns(top_k: int, n_classes: int, labelled: bool, errors: bool = False) -> list[str]:
    """The output's columns; ``errors`` (--skip-bad on images): a last column ``error``."""
    k = max(1, min(top_k, n_classes))
    return (
        ["path"]
        + (["label"] if labelled else [])
        + ["prediction", "probability"]
        + [c for i in range(1, k + 1) for c in (f"top{i}", f"top{i}_probability")]
        + (["error"] if errors else [])
    )


def _windows(paths: Iterator[str], size: int) -> Iterator[list[str]]:
    while True:
        w = list(itertools.islice(paths, size))
        if not w:
            return
        yield w


def predict(
    cfg: PredictConfig, progress: Progress | None = None, classifier: Classifier | None = None
) -> PredictResult:
    """Run ``fskd predict`` (see the module docstring). ``classifier``: an already loaded one."""
    from fskd.deploy.sources import csv_paths, image_paths

    t0 = time.perf_counter()
    out = guard_output_file(
        cfg.out,
        "--out",
        is_prediction_file,
        cfg.force,
        "fskd predict's output",
        protect=(("--state", cfg.state), ("--store", cfg.store)),
    )
    man = manifest_path(out)
    if (man.exists() or man.is_symlink()) and not (man.is_file() and _manifest_is_ours(man)):
        raise OutputError(
            f"{man} exists and is not fskd's manifest of predictions; fskd will not replace it (nothing was changed)"
        )
    labelled = cfg.split is not None
    png = confusion_path(out) if labelled else None
    if png is not None and (png.exists() or png.is_symlink()) and not _confusion_is_ours(png, man):
        raise OutputError(
            f"{png} exists and is not a confusion matrix fskd predict wrote beside {out.name} (or was "
            f"changed since); fskd will not replace it. Move it, or choose another --out (nothing was "
            f"changed)"
        )
    if cfg.format == "parquet":
        _parquet_module()  # before any work: name the extra
    clf = classifier if classifier is not None else Classifier(cfg.state, cfg.store, cfg.device)
    if labelled and not clf.store.has_split(cfg.split):
        raise EvaluationError(f"--split {cfg.split}: {clf.store.path} has the sample splits {clf.store.splits}")
    error_rows = cfg.skip_bad and not labelled
    cols = columns(cfg.top_k, len(clf.class_names), labelled, error_rows)
    skipped: list[str] = []
    confusion = None
    source = f"{clf.store.path}:{cfg.split}" if labelled else cfg.images or cfg.csv

    def paths() -> Iterator[str]:
        return image_paths(cfg.images) if cfg.images else csv_paths(cfg.csv)

    try:
        with building(out) as tmp, open(tmp, "wb") as f:
            w = _ParquetWriter(f, cols) if cfg.format == "parquet" else _Writer(f, cfg.format, cols)
            t_work = time.perf_counter()
            if labelled:
                confusion = _predict_split(clf, cfg, w, progress)
                png_bytes = confusion_png(confusion, clf.class_names, _title(clf, cfg))
            else:
                total = sum(1 for _ in paths())  # a first pass for the progress total; nothing is kept
                done = 0
                for window in _windows(paths(), cfg.batch_size * WINDOW_BATCHES):
                    bad: list[tuple[int, dict]] = []  # (position in the window, its error row)

                    def on_bad(ref: str, message: str, position: int, bad=bad) -> None:
                        skipped.append(message)
                        if error_rows:
                            bad.append((position, error_row(ref, message, cols)))

                    for feats, pos in clf.encode(window, cfg.batch_size, cfg.workers, cfg.skip_bad, on_bad):
                        rows = list(
                            zip(
                                pos.tolist(),
                                prediction_rows(
                                    clf.probabilities(feats), [window[i] for i in pos], clf.class_names, cfg.top_k
                                ),
                                strict=True,
                            )
                        )
                        if error_rows:
                            for _, r in rows:
                                r["error"] = None
                            # an unreadable image's row goes where the image was: before the batch's later rows
                            last = rows[-1][0]
                            rows, bad[:] = (
                                sorted(rows + [b for b in bad if b[0] < last]),
                                [b for b in bad if b[0] > last],
                            )
                        w.write([r for _, r in rows])
                        fault_point("predict:batch")
                    w.write([r for _, r in sorted(bad)])  # unreadable images after the window's last readable one
                    done += len(window)
                    if progress is not None:
                        progress("images", done, total, done / max(time.perf_counter() - t_work, 1e-9))
            sha, rows_written = w.close(tmp), w.rows
    except KeyboardInterrupt:
        raise Interrupted(
            f"fskd predict was interrupted; nothing was written to {out} (the partial output was "
            f"removed): run the same command again"
        ) from None
    predicted = rows_written - (len(skipped) if error_rows else 0)
    rate = (predicted + len(skipped)) / max(time.perf_counter() - t_work, 1e-9)
    accuracy = None
    meta_png = None
    if confusion is not None:
        correct = int(confusion.trace())
        accuracy = round(100.0 * correct / predicted, 3) if predicted else None
        atomic_write_bytes(png, png_bytes)
        meta_png = {"file": png.name, "sha256": hashlib.sha256(png_bytes).hexdigest()}
    seconds = time.perf_counter() - t0
    meta = {
        "format": FORMAT,
        "output": out.name,
        "output_format": cfg.format,
        "sha256": sha,
        "bytes": out.stat().st_size,
        "rows": rows_written,
        "predicted": predicted,
        "columns": cols,
        "source": source,
        "accuracy": accuracy,
        "confusion_png": meta_png,
        "skipped_count": len(skipped),
        "skipped": skipped[:MAX_SKIPPED_LISTED],
        "config": cfg.to_dict(),
        "classifier": clf.describe(),
        "seconds": round(seconds, 3),
        "images_per_s": round(rate, 2),
        "fskd_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(man, json.dumps(meta, indent=2))
    return PredictResult(
        out=str(out),
        manifest=str(man),
        format=cfg.format,
        count=predicted,
        skipped=len(skipped),
        seconds=round(seconds, 3),
        images_per_s=round(rate, 2),
        source=source,
        accuracy=accuracy,
        confusion=str(png) if meta_png else None,
        skipped_files=skipped[:20],
    )


def _title(clf: Classifier, cfg: PredictConfig) -> str:
    st = clf.state
    return f"{st.method} ({clf.shots}-shot, seed {clf.seed}) on {Path(str(clf.store.path)).name}, split {cfg.split}"


def _confusion_is_ours(png: Path, man: Path) -> bool:
    """True when the manifest beside the output names ``png`` and its SHA-256 still matches."""
    try:
        meta = json.loads(man.read_text(encoding="utf-8"))
        rec = meta.get("confusion_png") or {}
        return (
            meta.get("format") == FORMAT
            and png.is_file()
            and not png.is_symlink()
            and rec.get("file") == png.name
            and rec.get("sha256") == sha256_file(png)
        )
    except (OSError, ValueError, AttributeError):
        return False


def _manifest_is_ours(path: Path) -> bool:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _predict_split(clf: Classifier, cfg: PredictConfig, w, progress: Progress | None) -> np.ndarray:
    """Rows of a store split from its cached features (no encoding), chunk by chunk, with ``label``;
    returns the confusion counts (C, C): rows the true class, columns the predicted one."""
    store = clf.store
    ids = store.sample_ids(cfg.split)
    root = (store.attrs.get("dataset") or {}).get("root")
    n = len(clf.class_names)
    counts = np.zeros((n, n), dtype=np.int64)
    total, done, t0 = int((store.labels(cfg.split) >= 0).sum()), 0, time.perf_counter()
    for start, feats, lab in store.iter_chunks(cfg.split):
        keep = lab >= 0  # unreadable rows (label -1) have no features
        if not keep.any():
            continue
        x, y = torch.from_numpy(feats[keep]), lab[keep]
        refs = ids[start : start + len(lab)][keep]
        paths = [str(Path(root) / r) if root else str(r) for r in refs]
        for s in range(0, len(x), QUERY_BATCH):
            probs = clf.probabilities(x[s : s + QUERY_BATCH])
            np.add.at(counts, (y[s : s + QUERY_BATCH], probs.argmax(-1).cpu().numpy()), 1)
            w.write(
                prediction_rows(probs, paths[s : s + QUERY_BATCH], clf.class_names, cfg.top_k, y[s : s + QUERY_BATCH])
            )
            fault_point("predict:batch")
        done += len(x)
        if progress is not None:
            progress(cfg.split, done, total, done / max(time.perf_counter() - t0, 1e-9))
    return counts


#: class names longer than this are cut (with an ellipsis) on the confusion matrix's axes
LABEL_CHARS = 30
#: above this many classes the axes name every k-th class only (the matrix itself stays whole)
MAX_LABELLED = 60


def confusion_png(counts: np.ndarray, names: list[str], title: str) -> bytes:
    """A row-normalised confusion matrix as PNG bytes: rows the true class, columns the predicted
    one, both in the store's class order (the order of the probabilities); each row sums to 1 over
    that class's images; the title gives the top-1 accuracy. Cells of at least 10% are written in
    percent when there are at most 40 classes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(names)
    per_class = counts.sum(1, keepdims=True)
    frac = np.divide(counts, per_class, out=np.zeros(counts.shape, dtype=float), where=per_class > 0)
    total = int(counts.sum())
    acc = 100.0 * counts.trace() / total if total else float("nan")
    side = float(np.clip(3.5 + 0.26 * min(n, MAX_LABELLED), 5.0, 20.0))
    fig = Figure(figsize=(side + 1.6, side + 0.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="fraction of the true class's images")
    step = max(1, int(np.ceil(n / MAX_LABELLED)))
    ticks = np.arange(0, n, step)
    short = [x if len(x) <= LABEL_CHARS else x[: LABEL_CHARS - 1] + "\u2026" for x in names]
    font = 7 if n > 20 else 9
    ax.set_xticks(ticks, [short[i] for i in ticks], rotation=90, fontsize=font)
    ax.set_yticks(ticks, [short[i] for i in ticks], fontsize=font)
    ax.set_xlabel("predicted class" + (f" (one class in {step} named on the axes)" if step > 1 else ""))
    ax.set_ylabel("true class")
    if n <= 40:
        for i, j in zip(*np.nonzero(frac >= 0.1), strict=True):
            ax.text(
                j,
                i,
                f"{100 * frac[i, j]:.0f}",
                ha="center",
                va="center",
                fontsize=6 if n > 20 else 8,
                color="white" if frac[i, j] > 0.55 else "black",
            )
    ax.set_title(f"{title}\ntop-1 accuracy {acc:.2f}% ({total} images, {n} classes); rows normalised", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.15)  # nothing clipped, whatever the names
    return buf.getvalue()
