"""MkDocs hooks: pages generated from the code at build time, so they cannot drift from it.

- `cli.md` is written from the typer app (every command, its help, example and options);
- `<!-- options: NAME -->` in a page becomes the option table of method NAME, read from its config dataclass
  (field name, type, default, and the field's metadata `help`, `unit`, `bounds`; else the comment beside it);
- a page that names a repository file (`cilbench/...`, `methods/...`, `protocols/...`, `results/...`,
  `tests/...`, `docs/...`) that does not exist fails the build.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mkdocs.exceptions import PluginError  # noqa: E402
from mkdocs.structure.files import File  # noqa: E402

# --- CLI reference ---------------------------------------------------------------------------------------

def _default(param) -> str:
    import click
    if param.required:
        return "required"
    if isinstance(param, click.Option) and param.is_flag and not param.secondary_opts:
        return ""
    value = param.default
    if value is None or value == () or value == []:
        return ""
    if isinstance(value, bool) and param.secondary_opts:
        return (param.opts if value else param.secondary_opts)[0]
    return f"`{value}`"


def _cell(text: str) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")


def cli_markdown() -> str:
    import click
    import typer

    from cilbench import __version__
    from cilbench.cli import app
    root = typer.main.get_command(app)
    out = ["# CLI reference", "",
           f"Generated from the command line itself (cilbench {__version__}) when the docs are built; "
           "`cilbench COMMAND --help` prints the same.", "",
           "    cilbench [--version] COMMAND [OPTIONS]", ""]
    ctx = click.Context(root, info_name="cilbench")
    for name in root.list_commands(ctx):
        cmd = root.get_command(ctx, name)
        sub = click.Context(cmd, info_name=name, parent=ctx)
        pieces = " ".join(cmd.collect_usage_pieces(sub))
        out += [f"## `cilbench {name}`", "", _cell(inspect.cleandoc(cmd.help or "")), "",
                f"    cilbench {name} {pieces}", ""]
        if cmd.epilog:
            out += [inspect.cleandoc(cmd.epilog).replace("Example:", "**Example:**"), ""]
        rows = []
        for param in cmd.params:
            if param.name == "help":
                continue
            if isinstance(param, click.Argument):
                names = f"`{(param.metavar or param.name).upper()}`"
            else:
                names = ", ".join(f"`{o}`" for o in param.opts + param.secondary_opts)
            rows.append(f"| {names} | {_cell(_default(param))} | {_cell(getattr(param, 'help', '') or '')} |")
        if rows:
            out += ["| option | default | what |", "|---|---|---|", *rows, ""]
    return "\n".join(out) + "\n"


# --- method option tables --------------------------------------------------------------------------------

def _type_name(tp) -> str:
    if isinstance(tp, str):
        return tp
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " \\| ".join(repr(a).replace("'", "") for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " \\| ".join(_type_name(a) for a in args)
        return inner + (" or null" if len(args) < len(typing.get_args(tp)) else "")
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _format_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def options_markdown(method: str) -> str:
    """The option table of one method, from its options' own help, unit and bounds (cilbench.kit.option)."""
    from cilbench.kit import describe_options
    from cilbench.kit.registry import get_method
    entry = get_method(method)
    cls = entry.cls.Config
    rows_in = describe_options(cls) if dataclasses.is_dataclass(cls) else []
    if not rows_in:
        return f"`{method}` has no options."
    hints = typing.get_type_hints(cls)
    fixed = dict(entry.defaults or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    rows = ["| option | type | default | meaning |", "|---|---|---|---|"]
    for row in rows_in:
        name, text, extra = row["name"], row["help"], []
        if row["unit"]:
            extra.append(f"unit: {row['unit']}")
        if row["bounds"]:
            lo, hi = row["bounds"]
            extra.append("range: " + (f"[{lo}, {hi}]" if hi is not None else f">= {lo}") if lo is not None
                         else f"range: <= {hi}")
        if extra:
            text = f"{text} ({'; '.join(extra)})" if text else "; ".join(extra)
        default = _format_default(fields[name])
        if name in fixed:
            default = f"{fixed[name]} (set by `{method}`)"
        rows.append(f"| `{name}` | {_type_name(hints.get(name, fields[name].type))} | `{default}` | {_cell(text)} |")
    head = f"**`{method}` options** (`--set {entry.cls.family or method}.<key>=<value>`; generated from the code)"
    return head + "\n\n" + "\n".join(rows) + "\n"


# --- file references -------------------------------------------------------------------------------------

_PATH = re.compile(r"(?<![\w./<{(-])((?:cilbench|methods|protocols|results|tests|docs)/[\w./-]*"
                   r"\.(?:py|md|yaml|csv|txt|toml|json))\b")


_OUTPUTS = ("results/runs", "results/report")   # what runs and reports write: not in a fresh clone


def _check_paths(markdown: str, where: str) -> None:
    for m in _PATH.finditer(markdown):
        ref = m.group(1)
        if ref.startswith(_OUTPUTS) or "*" in ref:
            continue
        if not (ROOT / ref).exists():
            _MISSING.append(f"{where}: names `{ref}`, which is not in the repository")


# --- hooks -----------------------------------------------------------------------------------------------

def on_files(files, config):
    files.append(File.generated(config, "cli.md", content=cli_markdown()))
    return files


def on_page_markdown(markdown, page, config, files):
    markdown = re.sub(r"<!-- options: ([\w-]+) -->", lambda m: options_markdown(m.group(1)), markdown)
    _check_paths(markdown, page.file.src_uri)
    return markdown


_MISSING: list[str] = []


def on_pre_build(config):
    _MISSING.clear()


def on_post_build(config):
    if _MISSING:
        raise PluginError("pages name files that are not in the repository:\n  " + "\n  ".join(_MISSING))
