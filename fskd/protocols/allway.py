"""The all-way protocol of CLIP few-shot papers: K shots per class from the train split, every
class at once, the full test split as queries; repeated over seeds (mean and std).

Its shots and validation rows are drawn by :mod:`fskd.store.sampling` (``sample_shots``,
``validation_rows``: methods draw the very same rows while fitting); the transductive option
(TransCLIP) is :mod:`fskd.evaluation.transductive`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fskd.errors import ConfigError, EvaluationError
from fskd.evaluation.metrics import SEED_CI, Calibration, class_accuracies, seed_summary
from fskd.evaluation.transductive import (
    SHOT_WEIGHTS,
    BatchSetting,
    realistic_batches,
    transclip,
    transclip_batches,
)
from fskd.protocols import PROTOCOLS
from fskd.protocols.base import EvalContext, EvalResult, Scored, StoreProtocol, per_class, state_hp_selection
from fskd.store.sampling import sample_shots

if TYPE_CHECKING:
    from fskd.classifiers.base import Head
    from fskd.store import StoreLike

TOPK = 5


@dataclass
class AllwayScores:
    """Per seed: top-1 accuracy (S,), top-5 accuracy (S,) when there are more than 5 classes,
    per-class accuracy (S, C) in the order of ``classes`` (fractions); the expected calibration
    error (S,) (fraction, 15 bins) and the negative log-likelihood (S,) of the softmax of the
    head's logits as they are (a cosine head's unscaled scores give near-uniform probabilities)."""

    top1: np.ndarray
    top5: np.ndarray | None
    per_class: np.ndarray
    ece: np.ndarray | None = None
    nll: np.ndarray | None = None
    batches: list[int] | None = None  # transductive in batches (``batch_setting``): how many, per seed
    #: transductive: the TransCLIP shot weight each seed kept (one per batch in batches; None zero-shot)
    shot_weights: list[list[float | None]] | None = None


#: the val rows that choose TransCLIP's shot weight for a seed: (features (V, D), class ids (V,))
ValRows = Callable[[int], tuple[torch.Tensor, np.ndarray]]


def transductive_val(
    store: StoreLike, classes: np.ndarray, shots: int, rule: str, device: torch.device | str
) -> ValRows | None:
    """The val rows of ``classes`` that choose TransCLIP's shot weight, per seed, under the
    hyper-parameter selection ``rule`` (the state's; CoOp's few-shot rule by default, the authors'
    own count): None under ``none``, without shots, or when the store has no val split."""
    from fskd.store.sampling import allway_val

    if rule == "none" or shots < 1 or not store.has_split("val"):
        return None

    def rows(seed: int) -> tuple[torch.Tensor, np.ndarray]:
        x, y = allway_val(store, classes, shots, seed, rule)
        return torch.from_numpy(x).to(device), y

    return rows


def store_rows(
    store: StoreLike, split: str, device: torch.device | str
) -> tuple[Callable[[np.ndarray], torch.Tensor], np.ndarray]:
    """``(take, labels)`` for :func:`run_allway`: the labels of ``split``'s valid rows, and a function
    reading the features of some of them (indices into those labels) from the store, by row."""
    valid = store.valid_rows(split)
    return (lambda r: torch.from_numpy(store.take(split, valid[r])).to(device)), store.labels(split)[valid]


def run_allway(
    train_x: torch.Tensor | Callable[[np.ndarray], torch.Tensor],
    train_y: np.ndarray,
    test_x: torch.Tensor,
    test_y: np.ndarray,
    classes: np.ndarray,
    shot: int,
    seeds: tuple[int, ...],
    head: Head,
    query_batch: int = 8192,
    class_names: list[str] | None = None,
    transductive: bool = False,
    batch_setting: BatchSetting | None = None,
    val_rows: ValRows | None = None,
) -> AllwayScores:
    """Scores per seed over the full test split (see :class:`AllwayScores`). ``train_x``: the train
    rows' features (n, D), or a function giving the features of some rows (:func:`store_rows`), so
    only each seed's C*K shots are read. ``transductive``: classify every test row at once with
    TransCLIP (:mod:`fskd.evaluation.transductive`) on top of the head's logits (the shots' and
    test rows' features as stored, the softmax of the head's logits as the inductive
    predictions); top-1/top-5 are then of the transductive assignments, and there is no ECE/NLL
    (the assignments are not the head's probabilities). ``batch_setting``: TransCLIP on the
    realistic batches of each seed instead (:func:`~fskd.evaluation.transductive.realistic_batches`),
    their count per seed in ``batches``. ``val_rows``: the val rows that choose TransCLIP's shot
    weight per seed (:func:`transductive_val`; None: the last of its schedule); the weights kept
    are in ``shot_weights``."""
    if len(test_y) == 0:
        raise EvaluationError("the all-way protocol needs a test split with samples of the evaluated classes")
    if batch_setting is not None and batch_setting.active_classes > len(classes):
        raise ConfigError(
            f"--active-classes {batch_setting.active_classes} is more than the {len(classes)} classes "
            f"evaluated here: give 1 ... {len(classes)}"
        )
    pos = np.full(int(max(np.max(classes), np.max(test_y))) + 1, -1)  # class id -> way index
    pos[np.asarray(classes)] = np.arange(len(classes))
    truth = torch.from_numpy(pos[np.asarray(test_y)]).to(test_x.device)
    cls = torch.as_tensor(classes, device=test_x.device)[None]
    top1: list[float] = []
    top5: list[float] = []
    per_cls: list[np.ndarray] = []
    ece: list[float] = []
    nll: list[float] = []
    n_batches: list[int] = []
    kept: list[list[float | None]] = []
    k = TOPK if len(classes) > TOPK else 0
    if callable(train_x):
        take = train_x
    else:
        features = train_x

        def take(r: np.ndarray) -> torch.Tensor:
            return features[torch.from_numpy(r).to(features.device)]

    raw_test, test_x = test_x, head.prepare(test_x)
    truth_np = truth.cpu().numpy()
    for seed in seeds:
        rows = sample_shots(train_y, classes, shot, seed, class_names)  # (C, K)
        raw_support = take(rows.reshape(-1))
        support = head.prepare(raw_support)  # row-wise, so preparing the shots alone is the same
        fitted = head.fit(support.reshape(len(classes), shot, support.shape[-1])[None], cls)
        if transductive:
            logits = torch.cat(
                [fitted.logits(test_x[s : s + query_batch][None])[0] for s in range(0, len(test_y), query_batch)]
            )  # (M, C): every test row
            way = torch.arange(len(classes), device=raw_support.device).repeat_interleave(shot)
            vx = vy = None
            if val_rows is not None:
                vx, v_cls = val_rows(seed)
                vy = torch.from_numpy(pos[np.asarray(v_cls)]).to(vx.device)
            if batch_setting is None:
                out = transclip(raw_test, logits.softmax(-1), raw_support, way, vx, vy)
                pred_t, scores_t = out.pred, out.scores
                kept.append([out.shot_weight])
            else:
                batches = realistic_batches(truth_np, batch_setting, seed)
                pred_t, scores_t, gammas = transclip_batches(
                    raw_test, logits.softmax(-1), raw_support, way, batches, vx, vy
                )
                n_batches.append(len(batches))
                kept.append(gammas)
            pred = pred_t.cpu().numpy()
            top1.append(float((pred == truth_np).mean()))
            if k:
                top5.append(int((scores_t.topk(k, dim=-1).indices == truth[:, None]).any(-1).sum()) / len(test_y))
            per_cls.append(class_accuracies(pred, truth_np, len(classes)))
            continue
        preds, in5, cal = [], 0, Calibration()
        for s in range(0, len(test_y), query_batch):
            q = test_x[s : s + query_batch][None]
            preds.append(fitted.predict(q)[0].cpu())
            cal.add(fitted.logits(q)[0], truth[s : s + query_batch])
            if k:
                in5 += int((fitted.topk(q, k)[0] == truth[s : s + query_batch, None]).any(-1).sum())
        pred = torch.cat(preds).numpy()
        top1.append(float((pred == truth_np).mean()))
        top5.append(in5 / len(test_y))
        per_cls.append(class_accuracies(pred, truth_np, len(classes)))
        ece.append(cal.ece())
        nll.append(cal.mean_nll())
    if transductive:
        return AllwayScores(
            np.asarray(top1),
            np.asarray(top5) if k else None,
            np.stack(per_cls),
            batches=n_batches if batch_setting is not None else None,
            shot_weights=kept,
        )
    return AllwayScores(
        np.asarray(top1), np.asarray(top5) if k else None, np.stack(per_cls), np.asarray(ece), np.asarray(nll)
    )


def batch_setting(ctx: EvalContext) -> BatchSetting | None:
    """``--batch B --active-classes C``: TransCLIP in realistic batches; None: every row at once."""
    cfg = ctx.cfg
    return (
        BatchSetting(cfg.batch, cfg.active_classes)
        if cfg.batch is not None and cfg.active_classes is not None
        else None
    )


def transductive_rule(ctx: EvalContext) -> str:
    """What chooses TransCLIP's shot weight: the state's ``--hp-selection`` (a registered
    classifier: few-shot-val, CoOp's rule and the TransCLIP authors' count)."""
    return state_hp_selection(ctx.state) or "few-shot-val"


def shot_weight_record(rule: str, scored: bool, kept: list[list[float | None]] | None) -> dict[str, Any] | None:
    """A result's ``shot_weight``: what chose TransCLIP's shot weight and the one kept per seed
    (a list per seed, one per batch); None when inductive."""
    if kept is None:
        return None
    how = (
        f"the best val accuracy ({rule} rows, each classified as its nearest test row; the earliest on ties)"
        if scored
        else "no val rows (--hp-selection none, no shot or no val split): the last of the schedule"
    )
    return {"schedule": list(SHOT_WEIGHTS), "chosen_by": how, "per_seed": kept}


def need_splits(store: StoreLike, what: str) -> None:
    for s in ("train", "test"):
        if not store.has_split(s):
            raise EvaluationError(f"{what} needs a {s!r} sample split; {store.path} has {store.splits}")


class Allway(StoreProtocol):
    """K shots per class from the train split (seed s), all classes, the full test split; seeds."""

    name = "allway"

    def score(self, ctx: EvalContext, head: Head, name: str, warnings: list[str]) -> Scored:
        cfg, store, device = ctx.cfg, ctx.store, ctx.device
        names = store.class_names
        need_splits(store, "the all-way protocol")
        take, train_y = store_rows(store, "train", device)  # each seed reads its shots alone
        test_x, test_y = store.gather(None, ["test"])
        classes = np.unique(test_y)
        absent = sorted(set(range(store.num_classes)) - set(classes.tolist()))
        if absent:
            warnings.append(
                f"{len(absent)} of {store.num_classes} classes have no readable test rows and are left out "
                f"of the all-way evaluation: {', '.join(repr(names[c]) for c in absent[:10])}"
                f"{' ...' if len(absent) > 10 else ''}"
            )
        rule = transductive_rule(ctx)
        val_rows = transductive_val(store, classes, cfg.shots, rule, device) if cfg.transductive else None
        t1 = time.perf_counter()
        scores = run_allway(
            take,
            train_y,
            torch.from_numpy(test_x).to(device),
            test_y,
            classes,
            cfg.shots,
            tuple(cfg.seeds),
            head,
            class_names=names,
            transductive=cfg.transductive,
            batch_setting=batch_setting(ctx),
            val_rows=val_rows,
        )
        summ = seed_summary(scores.top1)
        pc = np.nanmean(scores.per_class, axis=0)  # (C,) over seeds
        fields: dict[str, Any] = dict(
            accuracy=round(summ.mean, 3),
            ci95=None if summ.ci95 is None else round(summ.ci95, 3),
            std=None if summ.std is None else round(summ.std, 3),
            n_seeds=summ.n,
            statistic=SEED_CI,
            per_seed=[round(float(a) * 100, 3) for a in scores.top1],
            classes=len(classes),
            n_batches=scores.batches,
            shot_weight=shot_weight_record(rule, val_rows is not None, scores.shot_weights),
            mean_per_class=round(float(np.nanmean(pc)) * 100, 3),
            top5=None if scores.top5 is None else round(float(scores.top5.mean()) * 100, 3),
            per_episode=None,
            per_class=per_class(names, classes, pc, np.bincount(test_y, minlength=store.num_classes)),
        )
        if scores.ece is not None and scores.nll is not None:  # none when transductive: not the head's softmax
            fields.update(ece=round(float(scores.ece.mean()) * 100, 3), nll=round(float(scores.nll.mean()), 4))
        return Scored(t1, fields)

    def summary_line(self, r: EvalResult) -> str:
        head = (
            f"all-way {r.shots}-shot, {r.classes} classes, seeds {r.seeds}, {r.classifier}{r.how_text()}: "
            f"{r.accuracy:.2f}%"
        )
        if r.ci95 is not None:
            head += f" ± {r.ci95:.2f} (95% CI, Student t over {r.n_seeds} seeds; std {r.std:.2f})"
        else:
            head += " (one seed: no interval)"
        extra = [f"mean per-class {r.mean_per_class:.2f}%"] if r.mean_per_class is not None else []
        extra += [f"top-5 {r.top5:.2f}%"] if r.top5 is not None else []
        extra += [f"ECE {r.ece:.2f}%, NLL {r.nll:.3f}"] if r.ece is not None else []
        return head + (f"; {', '.join(extra)}" if extra else "")

    def describe(self, r: EvalResult) -> str:
        return (
            f"All-way: {r.shots} shots per class from the train split (seed s), all {r.classes} classes, the full "
            f"test split, seeds {r.seeds}; {r.inference_text()}; mean top-1 over seeds with {r.seed_stat_text()}; "
            f"{r.encoder_text()}; classifier {r.classifier}; centring {r.center}; hyper-parameters: {r.chosen_text()}."
        )

    def bench_text(self, config: dict[str, Any], seeds: list[int], val: str) -> str:
        return (
            f"Protocol: all-way (CLIP few-shot). Each cell fits the method on K shots per class drawn from the "
            f"train split with seed s, {val}, and scores top-1 accuracy (%) on the full test split, all classes. "
            f"Entries: mean ± std over seeds {', '.join(map(str, seeds))} (one fit per seed). Average: the mean of "
            f"the per-dataset means (its ± is the std over seeds of the per-seed averages)."
        )


PROTOCOLS.register("allway", Allway)
