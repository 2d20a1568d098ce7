"""The ``fskd`` command line: a thin Typer shell over :mod:`fskd.api`.

Each command builds a config, calls one api function and prints a summary. Choices come from
the registries, so ``--help`` lists every registered dataset, encoder, classifier and method.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from enum import Enum
from typing import Annotated

import typer

from fskd import __version__, api
from fskd.config import (
    AdaptConfig,
    AlignConfig,
    DemoConfig,
    DistillConfig,
    EvalConfig,
    ExtractConfig,
)
from fskd.errors import FskdError, OutputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Few-shot image classification with knowledge transferred from vision-language models.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_reg = api.registries()
DatasetName = Enum("DatasetName", {n: n for n in _reg["datasets"]}, type=str)
ClassifierName = Enum("ClassifierName", {n: n for n in _reg["classifiers"]}, type=str)
ENCODER_HELP = "Encoder spec. Families: " + "; ".join(f"{n}: {d}" for n, d in _reg["encoders"].items())


def _ratios(text: str | None, option: str) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{option} takes three comma-separated numbers like 0.5,0.1,0.4, got {text!r}") from None
    return vals  # ConfigError checks count and sum


#: set by commands given --json: errors then go to stderr as one JSON object
_JSON = {"on": False}


def _fail(message: str, kind: str) -> typer.Exit:
    if _JSON["on"]:
        typer.echo(json.dumps({"error": message, "type": kind}), err=True)
    else:
        typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _run(fn, *args, on_result=None, **kwargs):
    """Call into the library; user errors print one clear line (or one JSON object under --json)
    and exit with status 2. ``on_result`` prints a finished result whose output failed to write."""
    try:
        return fn(*args, **kwargs)
    except OutputError as e:
        if e.result is not None and on_result is not None:
            on_result(e.result)
        raise _fail(str(e), type(e).__name__) from None
    except FskdError as e:
        raise _fail(str(e), type(e).__name__) from None
    except OSError as e:  # the environment said no (permissions, a full disk, a path that is a file)
        where = f"{e.filename}: " if e.filename else ""
        raise _fail(f"{where}{e.strerror or e}", type(e).__name__) from None


def _progress_bar():
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


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    _JSON["on"] = False  # each command that takes --json sets it again
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if version:
        typer.echo(__version__)
        raise typer.Exit()


@app.command()
def datasets() -> None:
    """List the registered datasets."""
    for n, d in _reg["datasets"].items():
        typer.echo(f"{n:15s} {d}")


@app.command()
def encoders() -> None:
    """List the registered encoder families (spec strings)."""
    for n, d in _reg["encoders"].items():
        typer.echo(f"{n:15s} {d}")


@app.command()
def classifiers() -> None:
    """List the registered classifier heads and methods."""
    for n, d in {**_reg["classifiers"], **_reg["methods"]}.items():
        typer.echo(f"{n:18s} {d}")


@app.command()
def extract(
    dataset: Annotated[DatasetName, typer.Argument(help="Registered dataset name.")],
    store: Annotated[str, typer.Option(help="Path of the Zarr feature store to write (resumed if it exists).")],
    root: Annotated[str | None, typer.Option(help="Dataset folder.")] = None,
    encoder: Annotated[str, typer.Option(help=ENCODER_HELP)] = "lite0-minilm",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers (default: one per core, at most 8).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="On-disk feature dtype: float16 or float32.")] = "float16",
    chunk_rows: Annotated[int, typer.Option(help="Rows per stored chunk (the unit of resume).")] = 1024,
    class_split: Annotated[str | None, typer.Option(help='JSON {"base": [...], "val": [...], "novel": [...]} of class names.')] = None,
    class_ratio: Annotated[str, typer.Option(help="Seeded base,val,novel class ratios when no split exists.")] = "0.6,0.2,0.2",
    sample_split: Annotated[str | None, typer.Option(help="Seeded per-class train,val,test ratios, e.g. 0.5,0.1,0.4.")] = None,
    split_seed: Annotated[int, typer.Option(help="Seed of the ratio splits.")] = 0,
    templates: Annotated[str | None, typer.Option(help="File of prompt templates, one per line with {}.")] = None,
    descriptions: Annotated[str | None, typer.Option(help="JSON {class name: [descriptions]} for the text features.")] = None,
    skip_bad: Annotated[bool, typer.Option(help="Record unreadable images in the store and go on.")] = False,
    download: Annotated[bool, typer.Option(help="Download the dataset into --root (needs a network).")] = False,
    content_hash: Annotated[bool, typer.Option(help="Fingerprint the image bytes too (reads every file; size and mtime are always checked).")] = False,
) -> None:
    """Encode a dataset once into a Zarr feature store (image features per split, class text features)."""
    cfg = _run(ExtractConfig, dataset=dataset.value, root=root, encoder=encoder, store=store, batch_size=batch_size,
               workers=workers, device=device, dtype=dtype, chunk_rows=chunk_rows, class_split=class_split,
               class_ratio=_ratios(class_ratio, "--class-ratio"), sample_split=_ratios(sample_split, "--sample-split"),
               split_seed=split_seed, templates=templates, descriptions=descriptions, skip_bad=skip_bad, download=download,
               content_hash=content_hash)
    r = _run(api.extract, cfg, _progress_bar())
    if r.rank != 0:
        return
    for split, chunks in r.repaired.items():
        typer.echo(f"repaired {len(chunks)} damaged chunk(s) of {split}: "
                   + "; ".join(f"chunk {c}: {why}" for c, why in list(chunks.items())[:5]))
    if r.reused:
        typer.echo(f"{r.store}: complete, same inputs, every chunk verified; nothing re-encoded ({r.rows})")
    else:
        typer.echo(f"{r.store}: encoded {r.encoded} images in {r.seconds:.1f} s ({r.images_per_s:.1f} img/s"
                   f"{f', {r.world_size} ranks' if r.world_size > 1 else ''}); rows {r.rows}")
    for split, ids in r.skipped.items():
        typer.echo(f"warning: skipped {len(ids)} unreadable file(s) in {split} (stored as label -1, not used): "
                   f"{', '.join(ids[:5])}", err=True)
    for why, n in r.ignored.items():
        typer.echo(f"warning: the dataset listing ignored {n} {why}", err=True)


@app.command()
def info(
    store: Annotated[str, typer.Argument(help="Feature store path.")],
    check: Annotated[bool, typer.Option("--check", help="Verify every chunk against its stored checksum (reads the whole store); exit 2 on damage.")] = False,
) -> None:
    """Show a feature store's encoder, dataset, class split and rows (JSON)."""
    r = _run(api.store_info, store, check=check)
    typer.echo(json.dumps(r, indent=2))
    if r.get("missing_chunks") or (check and not r["check"]["ok"]):
        raise _fail(f"{store} is damaged; run the same `fskd extract` again to re-encode the damaged chunks",
                    "StoreError")


@app.command("eval")
def eval_(
    store: Annotated[str, typer.Option(help="Feature store path.")],
    state: Annotated[str | None, typer.Option(help="State directory written by distill/adapt/align.")] = None,
    protocol: Annotated[str, typer.Option(help="episodic (N-way K-shot on a class split) or allway.")] = "episodic",
    way: Annotated[int, typer.Option(help="Classes per episode.")] = 5,
    shot: Annotated[int, typer.Option(help="Labelled samples per class.")] = 1,
    query: Annotated[int, typer.Option(help="Queries per class per episode.")] = 15,
    episodes: Annotated[int, typer.Option(help="Number of episodes.")] = 600,
    split: Annotated[str, typer.Option(help="Class split of the episodes: novel, val or base.")] = "novel",
    classifier: Annotated[ClassifierName, typer.Option(help="Head when no --state is given.")] = "prototype",
    center: Annotated[str, typer.Option(help="base: subtract the base-class mean (SimpleShot); none.")] = "base",
    seed: Annotated[int, typer.Option(help="Episode sampling seed.")] = 0,
    seeds: Annotated[str, typer.Option(help="All-way seeds, comma-separated.")] = "1,2,3",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    report: Annotated[str | None, typer.Option(help="Write a JSON + Markdown report into this folder.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Evaluate few-shot classification: mean accuracy with 95% CI (episodic) or over seeds (all-way)."""
    _JSON["on"] = as_json
    try:
        seed_list = tuple(int(s) for s in seeds.split(","))
    except ValueError:
        raise typer.BadParameter(f"--seeds takes comma-separated integers, got {seeds!r}") from None
    cfg = _run(EvalConfig, store=store, state=state, protocol=protocol, way=way, shot=shot, query=query, episodes=episodes,
               split=split, classifier=getattr(classifier, "value", classifier), center=center, seed=seed,
               seeds=seed_list, device=device, report=report)
    show = functools.partial(_print_eval, as_json=as_json)
    show(_run(api.evaluate, cfg, on_result=show))


def _print_eval(r, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(r.to_dict()))
        return
    typer.echo(f"{r.summary_line()}  [{r.eval_seconds:.2f} s]")
    for path in r.report:
        typer.echo(f"report: {path}")


def _options(pairs: list[str] | None) -> dict:
    """``--set key=value`` pairs -> dict; values are parsed as JSON when they can be (numbers, lists)."""
    out = {}
    for p in pairs or []:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set takes key=value, got {p!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _methods_help(kind: str) -> str:
    names = [n for n, d in _reg["methods"].items() if d.startswith(f"[{kind}]")]
    return f"Registered {kind} method: {', '.join(names) or '(none yet)'}."


def _fit_summary(r) -> None:
    typer.echo(f"{r.method} ({r.kind}) -> {r.out}  [{r.seconds:.1f} s]")
    if r.hparams:
        typer.echo("hyper-parameters: " + ", ".join(f"{k}={v} ({r.selected_on.get(k, 'fixed')})" for k, v in r.hparams.items()))
    if r.metrics:
        typer.echo("metrics: " + json.dumps(r.metrics))


def _train_bar():
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


SetOption = Annotated[list[str] | None, typer.Option("--set", help="Method option key=value (repeatable).")]
ForceOption = Annotated[bool, typer.Option("--force", help="Replace an existing fskd state at --out (nothing else is ever replaced).")]


@app.command()
def adapt(
    store: Annotated[str, typer.Option(help="Feature store path.")],
    method: Annotated[str, typer.Option(help=_methods_help("adapt"))] = "prototype",
    shots: Annotated[int, typer.Option(help="Labelled samples per class from the train split (all-way fit).")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the shot sampling and training.")] = 1,
    descriptions: Annotated[str | None, typer.Option(help="JSON {class name: [descriptions]} for semantic weights.")] = None,
    out: Annotated[str | None, typer.Option(help="State directory (default runs/adapt/METHOD-Kshot).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    set_: SetOption = None,
    force: ForceOption = False,
) -> None:
    """Fit a few-shot classifier on cached features and save its state (evaluate with fskd eval --state)."""
    cfg = _run(AdaptConfig, store=store, method=method, shots=shots, seed=seed, descriptions=descriptions, out=out,
               device=device, options=_options(set_), force=force)
    _fit_summary(_run(api.adapt, cfg, _train_bar()))


@app.command()
def align(
    store: Annotated[str, typer.Option(help="Feature store path.")],
    method: Annotated[str, typer.Option(help=_methods_help("align"))] = "fma",
    shots: Annotated[int, typer.Option(help="Labelled samples per class from the train split.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed.")] = 1,
    steps: Annotated[str | None, typer.Option(help="Candidate solver step counts, comma-separated (chosen on validation).")] = None,
    gamma: Annotated[str | None, typer.Option(help="Noise augmentation strength(s), comma-separated; several are chosen on validation (default: the method's).")] = None,
    base_state: Annotated[str | None, typer.Option(help="Build on another method's features (state directory).")] = None,
    out: Annotated[str | None, typer.Option(help="State directory (default runs/align/METHOD-Kshot).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    set_: SetOption = None,
    force: ForceOption = False,
) -> None:
    """Learn a cross-modal alignment (flow matching) on cached features and save its state."""
    try:
        step_list = tuple(int(s) for s in steps.split(",")) if steps else None
    except ValueError:
        raise typer.BadParameter(f"--steps takes comma-separated integers, got {steps!r}") from None
    try:
        gammas = tuple(float(g) for g in gamma.split(",")) if gamma else None
    except ValueError:
        raise typer.BadParameter(f"--gamma takes comma-separated numbers, got {gamma!r}") from None
    gammas = gammas[0] if gammas and len(gammas) == 1 else gammas
    cfg = _run(AlignConfig, store=store, method=method, shots=shots, seed=seed, steps=step_list, gamma=gammas,
               base_state=base_state, out=out, device=device, options=_options(set_), force=force)
    _fit_summary(_run(api.align, cfg, _train_bar()))


@app.command()
def distill(
    store: Annotated[str, typer.Option(help="Teacher feature store path.")],
    shots: Annotated[int, typer.Option(help="Labelled samples per class.")] = 4,
    student: Annotated[str, typer.Option(help="Student encoder spec, e.g. timm:resnet18.")] = "timm:resnet18",
    method: Annotated[str, typer.Option(help=_methods_help("distill"))] = "mtkd",
    regime: Annotated[str, typer.Option(help="semi (all classes, K labels + unlabeled) or base-novel (SynTrans).")] = "semi",
    losses: Annotated[str, typer.Option(help="all, none (labels only), or a comma list of loss terms.")] = "all",
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default: the method's).")] = None,
    root: Annotated[str | None, typer.Option(help="Dataset root, if it moved since extraction.")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 1,
    online_teacher: Annotated[bool, typer.Option(help="Run the teacher on augmented views instead of cached features.")] = False,
    out: Annotated[str | None, typer.Option(help="Output directory (default runs/distill/METHOD-Kshot).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    set_: SetOption = None,
    force: ForceOption = False,
) -> None:
    """Distil the store's encoder (teacher) into a small student encoder."""
    cfg = _run(DistillConfig, store=store, shots=shots, student=student, method=method, regime=regime, losses=losses,
               epochs=epochs, root=root, seed=seed, online_teacher=online_teacher, out=out, device=device,
               options=_options(set_), force=force)
    _fit_summary(_run(api.distill, cfg, _train_bar()))


@app.command()
def demo(
    data_root: Annotated[str, typer.Option(help="Folder holding cub35/ and omniglot/.")] = "../shared/data",
    out: Annotated[str, typer.Option(help="Output folder (stores, reports).")] = "runs/demo",
    encoder: Annotated[str, typer.Option(help=ENCODER_HELP)] = "lite0-minilm",
    episodes: Annotated[int, typer.Option(help="Episodes per evaluation.")] = 600,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers.")] = None,
) -> None:
    """The main job on the offline default: extract CUB-35 and Omniglot with lite0-minilm, evaluate."""
    r = _run(api.demo, DemoConfig(data_root=data_root, out=out, encoder=encoder, episodes=episodes, workers=workers),
             _progress_bar())
    typer.echo(open(r.report).read())
    typer.echo(f"report: {r.report}  ({r.seconds:.0f} s)")


def main() -> None:
    app()
