"""Reading spec files and turning validation failures into one-paragraph errors; atomic writes.

Every loader (model catalog, cluster profiles, plans) goes through ``read_mapping`` and
``validate_spec`` so that a bad file always ends as a SpecError naming the file, the field, the value
and the rule, never as a traceback.
"""

from __future__ import annotations

import difflib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from planner.errors import SpecError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "format_validation_error",
    "read_mapping",
    "read_tagged_mapping",
    "suggest",
    "validate_spec",
]

SpecT = TypeVar("SpecT", bound=BaseModel)

_MAX_VALUE_CHARS = 60


_FAST_LOADER = getattr(yaml, "CSafeLoader", None)
"""libyaml's safe loader where PyYAML was built with it: the same documents about 10x faster (most of
reading the catalog and a cluster profile at the start of every command)."""


def _parse_yaml(text: str) -> Any:
    """``yaml.safe_load``, through libyaml when present. A document libyaml refuses is read again by the
    pure-Python loader, so the error a user sees is PyYAML's own whichever build is installed."""
    if _FAST_LOADER is not None:
        try:
            return yaml.load(text, Loader=_FAST_LOADER)  # noqa: S506 - a safe loader
        except yaml.YAMLError:
            pass
    return yaml.safe_load(text)


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    """Parse a YAML or JSON file whose top level must be a mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{what} file '{path}' does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{what} file '{path}' cannot be read as UTF-8 text: {exc}.") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else _parse_yaml(text)
    except (yaml.YAMLError, json.JSONDecodeError, RecursionError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        detail = " ".join(str(exc).split())
        raise SpecError(f"{what} file '{path}' is not valid {kind}: {detail}.") from None
    if not isinstance(data, dict):
        raise SpecError(
            f"{what} file '{path}' must hold a mapping of field names to values at the top level, "
            f"not {type(data).__name__}."
        )
    return data


def _show_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


def _known_fields(spec: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """Field names of the (nested) spec that a misspelt key at ``loc`` belongs to."""
    current: Any = spec
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def format_validation_error(exc: ValidationError, where: str, spec: type[BaseModel]) -> str:
    """One paragraph: each problem as ``field `path` (value): rule``."""
    problems = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        field = ".".join(str(part) for part in loc) or "(whole entry)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _known_fields(spec, loc), n=1)
            message = "unknown field" + (f" (did you mean `{close[0]}`?)" if close else "")
        if error["type"] == "missing":
            problems.append(f"field `{field}` is required but missing")
        elif loc:
            problems.append(f"field `{field}` ({_show_value(error['input'])}): {message}")
        else:
            problems.append(message)
    return f"{where} is invalid: " + "; ".join(problems) + "."


def read_tagged_mapping(path: Path, what: str, tag: str) -> dict[str, Any]:
    """``read_mapping`` for a file that must say ``format: <tag>`` (how a reader tells its files apart)."""
    data = read_mapping(path, what)
    if data.get("format") != tag:
        raise SpecError(
            f"{what} '{path}': format is {data.get('format')!r}, but such a file must say format: {tag}"
        )
    return data


def validate_spec(spec: type[SpecT], data: Any, where: str) -> SpecT:
    """Validate ``data`` as ``spec``, raising SpecError with a readable paragraph on failure."""
    try:
        return spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, where, spec)) from None


def suggest(name: str, known: list[str]) -> str:
    """A 'did you mean' clause for an unknown name, or the list of known names."""
    close = difflib.get_close_matches(name.lower(), [k.lower() for k in known], n=3, cutoff=0.6)
    by_lower = {k.lower(): k for k in known}
    if close:
        return "did you mean " + " or ".join(f"'{by_lower[c]}'" for c in close) + "?"
    return "known: " + ", ".join(known) + "."


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see ``atomic_write_bytes``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A reader never sees a half-written file, and a failure leaves the old file (or none) in place.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
