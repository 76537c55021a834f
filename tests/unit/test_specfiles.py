"""Spec file reading and atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from planner.errors import SpecError
from planner.specfiles import atomic_write_bytes, atomic_write_text, read_mapping


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "plan.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert os.listdir(target.parent) == ["plan.json"]


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "plan.json"
    target.write_text("old")

    with pytest.raises(TypeError):  # fails inside the write, after the temporary file exists
        atomic_write_bytes(target, 42)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["plan.json"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"- a\n- b\n", "must hold a mapping of field names to values at the top level, not list"),
        (b"a: [1, 2\n", "is not valid YAML"),
        (b"\xff\xfe\x00", "cannot be read as UTF-8 text"),
        (b"", "not NoneType"),
    ],
)
def test_read_mapping_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "x.yaml"
    path.write_bytes(content)
    with pytest.raises(SpecError, match=message):
        read_mapping(path, "model")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        read_mapping(tmp_path / "nope.yaml", "model")
