"""``fskd predict``: a fitted state's all-way head on new images, or on a store split's features.

Streams: paths are read a window at a time, encoded in batches (extract's loader and forward),
scored, and their rows written before the next window is read, so memory does not grow with the
number of images. The output is built under a hidden temporary name beside ``--out`` and renamed
when complete; beside it ``OUT.fskd.json`` records what wrote it (config, state, store, counts,
the unreadable files skipped, the SHA-256 of the output), which is also how a later
``--force`` knows the file is fskd's to replace.
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

import torch

from fskd import __version__
from fskd.config import PredictConfig
from fskd.deploy.classifier import QUERY_BATCH, Classifier, prediction_rows
from fskd.deploy.output import building, guard_output_file
from fskd.errors import EvaluationError, Interrupted, OutputError
from fskd.fsutil import atomic_write_text, fault_point, sha256_file

log = logging.getLogger(__name__)

#: progress(stage, images_done, images_total, images_per_second), as extract's
Progress = Callable[[str, int, int, float], None]
FORMAT = "fskd-predictions"
MANIFEST_SUFFIX = ".fskd.json"
#: paths encoded per DataLoader (a window): bounded memory, whatever the number of images
WINDOW_BATCHES = 32
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
    skipped_files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + MANIFEST_SUFFIX)


def is_prediction_file(path: Path) -> bool:
    """True when ``path`` is a predictions file fskd wrote and nobody changed since: its manifest
    names it and its SHA-256 matches."""
    try:
        meta = json.loads(manifest_path(path).read_text(encoding="utf-8"))
        return (isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("output") == path.name
                and meta.get("bytes") == path.stat().st_size and meta.get("sha256") == sha256_file(path))
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
            self._emit("".join(json.dumps({c: _round(r[c]) for c in self.columns}, ensure_ascii=False) + "\n"
                               for r in rows))
        self.rows += len(rows)


def _round(v):
    return round(v, 6) if isinstance(v, float) else v


def _fmt(v) -> str:
    return f"{v:.6f}" if isinstance(v, float) else ("" if v is None else str(v))


def columns(top_k: int, n_classes: int, labelled: bool) -> list[str]:
    k = max(1, min(top_k, n_classes))
    return (["path"] + (["label"] if labelled else []) + ["prediction", "probability"]
            + [c for i in range(1, k + 1) for c in (f"top{i}", f"top{i}_probability")])


def _windows(paths: Iterator[str], size: int) -> Iterator[list[str]]:
    while True:
        w = list(itertools.islice(paths, size))
        if not w:
            return
        yield w


def predict(cfg: PredictConfig, progress: Progress | None = None, classifier: Classifier | None = None) -> PredictResult:
    """Run ``fskd predict`` (see the module docstring). ``classifier``: an already loaded one."""
    from fskd.deploy.sources import csv_paths, image_paths

    t0 = time.perf_counter()
    out = guard_output_file(cfg.out, "--out", is_prediction_file, cfg.force, "fskd predict's output",
                            protect=(("--state", cfg.state), ("--store", cfg.store)))
    man = manifest_path(out)
    if (man.exists() or man.is_symlink()) and not (man.is_file() and _manifest_is_ours(man)):
        raise OutputError(f"{man} exists and is not fskd's manifest of predictions; fskd will not replace it "
                          f"(nothing was changed)")
    clf = classifier if classifier is not None else Classifier(cfg.state, cfg.store, cfg.device)
    labelled = cfg.split is not None
    if labelled and not clf.store.has_split(cfg.split):
        raise EvaluationError(f"--split {cfg.split}: {clf.store.path} has the sample splits {clf.store.splits}")
    cols = columns(cfg.top_k, len(clf.class_names), labelled)
    skipped: list[str] = []
    correct = 0
    source = (f"{clf.store.path}:{cfg.split}" if labelled else cfg.images or cfg.csv)

    def paths() -> Iterator[str]:
        return image_paths(cfg.images) if cfg.images else csv_paths(cfg.csv)

    try:
        with building(out) as tmp, open(tmp, "wb") as f:
            w = _Writer(f, cfg.format, cols)
            t_work = time.perf_counter()
            if labelled:
                correct, total = _predict_split(clf, cfg, w, progress)
            else:
                total = sum(1 for _ in paths())  # a first pass for the progress total; nothing is kept
                done = 0

                def bad(ref: str, message: str) -> None:
                    skipped.append(message)

                for window in _windows(paths(), cfg.batch_size * WINDOW_BATCHES):
                    for feats, pos in clf.encode(window, cfg.batch_size, cfg.workers, cfg.skip_bad, bad):
                        w.write(prediction_rows(clf.probabilities(feats), [window[i] for i in pos], clf.class_names,
                                                cfg.top_k))
                        fault_point("predict:batch")
                    done += len(window)
                    if progress is not None:
                        progress("images", done, total, done / max(time.perf_counter() - t_work, 1e-9))
            f.flush()
            sha, rows = w.sha.hexdigest(), w.rows
    except KeyboardInterrupt:
        raise Interrupted(f"fskd predict was interrupted; nothing was written to {out} (the partial output was "
                          f"removed): run the same command again") from None
    seconds = time.perf_counter() - t0
    rate = (rows + len(skipped)) / max(time.perf_counter() - t_work, 1e-9)
    accuracy = round(100.0 * correct / rows, 3) if labelled and rows else None
    meta = {"format": FORMAT, "output": out.name, "sha256": sha, "bytes": out.stat().st_size, "rows": rows,
            "columns": cols, "source": source, "accuracy": accuracy, "skipped_count": len(skipped),
            "skipped": skipped[:MAX_SKIPPED_LISTED], "config": cfg.to_dict(), "classifier": clf.describe(),
            "seconds": round(seconds, 3), "images_per_s": round(rate, 2), "fskd_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(man, json.dumps(meta, indent=2))
    return PredictResult(out=str(out), manifest=str(man), format=cfg.format, count=rows, skipped=len(skipped),
                         seconds=round(seconds, 3), images_per_s=round(rate, 2), source=source, accuracy=accuracy,
                         skipped_files=skipped[:20])


def _manifest_is_ours(path: Path) -> bool:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _predict_split(clf: Classifier, cfg: PredictConfig, w: _Writer, progress: Progress | None) -> tuple[int, int]:
    """Rows of a store split from its cached features (no encoding), chunk by chunk, with ``label``;
    returns (correct, rows)."""
    store = clf.store
    ids = store.sample_ids(cfg.split)
    root = (store.attrs.get("dataset") or {}).get("root")
    total, done, correct, t0 = int((store.labels(cfg.split) >= 0).sum()), 0, 0, time.perf_counter()
    for start, feats, lab in store.iter_chunks(cfg.split):
        keep = lab >= 0  # unreadable rows (label -1) have no features
        if not keep.any():
            continue
        x, y = torch.from_numpy(feats[keep]), lab[keep]
        refs = ids[start:start + len(lab)][keep]
        paths = [str(Path(root) / r) if root else str(r) for r in refs]
        for s in range(0, len(x), QUERY_BATCH):
            probs = clf.probabilities(x[s:s + QUERY_BATCH])
            correct += int((probs.argmax(-1).cpu().numpy() == y[s:s + QUERY_BATCH]).sum())
            w.write(prediction_rows(probs, paths[s:s + QUERY_BATCH], clf.class_names, cfg.top_k, y[s:s + QUERY_BATCH]))
            fault_point("predict:batch")
        done += len(x)
        if progress is not None:
            progress(cfg.split, done, total, done / max(time.perf_counter() - t0, 1e-9))
    return correct, done

