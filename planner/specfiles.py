"""Reading spec files and turning validation failures into one-paragraph errors; atomic writes.

Every loader (model catalog, cluster profiles, plans, validation files, Hugging Face configs) goes through
``read_mapping`` and ``validate_spec`` so that a bad file always ends as a SpecError naming the file, the
field, the value and the rule, never as a traceback or a hang. ``read_mapping`` reads only a regular file
(a FIFO would block, a device never ends) of at most ``MAX_INPUT_BYTES``, UTF-8 (a byte-order mark is
skipped, in YAML and JSON alike), and refuses what YAML and JSON accept but a spec cannot mean: a key given
twice (the parser would keep the last, losing the first silently), JSON's NaN and Infinity, and YAML
aliases that expand past ``MAX_EXPANDED_NODES`` or refer to themselves ("billion laughs": a few lines that
expand to 9^10 values). Anchors and aliases within that budget stay (the bundled profiles share link fits).
"""

from __future__ import annotations

import difflib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from planner.errors import SpecError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "check_writable",
    "format_validation_error",
    "read_mapping",
    "read_tagged_mapping",
    "suggest",
    "validate_spec",
]

SpecT = TypeVar("SpecT", bound=BaseModel)

_MAX_VALUE_CHARS = 60


MAX_INPUT_BYTES = 16 * 2**20
"""Largest spec file read (16 MiB): the biggest moeplan writes or bundles, a plan or a validation file, is
under 100 KiB; a larger input is refused before it is parsed (a 50 MB YAML takes a minute and 750 MB)."""
MAX_EXPANDED_NODES = 1_000_000
"""Values a YAML document may hold once its aliases are expanded (each use of an anchor counts its values
again): a bundled profile with its shared link fits holds a few hundred."""


class _DuplicateKeys:
    """A safe YAML loader's mapping constructor that refuses a key given twice in one mapping (YAML and
    PyYAML keep the last; the user's first value would be lost)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # ``<<: *anchor`` merges, by design, under the mapping's own keys
            key = self.construct_object(key_node, deep=True)  # type: ignore[attr-defined]
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the constructor refuses it itself
            seen[key] = key_node.start_mark.line
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None,
                    f"key {key!r} is given twice in one mapping (first on line {first + 1})",
                    key_node.start_mark,
                )  # fmt: skip
        return super().construct_mapping(node, deep)  # type: ignore[misc, no-any-return]


class _StrictLoader(_DuplicateKeys, yaml.SafeLoader):
    pass


_FAST_BASE = getattr(yaml, "CSafeLoader", None)
_FAST_LOADER: type | None = (
    type("_StrictCLoader", (_DuplicateKeys, _FAST_BASE), {}) if _FAST_BASE is not None else None
)
"""libyaml's safe loader where PyYAML was built with it: the same documents about 10x faster (most of
reading the catalog and a cluster profile at the start of every command)."""

_REFUSED_TAGS = ("binary", "set", "omap", "pairs")
"""YAML's tags for values no spec field holds: ``!!binary`` would turn base64 into a name or a source
(pydantic decodes bytes into text), ``!!set`` and the ordered pairs into lists. Tags the safe loader does
not know (``!!python/object``, ``!include``) are refused by it."""


def _refuse_tag(loader: Any, node: yaml.Node) -> Any:
    raise yaml.constructor.ConstructorError(
        None, None, f"the tag {node.tag.replace('tag:yaml.org,2002:', '!!')} is not allowed in a spec file",
        node.start_mark,
    )  # fmt: skip


for _loader in (_StrictLoader, _FAST_LOADER):
    for _tag in _REFUSED_TAGS:
        if _loader is not None:
            _loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse_tag)  # type: ignore[attr-defined]


def _parse_yaml(text: str) -> Any:
    """A safe YAML load, through libyaml when present. A document libyaml refuses is read again by the
    pure-Python loader, so the error a user sees is PyYAML's own whichever build is installed."""
    if _FAST_LOADER is not None:
        try:
            return yaml.load(text, Loader=_FAST_LOADER)  # noqa: S506 - a safe loader
        except yaml.YAMLError as exc:
            if "maximum nesting depth" in str(exc):
                raise  # libyaml's limit (1,000 levels); the pure-Python loader would take seconds to recurse
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a safe loader


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} is given twice in one object")
        out[key] = value
    return out


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a spec may hold")


def _expanded_size(data: Any) -> int:
    """Values ``data`` holds with every shared (aliased) container counted at each use; ValueError if a
    container holds itself or the count passes ``MAX_EXPANDED_NODES``."""
    sizes: dict[int, int] = {}
    open_ids: set[int] = set()

    def size(value: Any) -> int:
        if not isinstance(value, dict | list):
            return 1
        key = id(value)
        if key in sizes:
            return sizes[key]
        if key in open_ids:
            raise ValueError("an alias refers to the mapping or list that holds it")
        open_ids.add(key)
        children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_EXPANDED_NODES:
                raise ValueError(
                    f"its aliases expand to more than {MAX_EXPANDED_NODES:,} values (the limit of a spec file)"
                )
        open_ids.discard(key)
        sizes[key] = total
        return total

    return size(data)


def _read_text(path: Path, what: str) -> str:
    """The file's text: a regular file, at most ``MAX_INPUT_BYTES``, UTF-8 (a byte-order mark dropped)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise SpecError(f"{what} file '{path}' does not exist.") from None
    except OSError as exc:
        raise SpecError(f"{what} file '{path}' cannot be read: {exc.strerror or exc}.") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a FIFO, socket or device)"
        raise SpecError(f"{what} file '{path}' is {kind}; moeplan reads spec files only from regular files.")
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"{what} file '{path}' cannot be read: {exc.strerror or exc}.") from None
    if len(raw) > MAX_INPUT_BYTES:
        raise SpecError(
            f"{what} file '{path}' is larger than {MAX_INPUT_BYTES // 2**20} MiB, the limit of a spec file."
        )
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"{what} file '{path}' is not UTF-8 text: byte {exc.start} ({raw[exc.start : exc.start + 1]!r}) "
            "cannot be decoded."
        ) from None


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    """Parse a YAML or JSON file whose top level must be a mapping (see the module docstring)."""
    text = _read_text(path, what)
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        if kind == "JSON":
            data = json.loads(text, object_pairs_hook=_json_pairs, parse_constant=_json_constant)
        else:
            data = _parse_yaml(text)
            _expanded_size(data)
    except (yaml.YAMLError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
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


def _umask() -> int:
    """The process's umask (reading it means setting it: put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _refuse_unwritable_kind(path: Path) -> None:
    """SpecError if ``path`` is something moeplan must not replace with a regular file (a link, FIFO,
    device or folder), or a path it cannot reach (through a regular file, a name too long)."""
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SpecError(f"cannot write '{path}': {exc.strerror or exc}.") from None
    if not stat.S_ISREG(existing.st_mode):
        kind = "a folder" if stat.S_ISDIR(existing.st_mode) else "not a regular file (a link, FIFO or device)"
        raise SpecError(
            f"cannot write '{path}': it is {kind}; moeplan writes a new file or replaces a regular one."
        )


def check_writable(path: Path) -> None:
    """SpecError now, leaving nothing behind, if ``path`` is plainly not a file moeplan may write: a link,
    FIFO, device or folder, a path it cannot reach (through a regular file, a name too long), or one in an
    existing folder where no file can be made (read-only, ``/proc``): a temporary file is made there and
    removed; a missing folder is not made (the write makes it). A command checks its ``-o`` before its work
    (a probe, a run, a solve: minutes), not after; the write itself still refuses what this cannot foresee
    (a full file system)."""
    _refuse_unwritable_kind(path)
    if path.parent.is_dir():  # a missing folder is made by the write, as it would be now
        fd, tmp_name = _temporary_beside(path)
        os.close(fd)
        Path(tmp_name).unlink(missing_ok=True)


def _temporary_beside(path: Path) -> tuple[int, str]:
    """A new temporary file in ``path``'s folder (made if missing), for a write that ends in a rename;
    SpecError where ``path`` may not be written (``_refuse_unwritable_kind``) or the folder refuses it."""
    _refuse_unwritable_kind(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise SpecError(f"cannot write '{path}': {exc.strerror or exc}.") from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see ``atomic_write_bytes``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A reader never sees a half-written file, and a failure leaves the old file (or none) in place. The file
    gets the mode a plain ``open`` would give it, 0666 less the user's umask (``mkstemp`` makes it 0600).
    """
    fd, tmp_name = _temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except OSError as exc:  # a full or read-only file system: nothing half-written is left
        Path(tmp_name).unlink(missing_ok=True)
        raise SpecError(f"cannot write '{path}': {exc.strerror or exc}.") from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
