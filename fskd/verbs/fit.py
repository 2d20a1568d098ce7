"""``fskd adapt``, ``align`` and ``distill``: open the store, give the method its read-only view
(another class split, base-to-new's rows), guard ``--out``, fit, record where every
hyper-parameter came from, save the state."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from fskd.config import AdaptConfig, AlignConfig, DistillConfig
from fskd.errors import ConfigError
from fskd.methods import METHODS
from fskd.methods.base import TrainProgress, guard_out, save_state
from fskd.protocols.base_to_new import restrict_for_fit
from fskd.runtime import dist_info
from fskd.store import FeatureStore, StoreLike, class_split_override
from fskd.store.location import absolute_store, backend_errors

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What adapt/align/distill wrote: the state directory and its metadata."""

    out: str
    method: str
    kind: str
    hparams: dict
    selected_on: dict
    metrics: dict
    seconds: float
    warnings: list[str] = field(default_factory=list)


def fit(kind: str, config: AdaptConfig | AlignConfig | DistillConfig, progress: TrainProgress | None) -> FitResult:
    with backend_errors(config.store):  # a store on object storage that stops answering: one error naming it
        return _fit_store(kind, config, progress)


def _fit_store(
    kind: str, config: AdaptConfig | AlignConfig | DistillConfig, progress: TrainProgress | None
) -> FitResult:
    t0 = time.perf_counter()
    method_cls = METHODS.get(config.method)
    if method_cls.kind != kind:
        a = lambda w: f"an {w}" if w[0] in "aeiou" else f"a {w}"  # noqa: E731
        raise ConfigError(
            f"method {config.method!r} is {a(method_cls.kind)} method, not {a(kind)} method; "
            f"{kind} methods: {', '.join(n for n in METHODS.names() if METHODS.get(n).kind == kind)}"
        )
    opened = FeatureStore.open(config.store)
    opened.check_complete()
    # what the method sees: a read-only view (another class split, base-to-new's rows); the store is not changed
    override = class_split_override(opened, config.class_split, config.class_ratio, config.split_seed)
    store = opened.view(class_split=override)
    if config.base_to_new:
        if override:
            raise ConfigError(
                "--base-to-new splits the classes in half by label order (CoCoOp); drop --class-split / --class-ratio"
            )
        if config.shots < 1:
            raise ConfigError("--base-to-new fits on K shots of the base classes: --shots must be >= 1 (16 in CoCoOp)")
        store = restrict_for_fit(store, config.shots, config.seed, config.hp_selection)
        b2n_desc = store.description
    warnings = [] if config.base_to_new else validation_warnings(store, config)
    out = config.out or str(Path("runs") / kind / f"{config.method}-{config.shots}shot")
    # before any fitting: --out must be new, or an fskd state and --force; never the store or data
    roots = [store.attrs["dataset"].get("root") or None, getattr(config, "root", None)]
    guard_out(out, config.force, store=str(store.path), root=roots[0])
    if roots[1]:
        guard_out(out, config.force, root=roots[1])
    config = config.replace(out=out)
    state = method_cls().fit(store, config, progress)
    state.store_path = absolute_store(state.store_path)  # found again from any working directory
    split = store.attrs["class_split"]
    state.hparams["class_split"] = {k: v for k, v in split.items() if k != "source"}
    state.selected_on["class_split"] = (
        split.get("source") if override or config.base_to_new else f"the store's ({split.get('source')})"
    )
    if config.base_to_new:
        state.metrics["base_to_new"] = b2n_desc
    state.selected_on = provenance(state.hparams, state.selected_on, config)
    state.metrics["warnings"] = warnings
    seconds = round(time.perf_counter() - t0, 3)
    state.metrics["fit_seconds"] = seconds
    if dist_info().is_main:  # under torchrun every rank fits; one writes the state
        save_state(out, state)
    for w in warnings:
        log.warning("%s", w)
    return FitResult(
        out=out,
        method=state.method,
        kind=kind,
        hparams=state.hparams,
        selected_on=state.selected_on,
        metrics=state.metrics,
        seconds=seconds,
        warnings=warnings,
    )


#: below these, validation cannot tell hyper-parameters apart (said, not refused)
MIN_VAL_CLASSES = 5


def validation_warnings(store: StoreLike, config) -> list[str]:
    out = []
    if getattr(config, "hp_selection", None) == "none":
        return out
    n_val = len(store.attrs["class_split"].get("val", []))
    if n_val < MIN_VAL_CLASSES:
        out.append(
            f"only {n_val} val classes (fewer than {MIN_VAL_CLASSES}): episodic hyper-parameters are chosen on "
            f"very few val-class episodes, or fixed; give a split with more val classes (--class-split FILE or "
            f"--class-ratio)"
        )
    if store.has_split("val"):
        rows = int((store.labels("val") >= 0).sum())
        if rows < store.num_classes:
            out.append(
                f"the val split has {rows} rows for {store.num_classes} classes (fewer rows than classes): "
                f"all-way hyper-parameters chosen on it are close to arbitrary"
            )
    return out


#: hyper-parameters that are inputs of the protocol rather than choices
_GIVEN = {
    "shots": "--shots",
    "regime": "--regime / --set regime",
    "student": "--student",
    "teacher": "the store",
    "losses": "--losses",
    "epochs": "--epochs",
    "base_method": "--base-state",
}


def provenance(hparams: dict, selected_on: dict, config) -> dict:
    """Where each hyper-parameter came from, in one vocabulary: ``default``, ``user-set (...)``,
    ``chosen on <validation data>``, or the method's own words (meta-trained, fixed, ...)."""
    user = dict(config.options)
    if getattr(config, "steps", None):
        user["steps"] = list(config.steps)
    if getattr(config, "gamma", None) is not None:
        user["gamma"] = config.gamma
    out = {}
    for k in list(dict.fromkeys([*hparams, *selected_on])):
        on = selected_on.get(k)
        base = k.split(".")[-1]
        if base in user and (on is None or str(on).startswith(("fixed", "given", "default"))):
            out[k] = f"user-set ({base}={json.dumps(user[base])})"
        elif on is None or on in ("fixed", "fixed (default)", "default"):
            out[k] = f"given ({_GIVEN[base]})" if base in _GIVEN else "default"
        elif isinstance(on, str) and on.startswith("val"):
            out[k] = f"chosen on {on}"
        else:
            out[k] = on
    return out


def adapt(config: AdaptConfig, progress: TrainProgress | None = None) -> FitResult:
    return fit("adapt", config, progress)


def align(config: AlignConfig, progress: TrainProgress | None = None) -> FitResult:
    return fit("align", config, progress)


def distill(config: DistillConfig, progress: TrainProgress | None = None) -> FitResult:
    return fit("distill", config, progress)
