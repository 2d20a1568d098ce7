"""Episodic N-way K-shot evaluation, batched over episodes (classes of one class split, the novel
one by default; mean accuracy and a 95% CI over episodes).

Episodes are sampled here with array operations (no Python loop per episode or per class:
``iter_episodes``; methods draw their validation episodes with the same code), in batches whose memory does not grow with the episode count, gathered into
(E, N, K, D) support and (E, N*Q, D) query tensors, and scored by the head in batches of episodes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fskd.errors import EvaluationError, FskdError
from fskd.evaluation.metrics import EPISODE_CI, mean_ci95
from fskd.protocols import PROTOCOLS
from fskd.protocols.base import EvalContext, EvalResult, Scored, StoreProtocol
from fskd.store.sampling import class_name, class_runs

if TYPE_CHECKING:
    from fskd.classifiers.base import Head


@dataclass
class Episodes:
    """Row indices into a label array: support (E, N, K), query (E, N, Q); classes (E, N)."""

    support: np.ndarray
    query: np.ndarray
    classes: np.ndarray


def sample_episodes(
    labels: np.ndarray,
    classes: Sequence[int] | np.ndarray,
    way: int,
    shot: int,
    query: int,
    episodes: int,
    seed: int,
    class_names: list[str] | None = None,
    error: type[FskdError] = EvaluationError,
) -> Episodes:
    """``episodes`` N-way K-shot Q-query episodes over rows whose label is in ``classes``, all
    sampled at once with array operations (no loop per episode or per class).

    Raises ``error`` naming the class and the counts when a class has fewer than shot + query
    rows, or when fewer than ``way`` classes are given. :func:`iter_episodes` draws the very same
    episodes in batches (memory bounded whatever their number).
    """
    parts = list(iter_episodes(labels, classes, way, shot, query, episodes, seed, class_names, error, max_keys=None))
    if len(parts) == 1:
        return parts[0]
    return Episodes(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("support", "query", "classes")))


#: random keys (float64) drawn per batch of :func:`iter_episodes`: 32 MiB, whatever the episode count
EPISODE_KEYS = 1 << 22


def iter_episodes(
    labels: np.ndarray,
    classes: Sequence[int] | np.ndarray,
    way: int,
    shot: int,
    query: int,
    episodes: int,
    seed: int,
    class_names: list[str] | None = None,
    error: type[FskdError] = EvaluationError,
    multiple: int = 1,
    max_keys: int | None = EPISODE_KEYS,
) -> Iterator[Episodes]:
    """The episodes of :func:`sample_episodes` (the same ones, for the same arguments) in batches
    of a multiple of ``multiple`` episodes holding at most about ``max_keys`` random keys (None:
    one batch), so sampling 10^6 episodes takes the memory of a few thousand. The checks run
    before the first batch is asked for.

    The two random streams of the one-shot draw are kept: the classes of every episode come first
    (episodes x classes draws), then the row keys; a second generator starts where the keys do
    (``advance``), so each batch continues both streams exactly where the previous one stopped."""
    classes = np.asarray(sorted(set(int(c) for c in classes)))
    labels = np.asarray(labels)
    if len(classes) < way:
        raise error(f"{way}-way episodes need at least {way} classes; the split has {len(classes)}")
    need = shot + query
    order = np.argsort(labels, kind="stable")
    starts, counts = class_runs(labels[order], classes)
    short = np.flatnonzero(counts < need)
    if len(short):
        i = int(short[0])
        raise error(
            f"class {class_name(classes, i, class_names)!r} has {counts[i]} samples, fewer than shot + query = "
            f"{shot} + {query} = {need}" + (f" ({len(short)} classes are short)" if len(short) > 1 else "")
        )
    width = int(counts.max())
    offs = np.arange(width)
    # members: (C, width) row indices per class, padded with -1
    members = np.where(
        offs[None, :] < counts[:, None], order[np.minimum(starts[:, None] + offs[None, :], len(order) - 1)], -1
    )
    step = max(1, episodes if max_keys is None else multiple * max(1, max_keys // (multiple * way * width)))
    cls_rng = np.random.default_rng(seed)  # (E, C) class draws first ...
    key_bits = np.random.PCG64(seed)  # default_rng(seed)'s bit generator
    key_bits.advance(episodes * len(classes))  # ... then the (E, N, width) row keys
    key_rng = np.random.Generator(key_bits)

    def batches() -> Iterator[Episodes]:
        for start in range(0, max(episodes, 1), step):  # no episodes: one empty batch
            e = min(step, episodes - start)
            # classes per episode: the first `way` of a random permutation of the classes
            ep_cls = np.argsort(cls_rng.random((e, len(classes))), axis=1)[:, :way]  # (e, N) positions
            # rows per (episode, way): the `need` smallest random keys among the class's members
            keys = key_rng.random((e, way, width))
            keys[offs[None, None, :] >= counts[ep_cls][:, :, None]] = np.inf
            pick = np.argpartition(keys, need - 1, axis=2)[:, :, :need]
            rows = np.take_along_axis(members[ep_cls], pick, axis=2)  # (e, N, need)
            yield Episodes(support=rows[:, :, :shot], query=rows[:, :, shot:], classes=classes[ep_cls])

    return batches()


def _rows(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """features[index] for an index tensor of any shape: (*index.shape, D)."""
    return features.index_select(0, index.reshape(-1)).view(*index.shape, features.shape[-1])


def run_episodes(
    features: torch.Tensor,
    episodes: Episodes | Iterable[Episodes],
    head: Head,
    batch: int = 50,
) -> np.ndarray:
    """Per-episode accuracy (E,) of ``head`` on pooled ``features`` (n, D). ``episodes``: one
    :class:`Episodes`, or batches of them (:func:`iter_episodes`, sized in multiples of ``batch``
    so that the scored batches are those of one draw)."""
    accs = []
    features = head.prepare(features)
    for part in [episodes] if isinstance(episodes, Episodes) else episodes:
        E, N, Q = part.query.shape
        truth = torch.arange(N, device=features.device).repeat_interleave(Q)  # queries are grouped by way
        support_rows = torch.from_numpy(part.support).to(features.device)
        query_rows = torch.from_numpy(part.query).to(features.device)
        classes = torch.from_numpy(part.classes).to(features.device)
        for s in range(0, E, batch):
            sup, qry = support_rows[s : s + batch], query_rows[s : s + batch]
            # index_select on flat row ids is several times faster than advanced indexing on CPU
            fitted = head.fit(_rows(features, sup), classes[s : s + batch])
            pred = fitted.predict(_rows(features, qry.reshape(len(qry), N * Q)))
            accs.append((pred == truth).float().mean(1).cpu())
    return torch.cat(accs).numpy()


class Episodic(StoreProtocol):
    """N-way K-shot Q-query episodes of one class split; mean and 95% CI over episodes."""

    name = "episodic"
    center_on_base = True
    checks_state_seeds = False
    episodic = True

    def score(self, ctx: EvalContext, head: Head, name: str, warnings: list[str]) -> Scored:
        cfg, store = ctx.cfg, ctx.store
        classes = store.class_split(cfg.split)
        if not classes:
            raise EvaluationError(f"{store.path}: the {cfg.split!r} class split is empty")
        feats, labels = store.gather(classes)
        t1 = time.perf_counter()
        # sampled batch by batch (memory bounded whatever --episodes), the episodes of one draw
        eps = iter_episodes(
            labels,
            classes,
            cfg.way,
            cfg.shots,
            cfg.query,
            cfg.episodes,
            cfg.seed,
            store.class_names,
            multiple=cfg.episode_batch,
        )
        accs = run_episodes(torch.from_numpy(feats).to(ctx.device), eps, head, cfg.episode_batch)
        acc, ci = mean_ci95(accs)
        return Scored(
            t1,
            dict(
                accuracy=round(acc, 3),
                ci95=None if ci is None else round(ci, 3),
                std=None,
                statistic=EPISODE_CI,
                n_seeds=None,
                per_seed=None,
                classes=len(classes),
                per_episode=[round(float(a), 6) for a in accs],
            ),
        )

    def summary_line(self, r: EvalResult) -> str:
        return (
            f"{r.way}-way {r.shots}-shot on {r.classes} {r.split} classes, {r.episodes} episodes, "
            f"{r.classifier}: {r.accuracy:.2f}% ± {r.ci95:.2f} (95% CI over episodes)"
        )

    def describe(self, r: EvalResult) -> str:
        return (
            f"Episodic: {r.way}-way {r.shots}-shot, {r.query} queries per class, {r.episodes} episodes "
            f"over the {r.classes} {r.split} classes, seed {r.seed}; inductive; mean accuracy and "
            f"{r.statistic}; {r.encoder_text()}; classifier {r.classifier}; centring {r.center}; "
            f"hyper-parameters: {r.chosen_text()}."
        )

    def bench_text(self, config: dict[str, Any], seeds: list[int], val: str) -> str:
        ratio = config.get("class_ratio")
        split = (
            f"seed s also draws the class split: a seeded {'/'.join(f'{r:g}' for r in ratio)} base/val/novel "
            f"split of the store's classes (--class-ratio, --split-seed s), so the spread over seeds is the "
            f"spread over class splits"
            if ratio
            else "the store's own class split for every seed"
        )
        return (
            f"Protocol: episodic. Each cell fits the method with --shots K and seed s on the base classes "
            f"(hyper-parameters on val-class episodes), then scores {config.get('episodes', 600)} "
            f"{config.get('way', 5)}-way K-shot {config.get('query', 15)}-query episodes of the novel classes "
            f"(episode seed {config.get('episode_seed', 0)}); {split}. Entries: mean ± std over seeds "
            f"{', '.join(map(str, seeds))} of the per-cell mean episode accuracy (%); paired differences: their "
            f"95% CI is over the seeds (class splits), not over episodes."
        )


PROTOCOLS.register("episodic", Episodic)

__all__ = ["Episodes", "Episodic", "iter_episodes", "run_episodes", "sample_episodes"]
