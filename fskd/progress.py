"""Progress bars for long jobs (tqdm on stderr).

The API takes ``progress="auto"`` by default: a bar when stderr is a terminal, nothing otherwise
(logs and pipes stay clean); ``None`` turns it off, a callable receives the updates itself.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

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


def resolve(progress, factory: Callable[[], Callable]):
    """``"auto"`` -> a bar when stderr is a terminal, else None; anything else unchanged."""
    if isinstance(progress, str) and progress == AUTO:
        return factory() if sys.stderr.isatty() else None
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
