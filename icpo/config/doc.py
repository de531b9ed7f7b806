"""The config reference, generated from the dataclasses in ``schema.py`` (no torch).

``icpo train --help`` lists every field with :func:`help_text`; ``docs/config.md`` is
:func:`markdown`, written by ``python tools/gen_config_doc.py`` and checked against this module
by ``tests/test_cli_fast.py``, so neither can drift from the code. :func:`field_docs` gives the
same docstrings by dotted field name. All of them read the attribute docstrings from one parse of
``schema.py`` (Python keeps no such docstrings at run time).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import typing
from pathlib import Path
from typing import Any, NamedTuple

from icpo.config import schema
from icpo.config.schema import Config, describe


class Field(NamedTuple):
    """One config field: dotted name, type, default and its docstring."""

    name: str
    type: str
    default: str
    doc: str


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value) if not isinstance(value, str) else value


@functools.cache
def _attribute_docs() -> dict[str, dict[str, str]]:
    """Class name -> field -> the string literal right after the field's annotated assignment,
    for every class in schema.py."""
    tree = ast.parse(Path(schema.__file__).read_text(encoding="utf-8"))
    out: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            out[node.name] = docs = {}
            for stmt, nxt in zip(node.body, node.body[1:]):
                if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                        and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                        and isinstance(nxt.value.value, str)):
                    docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return out


def field_docs(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """Dotted field name -> its attribute docstring (whitespace collapsed), for every field of
    ``cls`` recursively, sections (``algorithm.omega``) included; a field without one is left
    out."""
    docs: dict[str, str] = {}
    own = _attribute_docs().get(cls.__name__, {})
    for name, tp in typing.get_type_hints(cls).items():
        if name in own:
            docs[prefix + name] = own[name]
        if dataclasses.is_dataclass(tp):
            docs.update(field_docs(tp, f"{prefix}{name}."))
    return docs


def fields(cls: type = Config, prefix: str = "") -> list[Field]:
    """Every leaf field of ``cls``, depth first, in declaration order."""
    hints = typing.get_type_hints(cls)
    docs = _attribute_docs().get(cls.__name__, {})
    out: list[Field] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(fields(tp, f"{prefix}{f.name}."))
            continue
        out.append(Field(prefix + f.name, describe(tp), _show(_default(f)), docs.get(f.name, "")))
    return out


def help_text() -> str:
    """Plain-text listing for ``icpo train --help``: one line per field."""
    lines = ["config fields, with defaults (YAML keys, or dotted overrides such as "
             "actor.lr=1e-5); types and details: docs/config.md"]
    for f in fields():
        head = f"  {f.name}={f.default}"
        if len(head) > 44:  # a long default: the meaning goes on its own line
            lines += [head, " " * 46 + f.doc]
        else:
            lines.append(head.ljust(46) + f.doc)
    return "\n".join(lines)


def markdown() -> str:
    """``docs/config.md``: one table per section."""
    out = ["# Configuration reference", "",
           "Generated from the dataclasses in `icpo/config/schema.py` by "
           "`python tools/gen_config_doc.py`",
           "(checked by `tests/test_cli_fast.py`; edit the docstrings there, not this file).",
           "", "A run's config is these defaults, then the YAML file given with `--config`",
           "(nested mappings), then dotted overrides on the command line",
           "(`icpo train --config run.yaml actor.lr=1e-5 data.train_files=[a.jsonl,b.jsonl]`).",
           "Unknown keys, wrong types and out-of-range values are rejected before any work",
           "starts, with the dotted field named.", ""]
    section = None
    for f in fields():
        top = f.name.split(".")[0]
        if top != section:
            section = top
            out += ["", f"## `{top}`", "", "| field | type | default | meaning |",
                    "|---|---|---|---|"]
        cell = f.doc.replace("|", "\\|")
        out.append(f"| `{f.name}` | {f.type.replace('|', '/')} | `{f.default}` | {cell} |")
    return "\n".join(out).replace("\n\n\n", "\n\n") + "\n"
