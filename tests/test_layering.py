"""The one-way data flow of docs/development.md, checked on the imports of every module."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fskd"

# Left to right; a module may import only from its own layer or layers to its left.
# Utilities (errors, registry, config, runtime) are importable from everywhere.
# `python -m fskd` (__main__) is the entry point, right of the CLI. `catalog` (what the CLI lists without
# loading torch: registry entries, a store summary) sits just left of `api`, which re-exports it.
# `evaluation` (metrics, TransCLIP) imports no other layer; the protocols that score with it and the
# methods that use the protocols' sampling come after it. `verbs` is what each verb does between its config
# and its result (fit, evaluate), run by the bench and faced by `api`; `demo` is an application of the api.
LAYERS = [
    "datasets",
    "encoders",
    "store",
    "evaluation",
    "classifiers",
    "protocols",
    "methods",
    "deploy",
    "reports",
    "verbs",
    "bench",
    "catalog",
    "api",
    "demo",
    "cli",
    "__main__",
]
#: `fskd.config` validates --protocol against the protocols' declarations: it may import the
#: `fskd.protocols` package itself (whose __init__ imports only fskd.registry), nothing of its modules
DECLARATIONS = {"fskd.protocols"}
UTILITIES = {"errors", "registry", "config", "runtime", "fsutil", "progress", "__init__", "__version__"}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "fskd":
        return None
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def imports_of(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "fskd":  # `from fskd import api` names modules
                out += [(f"fskd.{a.name}", node.lineno) for a in node.names]
            else:
                out.append((node.module, node.lineno))
    return out


def test_imports_point_left_only():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        own = layer_of(".".join(rel.parts))
        if own in UTILITIES:
            own_rank = -1
        else:
            own_rank = LAYERS.index(own)
        for module, line in imports_of(path):
            target = layer_of(module)
            if own in UTILITIES and module in DECLARATIONS:
                continue
            if target is None or target in UTILITIES or target == own:
                if own in UTILITIES and target not in (None, *UTILITIES) and own != "__init__":
                    bad.append(f"{rel}:{line} utility module imports {module}")
                continue
            if target not in LAYERS:
                bad.append(f"{rel}:{line} imports unknown fskd module {module}")
            elif LAYERS.index(target) > own_rank:
                bad.append(f"{rel}:{line} ({own}) imports {module} ({target}), an arrow pointing back")
    assert not bad, "\n".join(bad)


def test_declarations_import_only_the_registry():
    """What config imports of fskd.protocols declares names only: no protocol module, no torch."""
    for module in DECLARATIONS:
        init = PKG.parent.joinpath(*module.split("."), "__init__.py")
        fskd_imports = {m for m, _ in imports_of(init) if m.startswith("fskd")}
        assert fskd_imports <= {"fskd.registry", f"{module}.base"}, (module, fskd_imports)


def test_cli_imports_only_api():
    cli = PKG / "cli.py"
    # fskd.runtime: its CPU thread policy must be set before fskd.api imports torch; fskd.catalog: the
    # listings, --help choices and `fskd info`, which must not import fskd.api (torch)
    allowed = {"fskd", "fskd.api", "fskd.catalog", "fskd.config", "fskd.errors", "fskd.runtime", "fskd.demo"}
    wrong = [
        (m, n) for m, n in imports_of(cli) if m.startswith("fskd") and m not in allowed and m != "fskd.__version__"
    ]
    assert not wrong, f"cli.py must go through fskd.api: {wrong}"
