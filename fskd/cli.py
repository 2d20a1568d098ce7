"""The ``fskd`` command line: a thin Typer shell over :mod:`fskd.api`.

Each command builds a config, calls one api function and prints a summary. Choices come from
the registries, so ``--help`` lists every registered dataset, encoder, classifier and method.
Conventions: one name per idea (``--shots`` in every verb, defaulting to 4 where it is one
number; ``--seed`` defaulting to 1 everywhere), real choices for every closed set, ``--json`` for
one JSON object (errors too, on stderr), exit status 2 and one ``error:`` line for every user error.
"""

from __future__ import annotations

from fskd.runtime import cpu_thread_policy

cpu_thread_policy()  # before torch loads (through fskd.api): idle OpenMP threads sleep

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from enum import Enum  # noqa: E402
from typing import Annotated  # noqa: E402

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from fskd import __version__, catalog  # noqa: E402
from fskd.config import (  # noqa: E402
    AdaptConfig,
    AlignConfig,
    BenchConfig,
    DemoConfig,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    ExtractConfig,
    PredictConfig,
)
from fskd.errors import FskdError, OutputError  # noqa: E402

#: old or alternative spellings -> the one name (kept working, not shown in --help)
ALIASES = {"--shot": "--shots"}
COMMAND_ALIASES = {"align": {"--steps": "--flow-steps"}}


def _usage_line(e) -> str:
    """One line for a command-line usage error (a mistyped option, a value of the wrong type, a
    choice that does not exist), in the user's words, with a suggestion where one is close."""
    import difflib
    import re

    msg = " ".join(e.format_message().split())
    param = getattr(e, "param", None)
    bad = re.search(r"'([^']*)' is not one of (.*)$", msg)
    if param is not None and bad:
        names = re.findall(r"'([^']*)'", bad.group(2))
        opt = (param.opts or [param.name])[0]
        close = difflib.get_close_matches(bad.group(1), names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        msg = f"{opt} {bad.group(1)!r} is not one of {', '.join(names)}{hint}"
    msg = msg.replace("Value error, ", "")
    where = getattr(getattr(e, "ctx", None), "command_path", None)
    return f"{msg} (see `{where} --help`)" if where else msg


class _Group(TyperGroup):
    """Rewrites aliases before parsing: ``--shot`` -> ``--shots``; align's ``--steps`` ->
    ``--flow-steps`` (``--set steps=`` is the optimiser's steps elsewhere). Usage errors are one
    line (one JSON object with ``--json``), like every other error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        usage_error = typer.BadParameter.__mro__[1]  # UsageError of the click typer uses (it vendors its own)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except usage_error as e:
            _JSON["on"] = "--json" in argv
            # `fskd` alone prints the help and raises with no message: nothing more to say
            code = _fail(_usage_line(e), "UsageError").exit_code if e.format_message() else e.exit_code
        except typer.Abort:
            code = _fail("interrupted (Ctrl-C)", "Interrupted", 130).exit_code
        if standalone_mode:
            sys.exit(code)
        return code

    def parse_args(self, ctx, args):
        command = next((a for a in args if not a.startswith("-")), None)
        table = {**ALIASES, **COMMAND_ALIASES.get(command, {})}
        out = []
        for a in args:
            name, eq, value = a.partition("=")
            out.append(table.get(name, name) + eq + value if name in table else a)
        return super().parse_args(ctx, out)


app = typer.Typer(
    cls=_Group,
    add_completion=True,
    no_args_is_help=True,
    help="Few-shot image classification with knowledge transferred from vision-language models.",
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

_reg = catalog.registries()  # declarations only: --help imports no torch


def _choices(name: str, values) -> type[Enum]:
    return Enum(name, {v: v for v in values}, type=str)


DatasetName = _choices("DatasetName", _reg["datasets"])
ClassifierName = _choices("ClassifierName", _reg["classifiers"])
MethodName = _choices("MethodName", _reg["methods"])
AdaptMethod = _choices("AdaptMethod", catalog.methods_of("adapt"))
AlignMethod = _choices("AlignMethod", catalog.methods_of("align"))
DistillMethod = _choices("DistillMethod", catalog.methods_of("distill"))
Protocol = _choices("Protocol", catalog.protocol_choices())
ClassSplit = _choices("ClassSplit", ["novel", "val", "base"])
Center = _choices("Center", ["base", "none"])
HpSelection = _choices("HpSelection", ["few-shot-val", "full-val", "none"])
Dtype = _choices("Dtype", ["float16", "float32"])
Regime = _choices("Regime", ["semi", "base-novel"])
ENCODER_HELP = "Encoder spec. Families: " + "; ".join(f"{n}: {d}" for n, d in _reg["encoders"].items())

EPISODIC, ALLWAY, OUTPUT, SPLIT, FIT = "Episodic protocol", "All-way protocol", "Output", "Class split", "Fitting"
VIEWS, STORAGE = "Augmented views", "Object storage"
STORE_HELP = "Feature store: a path, or a URL (s3://bucket/x.zarr, gs://..., az://..., memory://...)."
StorageOptions = Annotated[
    str | None,
    typer.Option(
        "--storage-options",
        help="JSON object passed to fsspec for --store URLs (endpoint_url, key, secret, anon, "
        "client_kwargs, ...; fskd_max_requests bounds reads in flight); default $FSKD_STORAGE_OPTIONS. Never saved.",
        metavar="JSON",
        rich_help_panel=STORAGE,
    ),
]


def _storage(options: str | None) -> None:
    """``--storage-options``: for every store URL this command opens (light: no torch)."""
    if options is not None:
        _run(catalog.configure_storage, options)


def _api():
    """``fskd.api``, imported by the commands that compute (torch and the used modules load then);
    ``--help``, the listings and ``fskd info`` never import it."""
    from fskd import api
    from fskd.runtime import torch_threads_per_core

    torch_threads_per_core()
    return api


def _value(choice) -> str:
    return getattr(choice, "value", choice)


def _ratios(text: str | None, option: str) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(
            f"{option} takes three comma-separated numbers like 0.5,0.1,0.4, got {text!r}"
        ) from None
    return vals  # ConfigError checks count, range and sum


def _ints(text: str | None, option: str) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{option} takes comma-separated integers, got {text!r}") from None


#: set by commands given --json: errors then go to stderr as one JSON object
_JSON = {"on": False}


def _fail(message: str, kind: str, code: int = 2) -> typer.Exit:
    if _JSON["on"]:
        typer.echo(json.dumps({"error": message, "type": kind}), err=True)
    else:
        typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


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
        raise _fail(str(e), type(e).__name__, getattr(e, "exit_code", 2)) from None
    except KeyboardInterrupt:
        raise _fail(
            "interrupted (Ctrl-C); what was finished is kept, nothing half-written is used", "Interrupted", 130
        ) from None
    except OSError as e:  # the environment said no (permissions, a full disk, a path that is a file)
        where = f"{e.filename}: " if e.filename else ""
        raise _fail(f"{where}{e.strerror or e}", type(e).__name__) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


#: the warnings this command has said on stderr (a log record or a printed line): each is said once
_SAID: set[str] = set()


def _warn(text: str) -> None:
    """Print a result's warning unless the library already logged it in this command."""
    if any(text in said for said in _SAID):
        return
    _SAID.add(text)
    typer.echo(f"warning: {text}", err=True)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each record (not the stream of the first call), so
    repeated in-process invocations (tests, notebooks) never log into a closed stream. A warning
    already said in this command is not said again."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            msg = record.getMessage()
            if msg in _SAID:
                return
            _SAID.add(msg)
        super().emit(record)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    _JSON["on"] = False  # each command that takes --json sets it again
    _SAID.clear()
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        handlers=[_StderrHandler()],
    )
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    # long jobs off a terminal (a log file, nohup, a scheduler) say how far they are, a line at a time
    logging.getLogger("fskd.progress").setLevel(logging.INFO)


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
def methods(
    method: Annotated[
        MethodName | None, typer.Argument(help="A method: list its --set options.", metavar="[METHOD]")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """List the methods, or one method's --set options with their defaults and meaning."""
    _JSON["on"] = as_json
    if method is None:
        if as_json:  # "[kind] description" -> its parts
            rows = [
                dict(zip(("name", "kind", "description"), (n, *d[1:].split("] ", 1)), strict=True))
                for n, d in _reg["methods"].items()
            ]
            typer.echo(json.dumps({"methods": rows}))
            return
        for n, d in _reg["methods"].items():
            typer.echo(f"{n:18s} {d}")
        return
    info = _run(catalog.method_info, _value(method))
    if as_json:
        typer.echo(json.dumps(info))
        return
    typer.echo(f"{info['name']} ({info['kind']}): {info['description']}")
    recipes = info.get("recipes") or []
    if recipes:
        typer.echo("recipes (--set recipe=NAME):")
        w = max(len(r["name"]) + 10 * r["default"] for r in recipes)
        for r in recipes:
            typer.echo(f"  {(r['name'] + (' (default)' if r['default'] else '')).ljust(w)}  {r['description']}")
    for label, recipe, opts in (
        [(f"recipe {r['name']}", r, r["options"]) for r in recipes] if recipes else [("", None, info["options"])]
    ):
        call = f"fskd {info['kind']} --method {info['name']}" + (
            f" --set recipe={recipe['name']}" if recipe and not recipe["default"] else ""
        )
        if not opts:
            typer.echo(f"no --set options{' of ' + label if label else ''}")
            continue
        typer.echo(f"--set options{' of ' + label if label else ''} ({call} --set KEY=VALUE):")
        w = max(len(o["name"]) for o in opts)
        for o in opts:
            rng = "".join(f", {r}" for r in (o["range"], f"<= {o['max']}" if o.get("max") else "") if r)
            typer.echo(f"  {o['name'].ljust(w)}  default {o['default']}{rng}; {o['type']}. {o['meaning']}")


@app.command()
def extract(
    dataset: Annotated[DatasetName, typer.Argument(help="Registered dataset name.", metavar="DATASET")],
    store: Annotated[
        str,
        typer.Option(
            help="Zarr feature store to write (resumed if it exists): a path, or a URL (s3://bucket/x.zarr, gs://, az://, memory://).",
            metavar="PATH|URL",
        ),
    ],
    root: Annotated[str | None, typer.Option(help="Dataset folder.", metavar="PATH")] = None,
    encoder: Annotated[str, typer.Option(help=ENCODER_HELP, metavar="SPEC")] = "lite0-minilm",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.", metavar="N")] = 64,
    workers: Annotated[
        int | None, typer.Option(help="DataLoader workers (default: one per core, at most 8).", metavar="N")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...", metavar="DEVICE")] = "auto",
    dtype: Annotated[Dtype, typer.Option(help="On-disk feature dtype.")] = "float16",
    chunk_rows: Annotated[
        int,
        typer.Option(
            help="Rows per stored chunk (the unit of resume: an interrupted extract keeps every finished chunk).",
            metavar="N",
        ),
    ] = 256,
    class_split: Annotated[
        str | None,
        typer.Option(
            help='JSON {"base": [...], "val": [...], "novel": [...]} of class names.',
            metavar="PATH",
            rich_help_panel=SPLIT,
        ),
    ] = None,
    class_ratio: Annotated[
        str,
        typer.Option(
            help="Seeded base,val,novel class ratios when no split exists.", metavar="LIST", rich_help_panel=SPLIT
        ),
    ] = "0.6,0.2,0.2",
    sample_split: Annotated[
        str | None,
        typer.Option(
            help="Seeded per-class train,val,test ratios, e.g. 0.5,0.1,0.4.", metavar="LIST", rich_help_panel=SPLIT
        ),
    ] = None,
    split_seed: Annotated[int, typer.Option(help="Seed of the ratio splits.", metavar="N", rich_help_panel=SPLIT)] = 0,
    templates: Annotated[
        str | None,
        typer.Option(
            help="File of prompt templates, one per line with {}; default: the dataset's own (CoOp / Tip-Adapter) or fskd's ensemble.",
            metavar="PATH",
        ),
    ] = None,
    descriptions: Annotated[
        str | None, typer.Option(help="JSON {class name: [descriptions]} for the text features.", metavar="PATH")
    ] = None,
    skip_bad: Annotated[bool, typer.Option(help="Record unreadable images in the store and go on.")] = False,
    download: Annotated[bool, typer.Option(help="Download the dataset into --root (needs a network).")] = False,
    content_hash: Annotated[
        bool,
        typer.Option(help="Fingerprint the image bytes too (reads every file; size and mtime are always checked)."),
    ] = False,
    augment_views: Annotated[
        int,
        typer.Option(
            help="Also store V augmented views (random resized crop + flip) of train rows, for tip-adapter(-f) and fma; 0: none.",
            metavar="V",
            rich_help_panel=VIEWS,
        ),
    ] = 0,
    augment_shots: Annotated[
        int,
        typer.Option(
            help="Views only for the all-way K-shot draws of --augment-seeds (and so every fewer-shot draw of them); 0: every train row.",
            metavar="K",
            rich_help_panel=VIEWS,
        ),
    ] = 0,
    augment_seeds: Annotated[
        str,
        typer.Option(
            help="Seeds whose all-way shots get views with --augment-shots.", metavar="LIST", rich_help_panel=VIEWS
        ),
    ] = "1,2,3",
    augment_scale: Annotated[
        str,
        typer.Option(
            help="Crop area range min,max (Tip-Adapter: 0.5,1; CoOp and FMA: 0.08,1).",
            metavar="LIST",
            rich_help_panel=VIEWS,
        ),
    ] = "0.5,1",
    augment_seed: Annotated[
        int,
        typer.Option(
            help="Seed of the crops (each view's crop depends on it, the row and the view only).",
            metavar="N",
            rich_help_panel=VIEWS,
        ),
    ] = 0,
    storage_options: StorageOptions = None,
) -> None:
    """Encode a dataset once into a Zarr feature store (image features per split, class text features)."""
    _storage(storage_options)
    cfg = _run(
        ExtractConfig,
        dataset=_value(dataset),
        root=root,
        encoder=encoder,
        store=store,
        batch_size=batch_size,
        workers=workers,
        device=device,
        dtype=_value(dtype),
        chunk_rows=chunk_rows,
        class_split=class_split,
        class_ratio=_ratios(class_ratio, "--class-ratio"),
        sample_split=_ratios(sample_split, "--sample-split"),
        split_seed=split_seed,
        templates=templates,
        descriptions=descriptions,
        skip_bad=skip_bad,
        download=download,
        content_hash=content_hash,
        augment_views=augment_views,
        augment_shots=augment_shots,
        augment_seeds=_ints(augment_seeds, "--augment-seeds") or (),
        augment_scale=_ratios(augment_scale, "--augment-scale"),
        augment_seed=augment_seed,
    )
    r = _run(_api().extract, cfg)
    if r.rank != 0:
        return
    for split, chunks in r.repaired.items():
        typer.echo(
            f"repaired {len(chunks)} damaged chunk(s) of {split}: "
            + "; ".join(f"chunk {c}: {why}" for c, why in list(chunks.items())[:5])
        )
    if r.reused:
        typer.echo(
            f"{r.store}: complete, same inputs, every chunk verified; nothing re-encoded ({r.rows}"
            + (f"; views of {r.views_rows} train rows" if augment_views else "")
            + ")"
        )
    else:
        done = [f"encoded {r.encoded} images"] + (
            [f"{r.views_encoded} augmented views of {r.views_rows} train rows"] if augment_views else []
        )
        speed = f"{r.images_per_s:.1f} img/s" if r.encoded else "splits reused"
        ranks = f", {r.world_size} ranks" if r.world_size > 1 else ""
        typer.echo(f"{r.store}: {' and '.join(done)} in {r.seconds:.1f} s ({speed}{ranks}); rows {r.rows}")
    for split, ids in r.skipped.items():
        typer.echo(
            f"warning: skipped {len(ids)} unreadable file(s) in {split} (stored as label -1, not used): "
            f"{', '.join(ids[:5])}",
            err=True,
        )


def _human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _print_info(r: dict) -> None:
    def names(v: list[str], most: int = 12) -> str:
        return ", ".join(v[:most]) + (f", ... ({len(v) - most} more)" if len(v) > most else "")

    enc = f"{r['encoder']} ({r['dim']}-d images; {'joint image-text space' if r['joint'] else 'separate text space'}; "
    enc += f"{'saw' if r['web_scale'] else 'did not see'} web-scale data)"
    lines = [
        f"store     {r['path']}  ({_human_size(r['size_bytes'])} on disk, {r['dtype']}, {r['chunk_rows']} rows per chunk)",
        f"encoder   {enc}",
        f"dataset   {r['dataset']} from {r['root']}; created {r['created']} by fskd {r['fskd_version']}",
        "rows      " + ", ".join(f"{s} {n:,}" for s, n in r["rows"].items()) + f"  (sample split: {r['sample_split']})",
        f"complete  {'yes' if r['complete'] and not r['missing_chunks'] else 'NO'}",
        f"classes   {r['classes']}; class split from {r['class_split_source']}:",
    ]
    lines += [f"  {k:6s} {len(v):4d}: {names(v)}" for k, v in r["class_names"].items()]
    text = (
        f"{r['text_source']} ({r['templates_source']}): "
        + "; ".join(r["templates"][:3])
        + (" ..." if len(r["templates"]) > 3 else "")
    )
    lines.append(f"text      {text if r['text'] else 'none (the encoder has no text tower)'}")
    if r.get("views"):
        v = r["views"]
        lines.append(
            f"views     {v['description']}; {v['rows']:,} rows"
            + ("" if v["complete"] else " (INCOMPLETE: run the same `fskd extract --augment-views` again)")
        )
    if r["skipped"]:
        lines.append("skipped   " + ", ".join(f"{n} unreadable file(s) in {s}" for s, n in r["skipped"].items()))
    if r["ignored_files"]:
        lines.append("ignored   " + "; ".join(f"{n} {why}" for why, n in r["ignored_files"].items()))
    if r["missing_chunks"]:
        lines.append("MISSING   " + "; ".join(r["missing_chunks"][:10]))
    if "check" in r:
        c = r["check"]
        lines.append(
            f"check     {'every chunk matches its checksum' if c['ok'] else 'DAMAGED'} "
            f"({sum(c['chunks_verified'].values())} chunks verified)"
        )
        for split, d in c["damaged"].items():
            lines += [f"  {split} chunk {k}: {why}" for k, why in d.items()]
    typer.echo("\n".join(lines))


@app.command()
def info(
    store: Annotated[str, typer.Argument(help=STORE_HELP, metavar="STORE")],
    check: Annotated[
        bool,
        typer.Option(
            "--check", help="Verify every chunk against its stored checksum (reads the whole store); exit 2 on damage."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Show a feature store: encoder, dataset, classes per split, rows, size, text; --check verifies it."""
    _JSON["on"] = as_json
    _storage(storage_options)
    r = _run(catalog.store_info, store, check=check)
    if as_json:
        typer.echo(json.dumps(r, indent=2))
    else:
        _print_info(r)
    if r.get("missing_chunks") or (check and not r["check"]["ok"]):
        raise _fail(
            f"{store} is damaged; run the same `fskd extract` again to re-encode the damaged chunks", "StoreError"
        )


SplitFile = Annotated[
    str | None,
    typer.Option(
        "--class-split",
        help='Override the stored class split: JSON {"base"|"val"|"novel": [class names]}.',
        metavar="PATH",
        rich_help_panel=SPLIT,
    ),
]
SplitRatio = Annotated[
    str | None,
    typer.Option(
        "--class-ratio",
        help="Override the stored class split with seeded base,val,novel ratios.",
        metavar="LIST",
        rich_help_panel=SPLIT,
    ),
]
SplitSeed = Annotated[
    int, typer.Option("--split-seed", help="Seed of --class-ratio.", metavar="N", rich_help_panel=SPLIT)
]


@app.command("eval")
def eval_(
    store: Annotated[str, typer.Option(help=STORE_HELP, metavar="PATH|URL")],
    state: Annotated[
        str | None, typer.Option(help="State directory written by distill/adapt/align.", metavar="DIR")
    ] = None,
    protocol: Annotated[
        Protocol,
        typer.Option(
            help=(
                "episodic (N-way K-shot on a class split), allway (all-way), base-to-new (CoCoOp; a state fitted with "
                "--base-to-new), cross-dataset or domain-shift (a --state fitted on another store of the same encoder)."
            )
        ),
    ] = "episodic",
    shots: Annotated[int, typer.Option("--shots", help="Labelled samples per class.", metavar="K")] = 4,
    seed: Annotated[int, typer.Option(help="Episode sampling seed.", metavar="N", rich_help_panel=EPISODIC)] = 1,
    way: Annotated[int, typer.Option(help="Classes per episode.", metavar="N", rich_help_panel=EPISODIC)] = 5,
    query: Annotated[
        int, typer.Option(help="Queries per class per episode.", metavar="N", rich_help_panel=EPISODIC)
    ] = 15,
    episodes: Annotated[int, typer.Option(help="Number of episodes.", metavar="N", rich_help_panel=EPISODIC)] = 600,
    split: Annotated[ClassSplit, typer.Option(help="Class split of the episodes.", rich_help_panel=EPISODIC)] = "novel",
    seeds: Annotated[
        str, typer.Option(help="All-way seeds, comma-separated.", metavar="LIST", rich_help_panel=ALLWAY)
    ] = "1,2,3",
    transductive: Annotated[
        bool,
        typer.Option(
            "--transductive",
            help="TransCLIP: classify all test rows at once on top of the head's predictions (allway, base-to-new).",
            rich_help_panel=ALLWAY,
        ),
    ] = False,
    batch: Annotated[
        int | None,
        typer.Option(
            "--batch",
            help="With --transductive: score the test rows in batches of at most B rows ... (the realistic setting; with --active-classes).",
            metavar="B",
            rich_help_panel=ALLWAY,
        ),
    ] = None,
    active_classes: Annotated[
        int | None,
        typer.Option(
            "--active-classes",
            help="... each drawn from C random classes (with --batch).",
            metavar="C",
            rich_help_panel=ALLWAY,
        ),
    ] = None,
    classifier: Annotated[ClassifierName, typer.Option(help="Head when no --state is given.")] = "prototype",
    center: Annotated[
        Center, typer.Option(help="base: subtract the base-class mean (SimpleShot; the support mean all-way); none.")
    ] = "base",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...", metavar="DEVICE")] = "auto",
    class_split: SplitFile = None,
    class_ratio: SplitRatio = None,
    split_seed: SplitSeed = 0,
    report: Annotated[
        str | None,
        typer.Option(
            help="Write a JSON + Markdown report into this folder (never over an earlier one).",
            metavar="DIR",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.", rich_help_panel=OUTPUT)] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Evaluate few-shot classification: mean accuracy with its 95% CI (over episodes, or Student t over seeds)."""
    _JSON["on"] = as_json
    _storage(storage_options)
    proto = _value(protocol).replace("all-way", "allway")
    cfg = _run(
        EvalConfig,
        store=store,
        state=state,
        protocol=proto,
        way=way,
        shots=shots,
        query=query,
        episodes=episodes,
        split=_value(split),
        classifier=_value(classifier),
        center=_value(center),
        seed=seed,
        seeds=_ints(seeds, "--seeds") or (),
        device=device,
        report=report,
        class_split=class_split,
        class_ratio=_ratios(class_ratio, "--class-ratio"),
        split_seed=split_seed,
        transductive=transductive,
        batch=batch,
        active_classes=active_classes,
    )
    show = functools.partial(_print_eval, as_json=as_json)
    show(_run(_api().evaluate, cfg, on_result=show))


def _print_eval(r, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(r.to_dict()))
        return
    typer.echo(f"{r.summary_line()}  [{r.eval_seconds:.2f} s]")
    for w in r.warnings:
        _warn(w)
    for path in r.report:
        typer.echo(f"report: {path}")


@app.command()
def compare(
    a: Annotated[str, typer.Argument(help="Report JSON of method A (fskd eval --report).", metavar="A.json")],
    b: Annotated[str, typer.Argument(help="Report JSON of method B, same store, episodes or seeds.", metavar="B.json")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Paired difference A - B of two evaluations of the same experiment, with its 95% CI."""
    _JSON["on"] = as_json
    r = _run(_api().compare, a, b)
    if as_json:
        typer.echo(json.dumps(r))
        return
    ci = "no interval (one seed)" if r["ci95"] is None else f"± {r['ci95']:.2f}"
    verdict = (
        ""
        if r["excludes_zero"] is None
        else ("; the interval excludes 0" if r["excludes_zero"] else "; the interval includes 0 (no clear difference)")
    )
    typer.echo(
        f"{r['a']} {r['a_accuracy']:.2f}% vs {r['b']} {r['b_accuracy']:.2f}% ({r['protocol']}, n={r['n']}): "
        f"difference {r['difference']:+.2f} {ci} [{r['statistic']}]{verdict}"
    )


def _options(pairs: list[str] | None) -> dict:
    """``--set key=value`` pairs -> dict; values are parsed as JSON when they can be (numbers, lists)."""
    out = {}
    for p in pairs or []:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set takes KEY=VALUE, got {p!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
        except RecursionError:  # [[[[... deeper than the parser's stack
            raise _fail(f"--set {key}: the value is nested too deeply to be an option", "ConfigError") from None
    return out


def _short(v, width: int = 48) -> str:
    text = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    if len(text) <= width:
        return text
    n = f"{len(v)} entries, " if isinstance(v, (dict, list)) else ""
    return text[: width - 20].rstrip() + f"... ({n}see state.json)"


def _fit_summary(r, as_json: bool = False) -> None:
    """A short table; the full detail lives in state.json and under --json."""
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(r), default=str))
        return
    typer.echo(f"{r.method} ({r.kind}) -> {r.out}  [{r.seconds:.1f} s]")
    if r.hparams:
        w = max(len(k) for k in r.hparams)
        typer.echo(f"  {'hyper-parameter'.ljust(w)}  {'value'.ljust(48)}  from")
        for k, v in r.hparams.items():
            typer.echo(f"  {k.ljust(w)}  {_short(v).ljust(48)}  {_short(r.selected_on.get(k, 'default'), 60)}")
    scalars = {k: v for k, v in r.metrics.items() if isinstance(v, (int, float, str)) or v is None}
    if scalars:
        typer.echo("metrics: " + ", ".join(f"{k}={_short(v, 60)}" for k, v in scalars.items()))
    for w in r.warnings:
        _warn(w)


SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Method option (repeatable); `fskd methods METHOD` lists them.",
        metavar="KEY=VALUE",
        rich_help_panel=FIT,
    ),
]
ForceOption = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Replace an existing fskd state at --out (nothing else is ever replaced).",
        rich_help_panel=OUTPUT,
    ),
]
JsonOption = Annotated[
    bool,
    typer.Option(
        "--json", help="Print the full result as one JSON object (errors too, on stderr).", rich_help_panel=OUTPUT
    ),
]
SeedOption = Annotated[int, typer.Option(help="Seed of the shot sampling and training.", metavar="N")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, ...", metavar="DEVICE")]
StoreOption = Annotated[str, typer.Option(help=STORE_HELP, metavar="PATH|URL")]


HpSelectionOption = Annotated[
    HpSelection,
    typer.Option(
        "--hp-selection",
        help=(
            "What chooses the hyper-parameters: few-shot-val (CoOp: min(K, 4) val-split rows per class; val-class episodes "
            "in the episodic regime), full-val (the whole val split) or none (no validation data: each method's fixed "
            "values, named in the state)."
        ),
        rich_help_panel=FIT,
    ),
]


BaseToNewOption = Annotated[
    bool,
    typer.Option(
        "--base-to-new",
        help="CoCoOp base-to-new: fit on the K shots of the first half of the classes only; evaluate with --protocol base-to-new.",
        rich_help_panel=FIT,
    ),
]


def _split_kwargs(class_split, class_ratio, split_seed, hp_selection, base_to_new=False) -> dict:
    return {
        "class_split": class_split,
        "class_ratio": _ratios(class_ratio, "--class-ratio"),
        "split_seed": split_seed,
        "hp_selection": _value(hp_selection),
        "base_to_new": base_to_new,
    }


@app.command()
def adapt(
    store: StoreOption,
    method: Annotated[
        AdaptMethod, typer.Option(help="The adapt method (`fskd methods` describes them).", rich_help_panel=FIT)
    ] = "prototype",
    shots: Annotated[
        int, typer.Option(help="Labelled samples per class from the train split (all-way fit).", metavar="K")
    ] = 4,
    seed: SeedOption = 1,
    descriptions: Annotated[
        str | None, typer.Option(help="JSON {class name: [descriptions]} for semantic weights.", metavar="PATH")
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(help="State directory (default runs/adapt/METHOD-Kshot).", metavar="DIR", rich_help_panel=OUTPUT),
    ] = None,
    device: DeviceOption = "auto",
    set_: SetOption = None,
    class_split: SplitFile = None,
    class_ratio: SplitRatio = None,
    split_seed: SplitSeed = 0,
    hp_selection: HpSelectionOption = "few-shot-val",
    base_to_new: BaseToNewOption = False,
    force: ForceOption = False,
    as_json: JsonOption = False,
    storage_options: StorageOptions = None,
) -> None:
    """Fit a few-shot classifier on cached features and save its state (evaluate with fskd eval --state)."""
    _JSON["on"] = as_json
    _storage(storage_options)
    cfg = _run(
        AdaptConfig,
        store=store,
        method=_value(method),
        shots=shots,
        seed=seed,
        descriptions=descriptions,
        out=out,
        device=device,
        options=_options(set_),
        force=force,
        **_split_kwargs(class_split, class_ratio, split_seed, hp_selection, base_to_new),
    )
    _fit_summary(_run(_api().adapt, cfg), as_json)


@app.command()
def align(
    store: StoreOption,
    method: Annotated[AlignMethod, typer.Option(help="The align method.", rich_help_panel=FIT)] = "fma",
    shots: Annotated[int, typer.Option(help="Labelled samples per class from the train split.", metavar="K")] = 4,
    seed: SeedOption = 1,
    flow_steps: Annotated[
        str | None,
        typer.Option(
            "--flow-steps",
            help="Candidate solver step counts of the flow, comma-separated (chosen on validation).",
            metavar="LIST",
            rich_help_panel=FIT,
        ),
    ] = None,
    gamma: Annotated[
        str | None,
        typer.Option(
            help="Noise augmentation strength(s), comma-separated; several are chosen on validation (default: the method's).",
            metavar="LIST",
            rich_help_panel=FIT,
        ),
    ] = None,
    base_state: Annotated[
        str | None, typer.Option(help="Build on another method's features (state directory).", metavar="DIR")
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(help="State directory (default runs/align/METHOD-Kshot).", metavar="DIR", rich_help_panel=OUTPUT),
    ] = None,
    device: DeviceOption = "auto",
    set_: SetOption = None,
    class_split: SplitFile = None,
    class_ratio: SplitRatio = None,
    split_seed: SplitSeed = 0,
    hp_selection: HpSelectionOption = "few-shot-val",
    base_to_new: BaseToNewOption = False,
    force: ForceOption = False,
    as_json: JsonOption = False,
    storage_options: StorageOptions = None,
) -> None:
    """Learn a cross-modal alignment (flow matching) on cached features and save its state."""
    _JSON["on"] = as_json
    _storage(storage_options)
    try:
        gammas = tuple(float(g) for g in gamma.split(",")) if gamma else None
    except ValueError:
        raise typer.BadParameter(f"--gamma takes comma-separated numbers, got {gamma!r}") from None
    gammas = gammas[0] if gammas and len(gammas) == 1 else gammas
    cfg = _run(
        AlignConfig,
        store=store,
        method=_value(method),
        shots=shots,
        seed=seed,
        steps=_ints(flow_steps, "--flow-steps"),
        gamma=gammas,
        base_state=base_state,
        out=out,
        device=device,
        options=_options(set_),
        force=force,
        **_split_kwargs(class_split, class_ratio, split_seed, hp_selection, base_to_new),
    )
    _fit_summary(_run(_api().align, cfg), as_json)


@app.command()
def distill(
    store: Annotated[str, typer.Option(help="Teacher feature store: a path or a URL.", metavar="PATH|URL")],
    shots: Annotated[int, typer.Option(help="Labelled samples per class.", metavar="K")] = 4,
    student: Annotated[
        str, typer.Option(help="Student encoder spec, e.g. timm:resnet18.", metavar="SPEC", rich_help_panel=FIT)
    ] = "timm:resnet18",
    method: Annotated[DistillMethod, typer.Option(help="The distill method.", rich_help_panel=FIT)] = "mtkd",
    regime: Annotated[
        Regime,
        typer.Option(help="semi (all classes, K labels + unlabeled) or base-novel (SynTrans).", rich_help_panel=FIT),
    ] = "semi",
    losses: Annotated[
        str,
        typer.Option(
            help="all, none (labels only), or a comma list of loss terms.", metavar="LIST", rich_help_panel=FIT
        ),
    ] = "all",
    epochs: Annotated[
        int | None, typer.Option(help="Training epochs (default: the method's).", metavar="N", rich_help_panel=FIT)
    ] = None,
    root: Annotated[
        str | None, typer.Option(help="Dataset root, if it moved since extraction.", metavar="PATH")
    ] = None,
    seed: SeedOption = 1,
    online_teacher: Annotated[
        bool, typer.Option(help="Run the teacher on augmented views instead of cached features.", rich_help_panel=FIT)
    ] = False,
    teacher_state: Annotated[
        str | None,
        typer.Option(
            "--teacher-state",
            help=(
                "A fitted all-way state of the same store (adapt/align: tip-adapter-f, coop, fma, ...) as the teacher: its "
                "head's logits are the soft targets."
            ),
            metavar="DIR",
            rich_help_panel=FIT,
        ),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(
            help="Output directory (default runs/distill/METHOD-Kshot).", metavar="DIR", rich_help_panel=OUTPUT
        ),
    ] = None,
    device: DeviceOption = "auto",
    set_: SetOption = None,
    class_split: SplitFile = None,
    class_ratio: SplitRatio = None,
    split_seed: SplitSeed = 0,
    hp_selection: HpSelectionOption = "few-shot-val",
    force: ForceOption = False,
    as_json: JsonOption = False,
    storage_options: StorageOptions = None,
) -> None:
    """Distil the store's encoder (teacher) into a small student encoder."""
    _JSON["on"] = as_json
    _storage(storage_options)
    cfg = _run(
        DistillConfig,
        store=store,
        shots=shots,
        student=student,
        method=_value(method),
        regime=_value(regime),
        losses=losses,
        epochs=epochs,
        root=root,
        seed=seed,
        online_teacher=online_teacher,
        teacher_state=teacher_state,
        out=out,
        device=device,
        options=_options(set_),
        force=force,
        **_split_kwargs(class_split, class_ratio, split_seed, hp_selection),
    )
    _fit_summary(_run(_api().distill, cfg), as_json)


def _names(value: str | None, option: str) -> list[str] | None:
    """A comma-separated list of names (stores, methods); None when the option is not given."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise typer.BadParameter(f"{option} is empty")
    return items


def _int_list(value: str | None, option: str) -> tuple[int, ...] | None:
    """Like :func:`_names`, each item an integer (parsed by :func:`_ints`)."""
    items = _names(value, option)
    return None if items is None else _ints(",".join(items), option)


def _bench_options(pairs: list[str] | None) -> dict:
    """``--set METHOD.KEY=VALUE`` -> {method: {key: value}}."""
    out: dict = {}
    for key, value in _options(pairs).items():
        method, dot, opt = key.partition(".")
        if not dot or not method or not opt:
            raise typer.BadParameter(f"fskd bench --set takes METHOD.KEY=VALUE (e.g. fma.iters=300), got {key!r}")
        out.setdefault(method, {})[opt] = value
    return out


def _slurm_options(pairs: list[str] | None) -> dict:
    """``--slurm KEY=VALUE`` -> {key: value}: numbers for the numeric keys, text for the others."""
    from fskd.config import SLURM_KEYS

    out: dict = {}
    for p in pairs or []:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--slurm takes KEY=VALUE (e.g. partition=gpu, time=120), got {p!r}")
        typ = SLURM_KEYS.get(key.strip(), (str,))[0]
        out[key.strip()] = int(value) if typ is int and value.strip().isdigit() else value
    return out


Executor = _choices("Executor", ["local", "slurm"])
SLURM = "Slurm (--executor slurm)"


@app.command()
def bench(
    stores: Annotated[str | None, typer.Option(help="Feature stores, comma-separated.", metavar="LIST")] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help=(
                "Adapt/align/distill methods, comma-separated (`fskd methods`), or chains (syntrans-e2e, "
                "syntrans-e2e-label-free, mtkd-2stage, or a grid file's [chains]: a student, then a head on its features); "
                "LABEL=METHOD adds a row of METHOD named LABEL with its own --set LABEL.KEY=VALUE options."
            ),
            metavar="LIST",
        ),
    ] = None,
    shots: Annotated[
        str | None,
        typer.Option("--shots", help="Shots per class, comma-separated [default: 1,2,4,8,16].", metavar="LIST"),
    ] = None,
    seeds: Annotated[
        str | None, typer.Option(help="Seeds, comma-separated; one fit per seed [default: 1,2,3].", metavar="LIST")
    ] = None,
    protocol: Annotated[Protocol | None, typer.Option(help="The protocol of every cell [default: allway].")] = None,
    hp_selection: Annotated[
        str | None,
        typer.Option(
            "--hp-selection",
            help="What chooses hyper-parameters, comma-separated to sweep it like shots: few-shot-val, full-val, none [default: few-shot-val].",
            metavar="LIST",
            rich_help_panel=FIT,
        ),
    ] = None,
    transductive: Annotated[
        str | None,
        typer.Option(
            "--transductive",
            help="Also score each state with TransCLIP, a row per setting: all (every test row at once), B:C (batches of B rows from C classes).",
            metavar="LIST",
            rich_help_panel=FIT,
        ),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(
            help="Bench folder: results.jsonl, tables, plots [default: runs/bench].",
            metavar="DIR",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    grid: Annotated[
        str | None,
        typer.Option(help="A TOML grid file with these keys (flags given here override it).", metavar="FILE"),
    ] = None,
    baseline: Annotated[
        str | None, typer.Option(help="A method of the grid: tables add paired differences to it.", metavar="METHOD")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="A method's option, METHOD.KEY=VALUE; a chain stage's, CHAIN.STAGE.KEY=VALUE (repeatable).",
            metavar="M.K=V",
            rich_help_panel=FIT,
        ),
    ] = None,
    keep_states: Annotated[
        bool, typer.Option(help="Keep every cell's fitted state under OUT/states.", rich_help_panel=OUTPUT)
    ] = False,
    extend: Annotated[
        bool,
        typer.Option(
            help="Let this grid grow an existing --out whose grid it contains (else a different grid there is refused).",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    way: Annotated[
        int | None,
        typer.Option(
            help="Episodic: classes per episode [default: 5].", metavar="N", rich_help_panel="Episodic protocol"
        ),
    ] = None,
    query: Annotated[
        int | None,
        typer.Option(
            help="Episodic: queries per class [default: 15].", metavar="N", rich_help_panel="Episodic protocol"
        ),
    ] = None,
    episodes: Annotated[
        int | None,
        typer.Option(
            help="Episodic: episodes per cell [default: 600].", metavar="N", rich_help_panel="Episodic protocol"
        ),
    ] = None,
    class_ratio: Annotated[
        str | None,
        typer.Option(
            "--class-ratio",
            help="Episodic: base,val,novel ratios; seed s then draws its own class split (split seed s).",
            metavar="LIST",
            rich_help_panel="Episodic protocol",
        ),
    ] = None,
    executor: Annotated[
        Executor | None,
        typer.Option(
            help="Where the cells run: this process, or Slurm jobs through submitit [default: local].",
            rich_help_panel=SLURM,
        ),
    ] = None,
    slurm: Annotated[
        list[str] | None,
        typer.Option(
            "--slurm",
            help="Each job's resources, KEY=VALUE (repeatable): partition, time (minutes), cpus, gpus, mem, account, qos, constraint, python.",
            metavar="K=V",
            rich_help_panel=SLURM,
        ),
    ] = None,
    cells_per_job: Annotated[
        int | None,
        typer.Option(
            "--cells-per-job",
            help="Cells run one after another in one Slurm job [default: 1].",
            metavar="N",
            rich_help_panel=SLURM,
        ),
    ] = None,
    detach: Annotated[
        bool,
        typer.Option(
            help="Submit the Slurm jobs and return; collect with the same command or --report.", rich_help_panel=SLURM
        ),
    ] = False,
    device: DeviceOption = "auto",
    report: Annotated[
        str | None,
        typer.Option(
            "--report",
            help="Only rebuild the tables and plots of the bench folder DIR from its results.",
            metavar="DIR",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    as_json: JsonOption = False,
    storage_options: StorageOptions = None,
) -> None:
    """Run a benchmark grid: every (store, method, shots, seed) cell fitted and evaluated once
    (allway, base-to-new, cross-dataset, domain-shift or episodic), resumable; writes the paper tables
    (Markdown, CSV, LaTeX) and accuracy-vs-shots plots."""
    _JSON["on"] = as_json
    _storage(storage_options)
    if report:
        paths = _run(_api().bench_report, report)
        typer.echo(json.dumps({"outputs": paths}) if as_json else "\n".join(["rebuilt:"] + [f"  {p}" for p in paths]))
        return
    data = _run(_api().load_grid, grid) if grid else {}
    given = {
        "stores": _names(stores, "--stores"),
        "methods": _names(methods, "--methods"),
        "shots": _int_list(shots, "--shots"),
        "seeds": _int_list(seeds, "--seeds"),
        "protocol": _value(protocol).replace("all-way", "allway") if protocol else None,
        "hp_selection": _names(hp_selection, "--hp-selection"),
        "transductive": _names(transductive, "--transductive"),
        "out": out,
        "baseline": baseline,
        "way": way,
        "query": query,
        "episodes": episodes,
        "class_ratio": _ratios(class_ratio, "--class-ratio") if class_ratio else None,
        "executor": _value(executor) if executor is not None else None,
        "cells_per_job": cells_per_job,
    }
    data.update({k: v for k, v in given.items() if v is not None})
    if slurm:
        data["slurm"] = {**data.get("slurm", {}), **_slurm_options(slurm)}
    if detach:
        data["detach"] = True
    if set_:
        opts = {m: dict(v) for m, v in data.get("options", {}).items()}
        for m, kv in _bench_options(set_).items():
            opts.setdefault(m, {}).update(kv)
        data["options"] = opts
    data.update(
        keep_states=keep_states or data.get("keep_states", False),
        extend=extend or data.get("extend", False),
        device=device,
    )
    cfg = _run(BenchConfig.from_dict, data)
    r = _run(_api().bench, cfg)
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(r)))
    else:
        c = r.counts
        jobs = (
            (
                f"; {c['jobs']} Slurm job(s) submitted"
                + (f", {c['waited']} of an earlier run waited for" if c.get("waited") else "")
            )
            if "jobs" in c
            else ""
        )
        typer.echo(
            f"bench {r.out}: {r.cells} cells ({c['skipped']} already done, {c['ok']} run, {c['n/a']} not "
            f"applicable, {c['failed']} failed) in {r.seconds:.1f} s{jobs}"
        )
        for p in r.outputs:
            typer.echo(f"  {p}")
        for f in r.failed:
            typer.echo(f"failed: {f}", err=True)
    if r.failed:
        raise typer.Exit(1)


@app.command()
def demo(
    data_root: Annotated[
        str, typer.Option(help="Folder holding cub35/ and omniglot/.", metavar="PATH")
    ] = "../shared/data",
    out: Annotated[str, typer.Option(help="Output folder (stores, reports).", metavar="DIR")] = "runs/demo",
    encoder: Annotated[str, typer.Option(help=ENCODER_HELP, metavar="SPEC")] = "lite0-minilm",
    episodes: Annotated[int, typer.Option(help="Episodes per evaluation.", metavar="N")] = 600,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers.", metavar="N")] = None,
) -> None:
    """The main job on the offline default: extract CUB-35 and Omniglot with lite0-minilm, evaluate."""
    _api()
    from fskd.demo import demo

    r = _run(demo, DemoConfig(data_root=data_root, out=out, encoder=encoder, episodes=episodes, workers=workers))
    from pathlib import Path

    typer.echo(Path(r.report).read_text(encoding="utf-8"))
    typer.echo(f"report: {r.report}  plot: {r.plot}  ({r.seconds:.0f} s)")


ExportFormat = _choices("ExportFormat", ["onnx", "torchscript"])


@app.command()
def predict(
    state: Annotated[
        str,
        typer.Option(help="State directory written by fskd adapt or align (its all-way head predicts).", metavar="DIR"),
    ],
    out: Annotated[
        str,
        typer.Option(
            help="Output file: .csv (with a header), .jsonl or .parquet (the parquet extra); OUT.fskd.json beside it records what wrote it.",
            metavar="FILE",
            rich_help_panel=OUTPUT,
        ),
    ],
    images: Annotated[
        str | None,
        typer.Option(
            help="A folder (read recursively), one image, or a text file listing image paths.", metavar="PATH"
        ),
    ] = None,
    csv: Annotated[
        str | None,
        typer.Option(
            "--csv", help="A CSV file with a 'path' column (relative paths: from its folder).", metavar="FILE"
        ),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(
            help="The state's feature store (default: the one it names; give it when the store moved). With --split: predict that split's cached features.",
            metavar="PATH|URL",
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="Predict a store split (e.g. test) from its cached features, no encoding; adds the true 'label' column and draws OUT.confusion.png.",
            metavar="SPLIT",
        ),
    ] = None,
    top_k: Annotated[int, typer.Option(help="Top-k class names and probabilities per row.", metavar="K")] = 5,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.", metavar="N")] = 64,
    workers: Annotated[
        int | None, typer.Option(help="DataLoader workers (default: one per core, at most 8).", metavar="N")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...", metavar="DEVICE")] = "auto",
    skip_bad: Annotated[
        bool,
        typer.Option(
            help=(
                "Write each unreadable image as a row with no prediction and the reason in an 'error' column, and name it in "
                "OUT.fskd.json (default: stop at the first, naming it)."
            )
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(help="Replace --out if fskd predict wrote it (never any other file).", rich_help_panel=OUTPUT),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (count, seconds, images/s).", rich_help_panel=OUTPUT)
    ] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Classify new images (or a store split) with a fitted state's all-way head: one row per image."""
    _JSON["on"] = as_json
    _storage(storage_options)
    cfg = _run(
        PredictConfig,
        state=state,
        out=out,
        images=images,
        csv=csv,
        store=store,
        split=split,
        top_k=top_k,
        batch_size=batch_size,
        workers=workers,
        device=device,
        skip_bad=skip_bad,
        force=force,
    )
    r = _run(_api().predict, cfg)
    if as_json:
        typer.echo(json.dumps(r.to_dict()))
        return
    acc = f"; top-1 accuracy {r.accuracy:.2f}% against the label column" if r.accuracy is not None else ""
    typer.echo(f"{r.out}: {r.count} predictions from {r.source} in {r.seconds:.1f} s ({r.images_per_s:.1f} img/s){acc}")
    if r.confusion:
        typer.echo(f"confusion matrix: {r.confusion}")
    if r.skipped:
        typer.echo(
            f"warning: skipped {r.skipped} unreadable file(s) (rows with an 'error' column in {r.out}; listed "
            f"in {r.manifest}): {', '.join(r.skipped_files[:3])}",
            err=True,
        )


@app.command()
def export(
    state: Annotated[
        str,
        typer.Option(
            help="State directory written by fskd adapt or align (its all-way head is exported).", metavar="DIR"
        ),
    ],
    out: Annotated[
        str,
        typer.Option(help="The model file to write (model.onnx, model.pt).", metavar="FILE", rich_help_panel=OUTPUT),
    ],
    format: Annotated[
        ExportFormat, typer.Option("--format", help="onnx (metadata_props) or torchscript (extra file fskd.json).")
    ] = "onnx",
    store: Annotated[
        str | None, typer.Option(help="The state's feature store, when it moved.", metavar="PATH|URL")
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.", metavar="N")] = 17,
    force: Annotated[
        bool, typer.Option(help="Replace --out if fskd export wrote it (never any other file).", rich_help_panel=OUTPUT)
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.", rich_help_panel=OUTPUT)] = False,
) -> None:
    """Export encoder + all-way head + class names to one ONNX or TorchScript file (preprocessed images in, probabilities out)."""
    _JSON["on"] = as_json
    cfg = _run(ExportConfig, state=state, out=out, format=_value(format), store=store, opset=opset, force=force)
    r = _run(_api().export, cfg)
    if as_json:
        typer.echo(json.dumps(r.to_dict()))
        return
    p = r.preprocess
    typer.echo(
        f"{r.out}: {r.format}, {r.bytes / 2**20:.1f} MiB, {r.parameters:,} parameters, {r.classes} classes "
        f"({r.method} on {r.encoder}); input images {r.input_shape} (resize {p['resize']} {p['interpolation']}, "
        f"crop {p['crop']}, mean {[round(v, 4) for v in p['mean']]}, std {[round(v, 4) for v in p['std']]}); "
        f"checked against PyTorch: max probability difference {r.max_difference:.2g} [{r.seconds:.1f} s]"
    )


def main() -> None:
    # under a non-UTF-8 locale (LC_ALL=C: ASCII) a class name such as "café", or a "±", would end
    # the run with UnicodeEncodeError at the last print; escape what the terminal cannot show instead
    for stream in (sys.stdout, sys.stderr):
        if (getattr(stream, "encoding", None) or "utf-8").lower().replace("-", "") != "utf8":
            with contextlib.suppress(AttributeError, ValueError):  # not a TextIOWrapper, or closed
                stream.reconfigure(errors="backslashreplace")
    app()
