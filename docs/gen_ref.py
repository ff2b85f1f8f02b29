"""MkDocs hook: the Reference pages for the command line and the config files, generated at build time.

`mkdocs.yml` lists this file under `hooks:`. The pages are built from the code itself, so they cannot drift from it:
- `reference/cli/<verb>.md`: one page per top-level verb of `vlmtrain.cli.main.build_parser()`, walking its
  sub-parsers (`vlmtrain fed run`, `vlmtrain prep llava`, ...): usage, description and one table row per argument.
- `reference/config.md`: every pydantic model of the config schemas (`vlmtrain.config.*`, the recipe's
  `federated:` block, the privacy-gate policy): one table per model with each field's type, default and description.

Hand-written (about 150 lines) because the plugins that exist do something else: mkdocs-click documents click
commands, mkdocs-argparse is a 0.0.1 release from 2024, and griffe-pydantic renders pydantic models as API entries
(one heading per field) rather than the table of YAML keys, defaults and bounds that a config author reads. Only the
standard library, pydantic and two light vlmtrain packages are imported: `build_parser()` and the config schemas load
no torch (the commands keep their heavy imports inside them), so the hook adds well under a second to a build.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File

SRC = Path(__file__).resolve().parents[1] / "src"
CLI_INDEX = "reference/cli/index.md"
# Schemas outside vlmtrain.config that users write too: the recipe's `federated:` block and the gate's policy YAML.
EXTRA_SCHEMA_MODULES = ("vlmtrain.fed.config", "vlmtrain.privacy.policy")
USAGE_COLUMNS = "100"  # argparse wraps usage lines at $COLUMNS


def _import_vlmtrain() -> None:
    """Make this checkout's src/ win over any installed vlmtrain (the docs describe the tree being built)."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))


def _cell(text: Any) -> str:
    """One Markdown table cell: no newlines, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


# ---------------------------------------------------------------- command line


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    """(name, parser, help) of each sub-command, aliases dropped, in the order they were added."""
    out = []
    for action in parser._actions:  # argparse has no public accessor for sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    out.append((name, sub, helps.get(name, "")))
    return out


def _argument_rows(parser: argparse.ArgumentParser) -> list[str]:
    """Table rows `| argument | value | default | help |` for every argument but -h and the sub-command slot."""
    fmt = parser._get_formatter()
    rows = []
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) or a.help == argparse.SUPPRESS:
            continue
        name = ", ".join(f"`{s}`" for s in a.option_strings) or f"`{a.metavar or a.dest}`"
        if a.choices is not None:
            value = " \\| ".join(f"`{c}`" for c in a.choices)
        elif a.nargs == 0:
            value = "flag"
        else:
            value = f"`{a.metavar or a.dest.upper()}`" if a.option_strings else ""
        if a.option_strings and a.required:
            value = (value + " (required)").strip()
        if a.nargs in ("*", "+") or isinstance(a, argparse._AppendAction):
            value = (value + " (repeatable)" if isinstance(a, argparse._AppendAction) else value + f" ({a.nargs})")
        default = "" if a.default in (None, False, [], argparse.SUPPRESS) or a.required else f"`{a.default}`"
        help_ = fmt._expand_help(a) if a.help else ""
        rows.append(f"| {name} | {_cell(value)} | {_cell(default)} | {_cell(help_)} |")
    return rows


def _parser_section(path: str, parser: argparse.ArgumentParser, help_: str, level: int) -> list[str]:
    """Markdown for one parser and, below it, each of its sub-commands one heading level down."""
    lines = [f"{'#' * level} `{path}`", ""]
    text = parser.description or help_
    if text:
        lines += [text, ""]
    lines += ["```", parser.format_usage().strip(), "```", ""]
    rows = _argument_rows(parser)
    if rows:
        lines += ["| argument | value | default | what it does |", "|---|---|---|---|", *rows, ""]
    if getattr(parser, "_defaults", {}).get("accepts_overrides"):
        lines += ["Dotted config overrides may follow the arguments (`trainer.max_steps=5`, `--optim.lr 1e-4`; "
                  "[configs](../../concepts/stages.md#configs-and-overrides)).", ""]
    for name, sub, sub_help in _subparsers(parser):
        lines += _parser_section(f"{path} {name}", sub, sub_help, level + 1)
    return lines


def cli_pages() -> dict[str, str]:
    """src_uri → Markdown: the CLI index and one page per top-level verb."""
    _import_vlmtrain()
    os.environ["COLUMNS"] = USAGE_COLUMNS
    from vlmtrain.cli.main import build_parser

    root = build_parser()
    verbs = _subparsers(root)
    index = ["# Command line", "",
             "Generated from the `argparse` parsers in `src/vlmtrain/cli/` when the site is built. "
             "Every verb also answers `--help`.", "",
             "```", root.format_usage().strip(), "```", "",
             "| verb | what it does |", "|---|---|"]
    index += [f"| [`vlmtrain {n}`]({n}.md) | {_cell(h)} |" for n, _, h in verbs]
    pages = {CLI_INDEX: "\n".join(index) + "\n"}
    for name, parser, help_ in verbs:
        pages[f"reference/cli/{name}.md"] = "\n".join(_parser_section(f"vlmtrain {name}", parser, help_, 1)) + "\n"
    return pages


# ---------------------------------------------------------------- config schemas


def _type_name(annotation: Any, models: set[type]) -> str:
    """A readable type, linking the models documented on the page: `DataConfig`, `list[DatasetRef]`, `'a' | 'b'`.
    Annotated metadata (pydantic's discriminators, constraints) is dropped: constraints get their own column."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0], models)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a, models) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a, models) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    if annotation is typing.Any:
        return "Any"
    if isinstance(annotation, type) and annotation in models:
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:  # a factory that wants the validated data
            return "computed"
        return f"`{value!r}`" if not hasattr(value, "model_dump") else "its defaults"
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{field.default!r}`"


def _constraints(field: Any) -> str:
    """`≥ 1`, `< 1`, ... from the field's annotated-types metadata."""
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "min length", "max_length": "max length"}
    out = []
    for meta in field.metadata:
        for attr, sign in signs.items():
            if getattr(meta, attr, None) is not None:
                out.append(f"{sign} {getattr(meta, attr)}")
    return ", ".join(out)


def _model_section(cls: type, models: set[type]) -> list[str]:
    lines = [f"### {cls.__name__}", ""]
    doc = inspect.getdoc(cls)
    if doc and not doc.startswith(("Usage docs:", "!!! abstract")):  # pydantic's own BaseModel docstring
        lines += [doc, ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        key = field.alias or name
        desc = field.description or ""
        cons = _constraints(field)
        if cons:
            desc = f"{desc} ({cons})" if desc else cons
        lines.append(f"| `{key}` | {_cell(_type_name(field.annotation, models))} | {_cell(_default(field))} "
                     f"| {_cell(desc)} |")
    return lines + [""]


def _schema_modules() -> list[Any]:
    import vlmtrain.config as cfg

    first = {"stage": 0, "model": 1}  # what users write most: stage and recipe files, then model files
    found = sorted((m.name for m in pkgutil.iter_modules(cfg.__path__)), key=lambda n: (first.get(n, 2), n))
    names = [f"vlmtrain.config.{n}" for n in found]
    return [importlib.import_module(n) for n in (*names, *EXTRA_SCHEMA_MODULES)]


def config_page() -> str:
    """Markdown of every public pydantic model in the schema modules, grouped by module, in definition order."""
    _import_vlmtrain()
    from pydantic import BaseModel

    per_module = []
    for mod in _schema_modules():
        classes = [c for n, c in vars(mod).items() if isinstance(c, type) and issubclass(c, BaseModel)
                   and c.__module__ == mod.__name__ and not n.startswith("_")]
        if classes:
            per_module.append((mod, classes))
    models = {c for _, cs in per_module for c in cs}
    lines = ["# Config fields", "",
             "Generated from the pydantic schemas (`src/vlmtrain/config/`, `vlmtrain/fed/config.py`, "
             "`vlmtrain/privacy/policy.py`) when the site is built. Unknown fields are refused: an invalid config "
             "exits 2 with one line per bad field. How stages, recipes and model files fit together: "
             "[stages and recipes](../concepts/stages.md), [the two model kinds](../concepts/models.md).", ""]
    for mod, classes in per_module:
        lines += [f"## `{mod.__name__}`", ""]
        doc = (inspect.getdoc(mod) or "").strip()
        if doc:
            lines += [doc, ""]
        for cls in classes:
            lines += _model_section(cls, models)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- MkDocs events


def on_config(config, **kwargs):
    """Expand the nav entry of the CLI index into the index plus one entry per verb."""
    _import_vlmtrain()
    verbs = [p for p in cli_pages() if p != CLI_INDEX]

    def expand(items):
        for i, item in enumerate(items or []):
            if isinstance(item, dict):
                (title, value), = item.items()
                if value == CLI_INDEX:
                    items[i] = {title: [CLI_INDEX] + [{f"vlmtrain {Path(p).stem}": p} for p in verbs]}
                elif isinstance(value, list):
                    expand(value)

    expand(config["nav"])
    return config


def on_files(files, config, **kwargs):
    """Add the generated pages to the site (they exist only in memory)."""
    pages = {**cli_pages(), "reference/config.md": config_page()}
    for uri, text in pages.items():
        files.append(File.generated(config, uri, content=text))
    return files
