"""What the command line lists and shows without loading torch: the registries' entries, a
method's options, a store's summary. Everything here reads declarations and zarr metadata; the
heavy modules load only when an entry is used (``fskd.api``)."""

from __future__ import annotations


def protocol_choices() -> list[str]:
    """``--protocol`` choices (fskd.protocols' declarations, aliases after their protocol; no torch)."""
    from fskd.protocols import protocol_choices as choices

    return choices()


def registries() -> dict[str, dict[str, str]]:
    """Every registry's names with one-line descriptions (``fskd datasets`` / ``encoders`` / ...).
    Methods read ``[kind] description``."""
    from fskd.classifiers import CLASSIFIERS
    from fskd.datasets import DATASETS
    from fskd.encoders import ENCODERS
    from fskd.methods import METHODS, kind_of

    return {
        "datasets": {n: DATASETS.describe(n) for n in DATASETS.names()},
        "encoders": {n: ENCODERS.describe(n) for n in ENCODERS.names()},
        "classifiers": {n: CLASSIFIERS.describe(n) for n in CLASSIFIERS.names()},
        "methods": {n: f"[{kind_of(n)}] {METHODS.describe(n)}" for n in METHODS.names()},
    }


def methods_of(kind: str) -> list[str]:
    """The registered methods of ``kind`` (adapt, align, distill), from their declarations."""
    from fskd.methods import methods_of_kind

    return methods_of_kind(kind)


#: every method's ``--set`` options as :func:`live_method_info` gives them, written by
#: ``python -m fskd.catalog`` so that ``fskd methods NAME`` answers without importing torch;
#: tests/test_cli_startup.py fails when it differs from the live options (regenerate it then)
OPTIONS_FILE = "method_options.json"


def live_method_info(name: str) -> dict:
    """A method's kind, description and ``--set`` options (name, type, default, range, meaning),
    read from the method's class (imports its module, and so torch). A method with recipes
    (``fskd.methods.base.RecipeMethod``) also lists ``recipes``: each one's name, whether it is
    the default, what it is and its own options; its ``options`` are ``recipe`` and the default
    recipe's options (what ``--set`` takes without ``recipe``)."""
    from fskd.config import describe_options
    from fskd.methods import METHODS

    cls = METHODS.get(name)
    recipes = getattr(cls, "recipes", None)
    if not recipes:
        return {
            "name": name,
            "kind": cls.kind,
            "description": METHODS.describe(name),
            "options": describe_options(cls.options) if cls.options is not None else [],
        }
    rows = [
        {
            "name": r,
            "default": i == 0,
            "description": _first_paragraph(impl.__doc__),
            "options": describe_options(impl.options) if impl.options is not None else [],
        }
        for i, (r, impl) in enumerate(recipes.items())
    ]
    first = rows[0]
    recipe = {
        "name": "recipe",
        "type": "a string",
        "default": first["name"],
        "range": "",
        "max": "",
        "meaning": f"which recipe: {' | '.join(r['name'] for r in rows)} ({first['name']}, the default: as "
        f"published); the other options are that recipe's own (see its recipes)",
    }
    return {
        "name": name,
        "kind": cls.kind,
        "description": METHODS.describe(name),
        "options": [recipe, *first["options"]],
        "recipes": rows,
    }


def _first_paragraph(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def method_info(name: str) -> dict:
    """:func:`live_method_info` from the generated :data:`OPTIONS_FILE` (no torch); a method it
    does not list (one registered since, or by a plugin) is read live."""
    import json
    from pathlib import Path

    try:
        table = json.loads((Path(__file__).parent / "methods" / OPTIONS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        table = {}
    return table[name] if name in table else live_method_info(name)


def write_options_file():
    """Regenerate :data:`OPTIONS_FILE` from the live registry (``python -m fskd.catalog``)."""
    import json
    from pathlib import Path

    from fskd.methods import METHODS

    path = Path(__file__).parent / "methods" / OPTIONS_FILE
    path.write_text(
        json.dumps({n: live_method_info(n) for n in METHODS.names()}, indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )
    return path


def store_info(path: str, check: bool = False) -> dict:
    """Summary of a feature store: encoder, dataset, classes, splits, completeness, skipped and
    ignored files, missing chunks; ``check``: every chunk verified against its checksum."""
    from fskd.store import FeatureStore
    from fskd.store.location import backend_errors

    with backend_errors(path):  # a store on object storage that stops answering: one error naming it
        store = FeatureStore.open(path)
        out = store.summary()
        if check:
            out["check"] = store.check_report()
    return out


def configure_storage(options: dict | str | None) -> None:
    """``--storage-options``: fsspec options for every store URL this process opens (see
    ``fskd.store.location``; light, so ``fskd info`` stays quick)."""
    from fskd.store.location import configure

    configure(options)


if __name__ == "__main__":
    print(write_options_file())
