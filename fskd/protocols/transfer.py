"""Cross-dataset and domain shift: a state fitted on one store scores another store of the same
encoder, all-way over that store's test rows with the state's one seed (one fitted state, so no
interval).

- **cross-dataset**: other classes; the state's head transfers through the target's class text,
  with no shot of them;
- **domain shift**: the same classes by key (e.g. ImageNet's wnids): the head is fitted on the
  source store's K shots of the state's seed and scores the target's test rows, among the
  target's classes only, as CoOp does for ImageNet-A/R.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fskd.errors import EvaluationError
from fskd.protocols import PROTOCOLS
from fskd.protocols.allway import run_allway, store_rows
from fskd.protocols.base import EvalContext, EvalResult, Protocol, eval_class_split, per_class, state_hp_selection
from fskd.store import FeatureStore

if TYPE_CHECKING:
    from fskd.classifiers.base import Head


class Transfer(Protocol):
    """The checks and the scoring both transfer protocols share; :meth:`target` is each one's own."""

    def run(self, ctx: EvalContext) -> EvalResult:
        cfg, store, state, device = ctx.cfg, ctx.store, ctx.state, ctx.device
        if state is None:
            raise EvaluationError(
                f"--protocol {cfg.protocol} evaluates a fitted state on another store: pass --state DIR"
            )
        method = ctx.method()
        if state.encoder != store.encoder_spec:
            raise EvaluationError(
                f"state {cfg.state} was fitted on features of encoder {state.encoder!r}; {store.path} "
                f"holds {store.encoder_spec!r}: {cfg.protocol} needs the same encoder (extract the "
                f"target with it)"
            )
        if state.config.get("base_to_new"):
            raise EvaluationError(
                f"state {cfg.state} was fitted for base-to-new; fit one on every class for {cfg.protocol}"
            )
        if not store.has_split("test"):
            raise EvaluationError(f"{store.path} has no 'test' sample split (it has {store.splits})")
        k, seed = int(state.config.get("shots", 0)), int(state.config.get("seed", 1))
        test_x, test_y = store.gather(None, ["test"])
        head, test_y, take, train_y, shot, source, names = self.target(ctx, method, test_y, k)
        classes = np.unique(test_y)
        t1 = time.perf_counter()
        scores = run_allway(
            take, train_y, torch.from_numpy(test_x).to(device), test_y, classes, shot, (seed,), head, class_names=names
        )
        acc = float(scores.top1[0]) * 100
        t2 = time.perf_counter()
        enc = store.attrs["encoder"]
        pc = scores.per_class[0]
        assert scores.ece is not None and scores.nll is not None  # inductive: the head's softmax is scored
        return EvalResult(
            protocol=cfg.protocol,
            accuracy=round(acc, 3),
            ci95=None,
            std=None,
            statistic="one fitted state: no interval",
            episodes=None,
            way=None,
            shots=k,
            query=None,
            split="test",
            classifier=state.method,
            encoder=enc["spec"],
            web_scale=bool(enc["web_scale"]),
            seed=None,
            seeds=[seed],
            n_seeds=1,
            per_seed=[round(acc, 3)],
            classes=len(classes),
            center="the state's own (see its hyper-parameters)",
            inductive=True,
            store=str(store.path),
            store_fingerprint=store.fingerprint,
            state=cfg.state,
            seconds=round(t2 - ctx.t0, 4),
            eval_seconds=round(t2 - t1, 4),
            mean_per_class=round(float(np.nanmean(pc)) * 100, 3),
            top5=None if scores.top5 is None else round(float(scores.top5[0]) * 100, 3),
            selected_on=dict(state.selected_on),
            hp_selection=state_hp_selection(state),
            ece=round(float(scores.ece[0]) * 100, 3),
            nll=round(float(scores.nll[0]), 4),
            warnings=[],
            source_store=source,
            per_class=per_class(names, classes, pc, np.bincount(test_y, minlength=int(classes.max()) + 1)),
        )

    def target(
        self, ctx: EvalContext, method: Any, test_y: np.ndarray, k: int
    ) -> tuple[Head, np.ndarray, Callable[[np.ndarray], torch.Tensor], np.ndarray, int, str, list[str]]:
        """(head, test labels in the head's classes, the shots' reader, the train labels it indexes,
        K, the source store, the class names) of this protocol."""
        raise NotImplementedError

    def summary_line(self, r: EvalResult) -> str:
        assert r.source_store is not None and r.seeds is not None
        return (
            f"{r.protocol} from {Path(r.source_store).name} to {Path(r.store).name}, {r.classes} "
            f"classes, {r.classifier} ({r.shots} shots, seed {r.seeds[0]}): {r.accuracy:.2f}% (one "
            f"fitted state: no interval)"
        )

    def bench_text(self, config: dict[str, Any], seeds: list[int], val: str) -> str:
        return (
            f"Protocol: {config.get('protocol')}. Each cell's state is fitted on K shots per class of the source "
            f"store (seed s), {val}; the source column is its all-way accuracy there; {self.bench_how}. Top-1 (%), "
            f"mean ± std over seeds {', '.join(map(str, seeds))} (one fit per seed); Average (targets): the mean "
            f"over the target stores."
        )

    bench_how = ""


class CrossDataset(Transfer):
    """Other classes: the state's head transfers through the target's class text, no shot of them."""

    name = "cross-dataset"
    bench_how = (
        "the other stores' classes are new to it: its head transfers through their class text, with no shot "
        "of them (methods that cannot are n/a)"
    )

    def target(
        self, ctx: EvalContext, method: Any, test_y: np.ndarray, k: int
    ) -> tuple[Head, np.ndarray, Callable[[np.ndarray], torch.Tensor], np.ndarray, int, str, list[str]]:
        store, state, device = ctx.store, ctx.state, ctx.device
        if not method.transfers_to_new_classes:
            raise EvaluationError(
                f"{state.method} cannot classify classes it has no shot of, so it cannot be evaluated "
                f"on another dataset's classes; methods that can: "
                f"{', '.join(ctx.transferring_methods())}"
            )
        if store.text_embeddings() is None:
            raise EvaluationError(f"{store.path} has no class text features; cross-dataset transfer goes through them")
        store = store.view(
            class_split={
                "base": [],
                "val": [],
                "novel": list(range(store.num_classes)),
                "source": "cross-dataset target: no class of this store was learned",
            }
        )
        head = method.head(method.transfer_state(state, store), store, device)

        def take(r: np.ndarray) -> torch.Tensor:
            return torch.zeros(len(r), store.dim, device=device)

        return head, test_y, take, np.zeros(0, np.int64), 0, state.store_path, store.class_names

    def describe(self, r: EvalResult) -> str:
        assert r.seeds is not None
        return (
            f"Cross-dataset: the state fitted on {r.source_store} ({r.shots} shots per class, seed "
            f"{r.seeds[0]}) scores every test row of this store among its {r.classes} classes, none of "
            f"which it learned: its head transfers through their class text, with no shot of them; one fitted "
            f"state, so no interval; {r.encoder_text()}; method {r.classifier}."
        )


class DomainShift(Transfer):
    """The same classes by key: the head fitted on the source's shots scores the target's test rows."""

    name = "domain-shift"
    bench_how = (
        "the other stores' classes are mapped to the source's by class key (wnid); the head is fitted on the "
        "source's shots and scores each target's test rows among the classes present there"
    )

    def target(
        self, ctx: EvalContext, method: Any, test_y: np.ndarray, k: int
    ) -> tuple[Head, np.ndarray, Callable[[np.ndarray], torch.Tensor], np.ndarray, int, str, list[str]]:
        cfg, store, state, device = ctx.cfg, ctx.store, ctx.state, ctx.device
        opened = FeatureStore.open(state.store_path)
        method.check_store(state, opened, cfg.state)
        src = eval_class_split(cfg.replace(class_split=None, class_ratio=None), opened, state)
        if src.encoder_spec != store.encoder_spec or src.dim != store.dim:
            raise EvaluationError(
                f"{store.path} ({store.encoder_spec}, {store.dim}-d) and the state's store {src.path} "
                f"({src.encoder_spec}, {src.dim}-d) hold different features"
            )
        index = {key: i for i, key in enumerate(src.class_keys)}
        unknown = [key for key in store.class_keys if key not in index]
        if unknown:
            raise EvaluationError(
                f"domain shift maps classes by key; {len(unknown)} class(es) of {store.path} are not "
                f"classes of {src.path}: {', '.join(map(repr, unknown[:5]))}"
            )
        head = method.head(state, src, device)
        mapping = np.asarray([index[key] for key in store.class_keys])
        take, train_y = store_rows(src, "train", device)
        return head, mapping[test_y], take, train_y, k, str(src.path), src.class_names

    def describe(self, r: EvalResult) -> str:
        assert r.seeds is not None
        return (
            f"Domain shift: the state fitted on {r.source_store} ({r.shots} shots per class, seed "
            f"{r.seeds[0]}) is fitted on those shots and scores this store's test rows, classes mapped by "
            f"key, among the {r.classes} classes present here; one fitted state, so no interval; "
            f"{r.encoder_text()}; method {r.classifier}."
        )


PROTOCOLS.register("cross-dataset", CrossDataset)
PROTOCOLS.register("domain-shift", DomainShift)
