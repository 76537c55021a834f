"""JSON Schema with each field's docstring as its ``description`` (``moeplan schema``).

Pydantic can read attribute docstrings itself (``use_attribute_docstrings``), but it does so for every
spec class as it is defined: it reads and tokenizes each class's source, about 60 ms at every command's
start for the one command that prints them. Here they are read only when a schema is printed, from the
same place: a string literal right under a field's annotation (PEP 257's "attribute docstrings").
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
import typing
from functools import cache
from typing import Any

from pydantic import BaseModel

__all__ = ["field_docstrings", "json_schema"]


@cache
def _own_docstrings(cls: type) -> dict[str, str]:
    """The attribute docstrings written in ``cls``'s own body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a frozen install): the schema goes without them
        return {}
    body = ast.parse(source).body[0]
    docs: dict[str, str] = {}
    if not isinstance(body, ast.ClassDef):
        return docs
    for stmt, after in zip(body.body, body.body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def field_docstrings(cls: type[BaseModel]) -> dict[str, str]:
    """Each field's docstring, a subclass's own over its bases'."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if isinstance(base, type) and issubclass(base, BaseModel) and base is not BaseModel:
            docs.update(_own_docstrings(base))
    return {name: doc for name, doc in docs.items() if name in cls.model_fields}


def _models_in(annotation: Any) -> typing.Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        if not isinstance(arg, (str, int, float, bool, types.NoneType)):
            yield from _models_in(arg)


def _reachable(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every model class reachable from ``root``'s fields, by class name (pydantic's ``$defs`` key)."""
    found: dict[str, type[BaseModel]] = {}
    stack = [root]
    while stack:
        cls = stack.pop()
        if found.setdefault(cls.__name__, cls) is not cls:
            continue
        for info in cls.model_fields.values():
            stack.extend(m for m in _models_in(info.annotation) if m.__name__ not in found)
    return found


def _describe(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    properties = schema.get("properties", {})
    for name, doc in field_docstrings(cls).items():
        key = cls.model_fields[name].alias or name
        if key in properties and "description" not in properties[key]:
            properties[key]["description"] = doc


def json_schema(root: type[BaseModel]) -> dict[str, Any]:
    """``root.model_json_schema()`` with the fields' docstrings as their descriptions."""
    schema = root.model_json_schema()
    classes = _reachable(root)
    _describe(schema, root)
    for name, definition in schema.get("$defs", {}).items():
        if name in classes:
            _describe(definition, classes[name])
    return schema
