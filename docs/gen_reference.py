"""mkdocs hook: the CLI reference and the methods' ``--set`` options, generated at build time.

A page asks for generated text with an HTML comment on a line of its own (invisible on GitHub):

- ``<!-- fskd-cli: VERB -->``: that command's usage, description and options (from the Typer app
  itself, ``typer.main.get_command(fskd.cli.app)``, grouped by the panels ``--help`` shows);
- ``<!-- fskd-cli: all -->``: the global options and every command, one section each;
- ``<!-- fskd-method-options: METHOD -->``: the method's ``--set`` keys with type, default, range
  and meaning (``fskd.catalog.method_info``, the same data as ``fskd methods METHOD``); a method
  with recipes: ``recipe`` and its default recipe's keys; ``METHOD:RECIPE``: that recipe's keys;
- ``<!-- fskd-methods-list -->``: every registered method with its kind and one-line description.

So the reference cannot drift from the code: a renamed option or a new method changes the pages
on the next ``make docs``. An unknown verb or method in a marker fails the build.
"""

from __future__ import annotations

import html
import re

MARKER = re.compile(r"^<!-- fskd-(cli|method-options|methods-list)(?::\s*([^ ]+))?\s*-->[ \t]*$", re.M)
_DEFAULT = re.compile(r"\s*\[default: (.*?)\]")
_REQUIRED = re.compile(r"\s*\[required\]")
_NAMES = re.compile(r"((?:-[^\s,]+, )*-[^\s,]+)\s*(.*)$")


def _cell(text: str) -> str:
    """Text for a Markdown table cell: no newlines, pipes escaped (outside code elements)."""
    text = " ".join(str(text).split())
    parts = re.split(r"(<code>.*?</code>)", text)
    return "".join(p if p.startswith("<code>") else p.replace("|", "\\|") for p in parts)


def _code(text: str) -> str:
    """Inline code for a table cell; a pipe cannot be escaped inside backticks there, so text
    holding one is written as an HTML code element with the pipe as an entity."""
    if not text:
        return ""
    if "|" in text:
        return "<code>" + html.escape(text).replace("|", "&#124;") + "</code>"
    return f"`{text}`"


def _app():
    import typer

    from fskd.cli import app

    return typer.main.get_command(app)


def _context(command, name: str, parent=None):
    return command.context_class(command, info_name=name, parent=parent)


def _split_record(record: tuple[str, str]) -> tuple[str, str, str, str, bool]:
    """(names, value, default, help, required) from a click help record: its left part is the
    option's names ("-v, --verbose") or an argument's metavar, then the value's metavar."""
    left, help_text = record
    m = _NAMES.match(left)
    names, value = (m.group(1), m.group(2)) if m else left.partition(" ")[::2]
    required = bool(_REQUIRED.search(help_text))
    help_text = _REQUIRED.sub("", help_text)
    m = _DEFAULT.search(help_text)
    default = m.group(1) if m else ""
    help_text = _DEFAULT.sub("", help_text).strip()
    return names, value.strip(), default, help_text, required


def _value_text(value: str) -> str:
    if value.startswith("<") and value.endswith(">") and "|" in value:
        return "one of " + ", ".join(f"`{c}`" for c in value[1:-1].split("|"))
    if value == "<bool>":
        return "flag"
    return _code(value)


def _params_tables(command, ctx) -> list[str]:
    panels: dict[str, list[str]] = {}
    for p in command.get_params(ctx):
        record = p.get_help_record(ctx)
        if record is None or p.name == "help":  # hidden (aliases such as --shot), and --help itself
            continue
        is_argument = getattr(p, "param_type_name", "") == "argument"
        names, value, default, help_text, required = _split_record(record)
        if is_argument:
            names = names.strip("[]") + " (argument)"
        if required:
            help_text = f"**Required.** {help_text}"
        panel = getattr(p, "rich_help_panel", None) or "Options"
        row = f"| `{names}` | {_cell(_value_text(value))} | {_cell(_code(default))} | {_cell(help_text)} |"
        panels.setdefault(panel, []).append(row)
    out = []
    for panel, rows in panels.items():
        out += [f"**{panel}**", "", "| option | value | default | meaning |", "|---|---|---|---|", *rows, ""]
    return out


def command_reference(verb: str, heading: str = "###") -> str:
    """The Markdown reference of one command (``all``: every command)."""
    root = _app()
    root_ctx = _context(root, "fskd")
    if verb == "all":
        parts = [
            f"{heading} `fskd` (global options)",
            "",
            _code_block(root.get_usage(root_ctx)),
            "",
            *_params_tables(root, root_ctx),
        ]
        for name in root.commands:
            parts += [command_reference(name, heading), ""]
        return "\n".join(parts)
    if verb not in root.commands:
        raise KeyError(
            f"fskd-cli marker names {verb!r}, which is not a command of the CLI; commands: {', '.join(root.commands)}"
        )
    command = root.commands[verb]
    ctx = _context(command, verb, parent=root_ctx)
    lines = [
        f"{heading} `fskd {verb}`",
        "",
        " ".join((command.help or "").split()),
        "",
        _code_block(command.get_usage(ctx)),
        "",
        *_params_tables(command, ctx),
    ]
    return "\n".join(lines)


def _code_block(text: str) -> str:
    return "```\n" + text.strip() + "\n```"


def method_options(name: str) -> str:
    """The ``--set`` options of one method (``METHOD:RECIPE``: of that recipe) as a Markdown table."""
    from fskd import catalog

    name, _, recipe = name.partition(":")
    names = catalog.registries()["methods"]
    if name not in names:
        raise KeyError(
            f"fskd-method-options marker names {name!r}, which is not a registered method; methods: {', '.join(names)}"
        )
    info = catalog.method_info(name)
    head = f"`{name}` ({info['kind']}), `fskd {info['kind']} --method {name} --set KEY=VALUE`:"
    options = info["options"]
    if recipe:
        recipes = {r["name"]: r for r in info.get("recipes", [])}
        if recipe not in recipes:
            raise KeyError(
                f"fskd-method-options marker names recipe {recipe!r} of {name!r}; its recipes: "
                f"{', '.join(recipes) or '(none)'}"
            )
        options = recipes[recipe]["options"]
        head = (
            f"`{name}` recipe `{recipe}` ({info['kind']}), `fskd {info['kind']} --method {name}"
            f"{'' if recipes[recipe]['default'] else ' --set recipe=' + recipe} --set KEY=VALUE`:"
        )
    if not options:
        return f"{head} no `--set` options."
    rows = []
    for o in options:
        rng = ", ".join(r for r in (o.get("range", ""), f"<= {o['max']}" if o.get("max") else "") if r)
        rows.append(
            f"| `{o['name']}` | {_cell(o['type'])} | {_cell(_code(o['default']))} | {_cell(rng)} | "
            f"{_cell(o['meaning'])} |"
        )
    return "\n".join([head, "", "| key | type | default | range | meaning |", "|---|---|---|---|---|", *rows])


def methods_list() -> str:
    from fskd import catalog

    rows = []
    for name, desc in catalog.registries()["methods"].items():
        kind, _, text = desc.partition("]")
        rows.append(f"| `{name}` | {kind.strip('[')} | {_cell(text.strip())} |")
    return "\n".join(["| method | verb | what it is |", "|---|---|---|", *rows])


def render(markdown: str) -> str:
    """Replace every marker in a page's Markdown with the generated text."""

    def one(m: re.Match) -> str:
        kind, arg = m.group(1), m.group(2)
        if kind == "cli":
            return command_reference(arg or "all")
        if kind == "method-options":
            return method_options(arg)
        return methods_list()

    return MARKER.sub(one, markdown)


# mkdocs hook -------------------------------------------------------------------------------------


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001 - mkdocs' signature
    return render(markdown) if "<!-- fskd-" in markdown else markdown
