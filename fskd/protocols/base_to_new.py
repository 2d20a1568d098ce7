"""Base-to-new generalisation (CoCoOp): the classes are split in half by label order; a method
is fitted on K shots (16 in the papers) of the base half only and scored on

- **base**: the test rows of the base classes, classifying among the base classes (the support
  is the same K shots per class of seed s the fit saw);
- **new**: the test rows of the new classes, classifying among the new classes only, with no
  shot of them: the method transfers what it learned on the base half through the new classes'
  text. Methods that cannot classify a class they have no shot of give no new number;
- **HM**: the harmonic mean of base and new (of the means over seeds, as CoCoOp's tables).

:func:`restrict_for_fit` is what a fit sees: a read-only view of the store (a
:class:`~fskd.store.view.StoreView`) in which only the K train shots and the min(K, 4) validation
rows (CoOp's rule) of the base classes are visible, the new classes and every test row hidden.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fskd.evaluation.metrics import SEED_CI, seed_summary
from fskd.evaluation.transductive import BatchSetting
from fskd.protocols import PROTOCOLS
from fskd.protocols.allway import (
    AllwayScores,
    ValRows,
    batch_setting,
    need_splits,
    run_allway,
    shot_weight_record,
    store_rows,
    transductive_rule,
    transductive_val,
)
from fskd.protocols.base import EvalContext, EvalResult, Scored, StoreProtocol, per_class
from fskd.store.sampling import sample_shots, validation_rows

if TYPE_CHECKING:
    from fskd.classifiers.base import Head
    from fskd.store import StoreLike, StoreView

SOURCE = "CoCoOp base-to-new halves (label order)"


def halves(n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Base = the first ceil(C/2) class indices, new = the rest (CoCoOp's subsample_classes)."""
    m = (n_classes + 1) // 2
    return np.arange(m), np.arange(m, n_classes)


def split_of(n_classes: int) -> dict[str, Any]:
    base, new = halves(n_classes)
    return {"base": base.tolist(), "val": [], "novel": new.tolist(), "source": SOURCE}


def restrict_for_fit(store: StoreLike, shots: int, seed: int, hp_selection: str) -> StoreView:
    """The view of ``store`` a fit sees: only the base half's K train shots of ``seed`` (the rows
    the all-way protocol draws for that seed) and its validation rows, the halves as its class
    split, reads that name no split on train; ``.description`` says so. ``store`` is not changed."""
    base, _ = halves(store.num_classes)
    keep: dict[str, np.ndarray] = {}
    raw = store.labels("train")
    valid = np.flatnonzero(raw >= 0)  # the rows gather() returns, in its order
    rows = sample_shots(raw[valid], base, shots, seed, store.class_names, option="--shots")
    keep["train"] = np.zeros(len(raw), bool)
    keep["train"][valid[rows.reshape(-1)]] = True
    n_val = 0
    if store.has_split("val"):
        yv = store.labels("val")
        keep["val"] = np.zeros(len(yv), bool)
        if hp_selection != "none":
            v = validation_rows(yv, base, shots, seed, hp_selection)
            keep["val"][v] = True
            n_val = len(v)
    for s in store.splits:
        if s not in keep:
            keep[s] = np.zeros(store.n_rows(s), bool)
    desc = (
        f"base-to-new: the fit saw {shots} train shots (seed {seed}) of each of the {len(base)} base classes and "
        f"{n_val} val rows ({hp_selection} rule); the {store.num_classes - len(base)} new classes and every test row "
        f"were hidden"
    )
    return store.view(class_split=split_of(store.num_classes), keep=keep, default_splits=["train"], description=desc)


@dataclass
class BaseToNewScores:
    base: AllwayScores
    new: AllwayScores | None  # None: the head cannot classify classes it has no shot of
    base_classes: np.ndarray  # the class order of ``base.per_class``
    new_classes: np.ndarray  # the class order of ``new.per_class``


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def run_base_to_new(
    train_x: torch.Tensor | Callable[[np.ndarray], torch.Tensor],
    train_y: np.ndarray,
    test_x: torch.Tensor,
    test_y: np.ndarray,
    n_classes: int,
    shot: int,
    seeds: tuple[int, ...],
    head: Head,
    transfers: bool,
    class_names: list[str] | None = None,
    transductive: bool = False,
    batch_setting: BatchSetting | None = None,
    val_rows: ValRows | None = None,
) -> BaseToNewScores:
    """Base: all-way over the base half with K shots per class; new: over the new half with no
    shot (the head gets an empty support of the new classes), when ``transfers``. ``transductive``:
    each half's test rows are classified jointly by TransCLIP (zero-shot setting for the new half);
    ``batch_setting`` (a :class:`~fskd.evaluation.transductive.BatchSetting`): in realistic batches, per half;
    ``val_rows``: the base classes' val rows that choose TransCLIP's shot weight on the base half."""
    base, new = halves(n_classes)
    in_base = np.isin(test_y, base)
    idx_b = torch.from_numpy(np.flatnonzero(in_base)).to(test_x.device)
    b = run_allway(
        train_x,
        train_y,
        test_x[idx_b],
        test_y[in_base],
        base,
        shot,
        seeds,
        head,
        class_names=class_names,
        transductive=transductive,
        batch_setting=batch_setting,
        val_rows=val_rows,
    )
    n = None
    if transfers:
        idx_n = torch.from_numpy(np.flatnonzero(~in_base)).to(test_x.device)
        n = run_allway(
            train_x,
            train_y,
            test_x[idx_n],
            test_y[~in_base],
            new,
            0,
            seeds,
            head,
            class_names=class_names,
            transductive=transductive,
            batch_setting=batch_setting,
        )
    return BaseToNewScores(b, n, base, new)


class BaseToNew(StoreProtocol):
    """CoCoOp: a state fitted on the base half (``--base-to-new``); base, new and their HM."""

    name = "base-to-new"
    base_to_new_state = True

    def score(self, ctx: EvalContext, head: Head, name: str, warnings: list[str]) -> Scored:
        cfg, store, state, device = ctx.cfg, ctx.store, ctx.state, ctx.device
        names = store.class_names
        need_splits(store, "base-to-new")
        if state is None:
            store = store.view(class_split=split_of(store.num_classes))
        take, train_y = store_rows(store, "train", device)
        test_x, test_y = store.gather(None, ["test"])
        transfers = bool(ctx.method().transfers_to_new_classes if state is not None else head.needs_text)
        if not transfers:
            warnings.append(f"{name} cannot classify classes it has no shot of: no new-class accuracy (base only)")
        rule = transductive_rule(ctx)
        val_rows = (
            transductive_val(store, halves(store.num_classes)[0], cfg.shots, rule, device) if cfg.transductive else None
        )
        t1 = time.perf_counter()
        sc = run_base_to_new(
            take,
            train_y,
            torch.from_numpy(test_x).to(device),
            test_y,
            store.num_classes,
            cfg.shots,
            tuple(cfg.seeds),
            head,
            transfers,
            names,
            transductive=cfg.transductive,
            batch_setting=batch_setting(ctx),
            val_rows=val_rows,
        )
        b = seed_summary(sc.base.top1)
        nw = seed_summary(sc.new.top1) if sc.new is not None else None
        hm = harmonic_mean(b.mean, nw.mean) if nw is not None else None
        per_seed_v = (
            [harmonic_mean(x, y) for x, y in zip(sc.base.top1, sc.new.top1, strict=True)]
            if sc.new is not None
            else list(sc.base.top1)
        )
        summ = seed_summary(per_seed_v)
        acc = hm if hm is not None else b.mean
        n_batches = None
        if sc.base.batches is not None:
            n_batches = [
                x + y
                for x, y in zip(
                    sc.base.batches,
                    sc.new.batches if sc.new is not None and sc.new.batches is not None else [0] * len(sc.base.batches),
                    strict=True,
                )
            ]
        rows = np.bincount(test_y, minlength=store.num_classes)
        table: list[dict[str, Any]] = []
        for part, scores_, cls in (("base", sc.base, sc.base_classes), ("new", sc.new, sc.new_classes)):
            if scores_ is not None:
                table += per_class(names, cls, np.nanmean(scores_.per_class, axis=0), rows, half=part)
        return Scored(
            t1,
            dict(
                accuracy=round(acc, 3),
                ci95=None if summ.ci95 is None else round(summ.ci95, 3),
                std=None if summ.std is None else round(summ.std, 3),
                n_seeds=summ.n,
                statistic=f"{SEED_CI} of the per-seed {'harmonic mean' if hm is not None else 'base accuracy'}",
                per_seed=[round(float(a) * 100, 3) for a in per_seed_v],
                classes=store.num_classes,
                n_batches=n_batches,
                shot_weight=shot_weight_record(rule, val_rows is not None, sc.base.shot_weights),
                base=round(b.mean, 3),
                new=None if nw is None else round(nw.mean, 3),
                hm=None if hm is None else round(hm, 3),
                top5=None if sc.base.top5 is None else round(float(sc.base.top5.mean()) * 100, 3),
                per_class=table,
                mean_per_class=round(float(np.nanmean([r["accuracy"] for r in table])), 3),
            ),
        )

    def summary_line(self, r: EvalResult) -> str:
        new = "n/a (cannot transfer)" if r.new is None else f"{r.new:.2f}%"
        hm = "n/a" if r.hm is None else f"{r.hm:.2f}%"
        return (
            f"base-to-new {r.shots}-shot, {r.classes} classes, seeds {r.seeds}, {r.classifier}{r.how_text()}: "
            f"base {r.base:.2f}%, new {new}, HM {hm}"
        )

    def describe(self, r: EvalResult) -> str:
        return (
            f"Base-to-new (CoCoOp): classes split in half by label order; fitted on {r.shots} shots per base class "
            f"(seeds {r.seeds}); base = test rows of the base classes among the base classes, new = test rows of "
            f"the new classes among the new classes with no shot of them, HM = harmonic mean of the mean base and "
            f"new accuracy; {'' if r.inductive else r.inference_text() + '; '}{r.seed_stat_text()}; "
            f"{r.encoder_text()}; classifier {r.classifier}; hyper-parameters: {r.chosen_text()}."
        )

    def bench_text(self, config: dict[str, Any], seeds: list[int], val: str) -> str:
        return (
            f"Protocol: base-to-new (CoCoOp). Classes split in half by label order; each cell fits the method on "
            f"K shots per base class (seed s), {val.replace('per class', 'per base class')}; nothing of the new "
            f"classes is seen. Base: top-1 (%) on the base classes' test rows among the base classes; new: on the "
            f"new classes' test rows among the new classes, with no shot of them; HM: their harmonic mean. "
            f"Entries: mean ± std over seeds {', '.join(map(str, seeds))} (one fit per seed); HM entries: over "
            f"the per-seed HMs. Average: the mean over datasets (Average HM: the HM of the average base and new)."
        )


PROTOCOLS.register("base-to-new", BaseToNew)
