"""Chain rows of ``fskd bench``: pipelines of methods scored as one row.

A chain is a distill stage (the student) with an optional adapt/align stage before it (the
teacher: fitted on the teacher store with the cell's shots and seed, then given to the student as
``--teacher-state``) and an optional adapt/align stage after it (the head: fitted on the store
extracted with the student, with the cell's shots and seed). Each cell runs every stage on its
split and seed, then scores the protocol on the student's features with the last stage's state.

Built-in chains are plain names of ``--methods`` (:data:`BUILTIN_CHAINS`); a grid file names
others in a ``[chains]`` table, a list of stages (``METHOD`` or ``LABEL=METHOD``)::

    methods = ["prototype", "syntrans-e2e", "mine"]
    [chains]
    mine = ["tip-adapter-f", "mtkd", "residual-adapter"]
    [options.mine.mtkd]          # a stage's options: [options.CHAIN.STAGE], or --set CHAIN.STAGE.KEY=VALUE
    epochs = 5

The distill stage takes ``fskd distill``'s settings among its options, as a distill row does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from fskd.errors import ConfigError
from fskd.methods import METHODS
from fskd.methods.base import methods_of_kind

#: the roles of a chain's stages, in order
TEACHER, STUDENT, HEAD = "teacher", "student", "head"


@dataclass(frozen=True)
class ChainDef:
    """A chain as written: its stages (``METHOD`` or ``LABEL=METHOD``) and the options it fixes per
    stage (named in the row's stage text)."""

    stages: tuple[str, ...]
    preset: dict = field(default_factory=dict)  # {stage label: {option: value}}
    help: str = ""


#: chains every grid knows by name
BUILTIN_CHAINS: dict[str, ChainDef] = {
    "syntrans-e2e": ChainDef(
        ("mtkd", "syntrans"),
        {"mtkd": {"regime": "base-novel"}},
        "SynTrans end to end: a base-novel student (the proxy task), then the syntrans head "
        "fitted on its features (episodic)",
    ),
    "syntrans-e2e-label-free": ChainDef(
        ("mtkd", "syntrans"),
        {"mtkd": {"regime": "base-novel", "proxy": "label-free"}},
        "syntrans-e2e with SynTrans's label-free proxy (feature, affinity and "
        "image-text terms, no label term; episodic)",
    ),
    "mtkd-2stage": ChainDef(
        ("mtkd", "residual-adapter"),
        {"mtkd": {"regime": "semi"}},
        "MTKD: stage 1, a semi student; stage 2, the residual adapter on its features (all-way)",
    ),
}


@dataclass(frozen=True)
class Stage:
    """One stage of a chain row: its label in the chain, its method, its role, its options (a
    distill stage: the method's options, its DistillConfig settings in ``fields``)."""

    label: str
    method: str
    role: str
    options: dict
    fields: dict = field(default_factory=dict)
    preset: dict = field(default_factory=dict)

    def text(self) -> str:
        """``mtkd(base-novel, proxy=label-free)``, ``tip-adapter-f (teacher)``, ``syntrans``."""
        given = {**self.options, **self.fields}
        args = ([given["regime"]] if self.role == STUDENT and "regime" in given else []) + [
            f"{k}={given.get(k, v)}" for k, v in sorted(self.preset.items()) if k != "regime"
        ]
        name = self.method if self.label == self.method else f"{self.label}={self.method}"
        return name + (f"({', '.join(args)})" if args else "") + (" (teacher)" if self.role == TEACHER else "")


@dataclass(frozen=True)
class Chain:
    """A chain row resolved for a grid: ``name`` is what ``methods`` names (a built-in or a
    ``[chains]`` entry), ``label`` the row."""

    label: str
    name: str
    stages: tuple[Stage, ...]

    def stage(self, role: str) -> Stage | None:
        return next((s for s in self.stages if s.role == role), None)

    def text(self) -> str:
        """The row's ``stages`` field: ``mtkd(base-novel) -> syntrans``."""
        return " -> ".join(s.text() for s in self.stages)


def chain_names(config) -> list[str]:
    """Every chain name a grid knows: the built-ins, then its own ``[chains]``."""
    return list(BUILTIN_CHAINS) + [n for n in config.chains if n not in BUILTIN_CHAINS]


def is_chain(name: str, config) -> bool:
    return name in BUILTIN_CHAINS or name in config.chains


def check_chain_names(config) -> None:
    """A grid's own chains: no built-in's name, no method's name."""
    for name in config.chains:
        if name in BUILTIN_CHAINS:
            raise ConfigError(
                f"[chains] {name}: {name!r} is a built-in chain "
                f"({' -> '.join(BUILTIN_CHAINS[name].stages)}); give yours another name"
            )
        if name in METHODS.names():
            raise ConfigError(f"[chains] {name}: {name!r} is a method's name; give the chain another name")


def stage_options(label: str, options: dict, stages: list[str]) -> dict[str, dict]:
    """A chain row's options per stage: ``{STAGE: {KEY: VALUE}}`` (``[options.CHAIN.STAGE]``); a key
    ``STAGE.KEY`` (``--set CHAIN.STAGE.KEY=VALUE``) is the same option."""
    out: dict[str, dict] = {}
    for key, value in options.items():
        stage, dot, opt = str(key).partition(".")
        if dot:
            value = {opt: value}
        elif not isinstance(value, dict):
            raise ConfigError(
                f"options of the chain row {label!r}: {key} = {value!r:.60} is not a stage's table; give "
                f"a stage's options as [options.{label}.STAGE] or --set {label}.STAGE.KEY=VALUE "
                f"(stages: {', '.join(stages)})"
            )
        if stage not in stages:
            raise ConfigError(
                f"options of the chain row {label!r} name the stage {stage!r}, which it does not have; "
                f"its stages: {', '.join(stages)}"
            )
        out.setdefault(stage, {}).update(value)
    return out


def resolve_chain(label: str, name: str, config, distill_fields: Callable) -> Chain:
    """The chain row ``label`` (of the chain ``name``) for this grid, checked: its stages' methods,
    kinds and order, each stage's options, and the student's regime against the protocol.
    ``distill_fields(label, options, protocol)``: the runner's split of a distill row's options."""
    definition = BUILTIN_CHAINS.get(name) or ChainDef(tuple(config.chains[name]))
    labels, methods = [], []
    for entry in definition.stages:
        lab, sep, method = str(entry).partition("=")
        lab, method = (lab.strip(), method.strip()) if sep else (lab.strip(), lab.strip())
        if not lab or not method or "=" in method:
            raise ConfigError(f"chain {name}: stage {entry!r}: a stage is METHOD or LABEL=METHOD")
        if lab in labels:
            raise ConfigError(f"chain {name}: two stages are named {lab!r}; name one LABEL={method}")
        labels.append(lab)
        methods.append(method)
    kinds = [METHODS.get(m).kind for m in methods]  # an unknown method lists the valid ones
    shape = (
        f"chain {name} = {list(definition.stages)}: a chain is [teacher], student, [head]: one distill method "
        f"({', '.join(methods_of_kind('distill'))}), optionally after an adapt/align method (its teacher, fitted "
        f"on the store) and optionally before one (the head, fitted on the student's features)"
    )
    if len(methods) < 2 or kinds.count("distill") != 1 or any(k not in ("adapt", "align", "distill") for k in kinds):
        raise ConfigError(shape)
    at = kinds.index("distill")
    if at > 1 or len(methods) - at > 2:
        raise ConfigError(shape)
    roles = ([TEACHER] if at else []) + [STUDENT] + ([HEAD] if len(methods) > at + 1 else [])
    given = stage_options(label, dict(config.options.get(label, {})), labels)
    stages = []
    for lab, method, role in zip(labels, methods, roles, strict=True):
        preset = dict(definition.preset.get(lab, {}))
        options = {**preset, **given.get(lab, {})}
        fields: dict = {}
        if role == STUDENT:
            regime = options.get("regime", "base-novel" if config.protocol == "episodic" else "semi")
            want = {"episodic": "base-novel", "allway": "semi"}.get(config.protocol)
            if want is not None and regime != want:
                why = (
                    "a semi student learned labels of the novel classes, so its novel-class episodes are not a "
                    "few-shot result"
                    if regime == "semi"
                    else "a base-novel student never learned the novel classes, and its chain's head would fit all-way "
                    "shots on features meant for novel-class episodes"
                )
                raise ConfigError(
                    f"{label} ({' -> '.join(definition.stages)}): its student {lab} runs the {regime} "
                    f"regime; --protocol {config.protocol} takes {want} students ({why}). "
                    f"Run {name} with --protocol {'episodic' if regime == 'base-novel' else 'allway'}, "
                    f'or give the stage regime = "{want}"'
                )
            fields, options = distill_fields(label, options, config.protocol)
        cls = METHODS.get(method)
        if cls.options is not None:
            try:
                cls.options.from_dict(options)  # unknown or ill-typed options: now, not mid-grid
            except ConfigError as e:
                raise ConfigError(f"{label}, stage {lab} ({method}): {e}") from None
        stages.append(Stage(lab, method, role, options, fields, preset))
    chain = Chain(label, name, tuple(stages))
    teacher, student = chain.stage(TEACHER), chain.stage(STUDENT)
    if teacher is not None:
        if config.protocol != "allway":
            raise ConfigError(
                f"{label} ({chain.text()}): a teacher stage fits an all-way head on K shots of every "
                f"class, novel ones included, which a student of --protocol {config.protocol} must not "
                f"learn from. Teacher stages run in --protocol allway (semi students); give an episodic "
                f"grid's student a fixed teacher_state instead"
            )
        if student.fields.get("teacher_state"):
            raise ConfigError(
                f"{label} ({chain.text()}): the student has a teacher stage and a teacher_state; give one"
            )
    return chain


def teacher_metrics(metrics: dict) -> dict:
    """A distilled student's teacher, as its fit measured it: accuracy (%) on the held-out labelled
    rows and on the labelled training rows (a bench row's ``teacher``; empty for other methods)."""
    return {k: metrics[k] for k in ("teacher_val_accuracy", "teacher_train_accuracy") if metrics.get(k) is not None}


def stage_dirs(state_dir: Path, scratch: Path, keep: bool) -> dict[str, Path]:
    """Where a chain cell's stages write: the student's state is ``state_dir``; with --keep-states the
    teacher and head states sit beside it (``Kshot-seedS.teacher``, ``Kshot-seedS.head``), else in the
    runner's scratch folder."""
    if keep:
        return {
            TEACHER: state_dir.with_name(state_dir.name + ".teacher"),
            HEAD: state_dir.with_name(state_dir.name + ".head"),
        }
    return {TEACHER: scratch / "teacher", HEAD: scratch / "head"}


def run_chain(runner, cell, chain: Chain, src_path: str, state_dir: Path, student_store: Path):
    """Run a chain cell's stages: the teacher (on the teacher store), the student (distilled with the
    teacher's state when there is one), the student's store, the head (on the student's store).
    Returns (the scored stage's FitResult, the store and the state to evaluate, the row's fields)."""
    plan = runner.plan
    dirs = stage_dirs(state_dir, runner.tmp_student, plan.config.keep_states)
    details, warnings, t0 = [], [], time.perf_counter()

    def fit(stage: Stage, store: str, out: Path, fields: dict | None = None):
        r = runner.fit_stage(cell, stage.method, stage.options, store, out, fields)
        details.append(
            {
                "stage": stage.label,
                "method": stage.method,
                "role": stage.role,
                "hparams": r.hparams,
                "selected_on": r.selected_on,
                "fit_seconds": r.seconds,
                **({"teacher": teacher_metrics(r.metrics)} if teacher_metrics(r.metrics) else {}),
                "state": str(out) if plan.config.keep_states else None,
            }
        )
        warnings.extend(f"{stage.label}: {w}" for w in r.warnings)
        return r

    teacher, student, head = (chain.stage(r) for r in (TEACHER, STUDENT, HEAD))
    fields = dict(student.fields)
    if teacher is not None:
        fit(teacher, src_path, dirs[TEACHER])
        fields["teacher_state"] = str(dirs[TEACHER])
    scored = fit(student, src_path, state_dir, fields)
    extra = runner._student_store(plan.by_path[cell.store], state_dir, student_store, fields.get("root"))
    scored_dir = state_dir
    if head is not None:
        scored = fit(head, str(student_store), dirs[HEAD])
        scored_dir = dirs[HEAD]
    extra.update(stages_detail=details, chain_seconds=round(time.perf_counter() - t0, 3))
    # the row's fit: the scored stage's hyper-parameters; its seconds and warnings: every stage's
    seconds = round(sum(d["fit_seconds"] for d in details), 3)
    return replace(scored, seconds=seconds, warnings=warnings), str(student_store), scored_dir, extra
