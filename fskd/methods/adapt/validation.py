"""How the adapt methods choose hyper-parameters: the validation task of each regime (episodes of
the val classes; all-way: the train split's shots, queried with val-split rows), the grid search
on them, and the record of each choice in the state (``hparams``, ``selected_on``, ``metrics``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fskd.errors import ConfigError
from fskd.methods.adapt.regimes import Task, allway_rows, sample_episode_rows
from fskd.methods.base import MethodState
from fskd.store import sampling

VAL_CLASSES = "val classes"
VAL_SPLIT = "val split"
VAL_SPLIT_FEW = "val split (min(K, 4) per class)"
NO_VALIDATION = "fixed (--hp-selection none: no validation data)"


@dataclass(frozen=True)
class ValOptions:
    """How validation episodes are drawn (shared option names of every adapt method)."""

    val_way: int = 5
    val_query: int = 15
    val_episodes: int = 300


#: the ranges of the validation-episode options every adapt method takes (its options' RANGES)
VAL_RANGES = {"val_way": (">=", 2), "val_query": (">=", 1), "val_episodes": (">=", 1)}


def check_val_options(o) -> None:
    if o.val_way < 2 or o.val_query < 1 or o.val_episodes < 1:
        raise ConfigError(
            f"val_way must be >= 2, val_query and val_episodes >= 1; got {o.val_way}, {o.val_query}, {o.val_episodes}"
        )


def no_validation(config) -> bool:
    """``--hp-selection none``: the fit reads no val row (each search keeps its fixed default)."""
    return getattr(config, "hp_selection", "few-shot-val") == "none"


def val_episode_rows(
    labels: np.ndarray,
    classes: Sequence[int],
    way: int,
    shot: int,
    query: int,
    episodes: int,
    seed: int,
    class_names: Sequence[str],
    option: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validation episodes of ``classes``: support (E, N, K) and query (E, N, Q) row indices of
    ``labels``, classes (E, N). ``way`` shrinks to the number of classes and ``query`` to what the
    smallest class leaves after ``shot``; a class with fewer than shot + 1 rows is a ConfigError
    naming it (``option``: how the shots were asked for, default ``--shots {shot}``)."""
    counts = sampling.class_counts(labels, classes)
    q = min(query, int(counts.min()) - shot)
    if q < 1:
        i = int(np.argmin(counts))
        raise ConfigError(
            f"{option or f'--shots {shot}'} is larger than available for validation episodes: val class "
            f"{class_names[classes[i]]!r} has {counts[i]} samples, fewer than shots + 1 query = {shot + 1}"
        )
    return sample_episode_rows(labels, classes, min(way, len(classes)), shot, q, episodes, seed)


def episodic_val_task(
    store,
    shots: int,
    opts,
    seed: int,
    device: torch.device,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Task | None:
    """N-way K-shot episodes of the val classes (K = max(1, shots)); None when there are fewer
    than 2 val classes. Queries per class shrink to what the smallest val class allows."""
    val = store.class_split("val") if "val" in store.attrs["class_split"] else []
    if len(val) < 2:
        return None
    x, y = store.gather(val, max_per_class=sampling.CLASS_ROWS)
    k = max(1, shots)
    sup, qry, cls = val_episode_rows(
        y, val, opts.val_way, k, opts.val_query, opts.val_episodes, seed, store.class_names, option=f"--shots {shots}"
    )
    way, q = sup.shape[1], qry.shape[2]
    xt = torch.from_numpy(x).to(device)
    if transform is not None:
        xt = transform(xt)
    E = len(cls)
    si, qi = torch.from_numpy(sup).to(device), torch.from_numpy(qry.reshape(E, -1)).to(device)
    return Task(
        support=xt[si],
        classes=torch.from_numpy(cls).to(device),
        query=xt[qi],
        pool=xt,
        support_idx=si,
        query_idx=qi,
        truth=torch.arange(way, device=device).repeat_interleave(q)[None].expand(E, -1),
        description=f"{opts.val_episodes} {way}-way {k}-shot {q}-query episodes of the {len(val)} val classes (seed {seed})",
        on=VAL_CLASSES,
    )


def allway_val_rows(store, classes: np.ndarray, shots: int, seed: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """The val-split rows of ``classes`` that ``rule`` allows (CoOp: min(K, 4) per class, seeded)."""
    return sampling.allway_val(store, classes, shots, seed, rule)


def allway_val_task(
    store, config, device: torch.device, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> Task | None:
    """One all-way task: K shots per class from the train split (seeded), as queries the val
    rows that ``config.hp_selection`` allows (CoOp: min(K, 4) per class); None under
    ``--hp-selection none``, when the store has no train or val sample split, or the rule leaves no row."""
    shots, seed = config.shots, config.seed
    if no_validation(config) or not (store.has_split("train") and store.has_split("val")):
        return None
    if shots > 0:
        x, y, classes = allway_rows(store, shots, seed)
    else:
        lab = store.labels("train")
        x, classes = None, np.unique(lab[lab >= 0])
    xv, yv = allway_val_rows(store, classes, shots, seed, config.hp_selection)
    if len(yv) == 0:
        return None
    dev = lambda a: transform(torch.from_numpy(a).to(device)) if transform else torch.from_numpy(a).to(device)  # noqa: E731
    if shots > 0:
        support = dev(x).reshape(len(classes), shots, -1)[None]
    else:
        support = torch.zeros(1, len(classes), 0, store.dim, device=device)
    query = dev(xv)[None]
    n_s = len(classes) * shots
    pos = np.full(int(classes.max()) + 1, -1)
    pos[classes] = np.arange(len(classes))
    return Task(
        support=support,
        classes=torch.from_numpy(classes).to(device)[None],
        query=query,
        truth=torch.from_numpy(pos[yv]).to(device)[None],
        pool=torch.cat([support.reshape(n_s, query.shape[-1]), query[0]]),
        support_idx=torch.arange(n_s, device=device).reshape(1, len(classes), shots),
        query_idx=torch.arange(n_s, n_s + len(yv), device=device)[None],
        description=f"all {len(classes)} classes, {shots} shots per class from the train split (seed {seed}); queries: "
        + sampling.describe_validation(config.hp_selection, shots, len(yv), len(classes), seed),
        on=VAL_SPLIT if config.hp_selection == "full-val" else VAL_SPLIT_FEW,
    )


# -- hyper-parameter search -----------------------------------------------------------------------
@dataclass
class Choice:
    """The outcome of a search on one validation task."""

    params: dict
    score: float | None
    on: str
    description: str
    table: list = field(default_factory=list)
    #: what the winning candidate trained, when the search trained something (see keep_allway_head)
    fitted: object = None


def grid_search(candidates: Sequence[dict], score: Callable[[dict], float], task: Task | None, default: dict) -> Choice:
    """The best candidate on ``task`` (ties: the earlier candidate), or ``default`` when there
    is no validation task (recorded as such)."""
    if task is None or not candidates:
        return Choice(dict(default), None, "default (no validation data)", "no validation data")
    best, best_s, table = None, -1.0, []
    for c in candidates:
        s = score(c)
        table.append({**c, "val_acc": round(100 * s, 2)})
        if s > best_s + 1e-9:
            best, best_s = c, s
    return Choice(dict(best), best_s, task.on, task.description, table)


def record(state: MethodState, regime: str, choice: Choice, fixed: dict | None = None) -> None:
    """Put a regime's chosen hyper-parameters (and where they came from) into the state."""
    for k, v in choice.params.items():
        key = f"{regime}.{k}"
        state.hparams[key] = v
        on = NO_VALIDATION if choice.score is None and state.hparams.get("hp_selection") == "none" else choice.on
        state.selected_on[key] = on if not (fixed and k in fixed) else "fixed (--set option)"
    if choice.score is not None:
        state.metrics[f"{regime}.val_acc"] = round(100 * choice.score, 2)
        state.metrics[f"{regime}.val_task"] = choice.description


def record_grid(state: MethodState, sizes: str | None, grid: str, wide: str) -> None:
    """The grid a search ran: the sizes of the ``--set`` lists, or the authors' ``grid`` (on a
    non-joint store with the ``wide`` values for the bridge's text scale added, fskd's addition)."""
    state.hparams["grid"] = grid if sizes is None else sizes
    state.selected_on["grid"] = (
        "fixed (--set option)"
        if sizes is not None
        else f"fixed (the authors' grid; a non-joint store also the wide {wide})"
    )


def hp(state: MethodState, regime: str, name: str):
    return state.hparams[f"{regime}.{name}"]


def fixed_or(value, grid: Sequence) -> tuple:
    """A user-fixed option (a number or a list) replaces the default grid."""
    if value is None:
        return tuple(grid)
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)
