"""Progress bars for long jobs (tqdm on stderr).

The API takes ``progress="auto"`` by default: a bar when stderr is a terminal; otherwise (a log
file, ``nohup``, a scheduler) one line at a time on the ``fskd.progress`` logger, which the CLI
shows (INFO) and a library user sees only if they configure logging. ``None`` turns it off, a
callable receives the updates itself.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

log = logging.getLogger("fskd.progress")
#: seconds between two log lines of one extract split (a line per chunk would flood an ImageNet log)
LOG_EVERY = 10.0


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def extract_log() -> Callable[[str, int, int, float], None]:
    """progress(split, rows_done, rows_total, images_per_second) as log lines: the first, then at
    most one every :data:`LOG_EVERY` seconds, and the last of each split."""
    last: dict[str, float] = {}

    def update(split: str, done: int, total: int, rate: float) -> None:
        now = time.monotonic()
        if done < total and split in last and now - last[split] < LOG_EVERY:
            return
        last[split] = now
        eta = (total - done) / rate if rate > 0 else 0.0
        log.info(
            "extract %s: %s/%s images (%d%%), %.1f img/s, ETA %s",
            split,
            f"{done:,}",
            f"{total:,}",
            100 * done // max(total, 1),
            rate,
            _clock(eta),
        )

    return update


def bench_log() -> Callable[[int, int, str], None]:
    """progress(cells_done, cells_total, label) as one log line per finished cell, with an ETA."""
    t0 = time.monotonic()
    said = [0]

    def update(done: int, total: int, label: str) -> None:
        # the grid calls once as a cell starts (its label) and once as it ends (done + 1, its result)
        if done <= said[0] or not label:
            return
        said[0] = done
        elapsed = time.monotonic() - t0
        log.info(
            "bench cell %d/%d: %s; elapsed %s, ETA %s",
            done,
            total,
            label,
            _clock(elapsed),
            _clock(elapsed / done * (total - done)),
        )

    return update


AUTO = "auto"


def extract_bar() -> Callable[[str, int, int, float], None]:
    """progress(split, rows_done, rows_total, images_per_second) drawing one bar per split."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(split: str, done: int, total: int, rate: float) -> None:
        bar = bars.get(split)
        if bar is None:
            bar = bars[split] = tqdm(total=total, desc=f"extract {split}", unit="img", file=sys.stderr, leave=True)
        bar.update(done - bar.n)  # tqdm shows the images/s rate
        if done >= total:
            bar.close()

    return update


def train_bar() -> Callable[[str, int, int, dict], None]:
    """progress(stage, step, total, {"loss": ...}) drawing one bar per training stage."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(stage: str, step: int, total: int, info: dict) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, leave=False)
        bar.n = step
        bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()}, refresh=False)
        bar.refresh()
        if step >= total:
            bar.close()

    return update


def resolve(progress, factory: Callable[[], Callable], fallback: Callable[[], Callable] | None = None):
    """``"auto"`` -> a bar when stderr is a terminal, else ``fallback()`` (log lines) or None;
    anything else unchanged."""
    if isinstance(progress, str) and progress == AUTO:
        return factory() if sys.stderr.isatty() else (fallback() if fallback else None)
    return progress


def bench_bar() -> Callable[[int, int, str], None]:
    """progress(cells_done, cells_total, cell_label): one bar over the grid's cells with an ETA."""
    from tqdm import tqdm

    state: dict = {}

    def update(done: int, total: int, label: str) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, desc="bench", unit="cell", file=sys.stderr)
        bar.update(done - bar.n)
        if label:
            bar.set_postfix_str(label, refresh=True)
        if done >= total:
            bar.close()

    return update


def predict_bar():
    """progress(stage, done, total, rate) of fskd predict as a tqdm bar (images/s)."""
    from tqdm import tqdm

    bars: dict = {}

    def update(stage: str, done: int, total: int, rate: float) -> None:
        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=f"predict {stage}", unit="img", file=sys.stderr)
        bars[stage].update(done - bars[stage].n)  # tqdm shows the images/s rate
        if done >= total:
            bars[stage].close()

    return update


def predict_log():
    """progress(stage, done, total, rate) of fskd predict as log lines on ``fskd.progress``."""
    last = [0.0]

    def update(stage: str, done: int, total: int, rate: float) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < 10.0:
            return
        last[0] = now
        log.info(
            "predict %s: %s/%s images (%d%%), %.1f img/s",
            stage,
            f"{done:,}",
            f"{total:,}",
            100 * done // max(total, 1),
            rate,
        )

    return update
