"""Spec file reading and atomic writes."""

from __future__ import annotations

import os
import re
import stat
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
        (b"\xff\xfe\x00", "is not UTF-8 text"),
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


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_take_the_users_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """Plans and profiles are files to share: 0666 less the umask, as ``open`` gives, not mkstemp's 0600."""
    old = os.umask(umask)
    try:
        target = tmp_path / "plan.json"
        atomic_write_text(target, "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == mode


# Hostile input (issue 19 item 1): every class refused by the one reader, quickly, naming the rule.

BOMB = "".join(
    f"{chr(97 + level)}: &{chr(97 + level)} [{', '.join([f'*{chr(96 + level)}' if level else 'x'] * 9)}]\n"
    for level in range(8)
)
"""A billion-laughs document: 9^8 values once its aliases are expanded, in eight short lines."""


@pytest.mark.parametrize(
    ("name", "text", "rule"),
    [
        ("dup.yaml", "a: 1\nb: 2\na: 3\n", r"key 'a' is given twice in one mapping \(first on line 1\)"),
        ("flow.yaml", "x: {a: 1, a: 2}\n", "key 'a' is given twice"),
        ("dup.json", '{"a": 1, "b": {"c": 1, "c": 2}}', "key 'c' is given twice in one object"),
        ("nan.json", '{"a": NaN}', "NaN is not a number a spec may hold"),
        ("inf.json", '{"a": -Infinity}', "-Infinity is not a number"),
        ("bomb.yaml", BOMB, "its aliases expand to more than 1,000,000 values"),
        ("loop.yaml", "a: &a [1, *a]\n", "refers to the mapping or list that holds it"),
    ],
)
def test_documents_a_spec_cannot_mean_are_refused(tmp_path: Path, name: str, text: str, rule: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SpecError, match=rule):
        read_mapping(path, "model")


def test_aliases_within_the_budget_and_a_byte_order_mark_are_read(tmp_path: Path) -> None:
    shared = tmp_path / "profile.yaml"
    shared.write_text("fit: &f {alpha: 1, beta: 2}\nsame: *f\nmerged:\n  <<: *f\n  beta: 3\n")
    assert read_mapping(shared, "cluster")["merged"] == {"alpha": 1, "beta": 3}
    for name, text in (("m.yaml", "a: 1\n"), ("m.json", '{"a": 1}')):
        (tmp_path / name).write_text("\ufeff" + text, encoding="utf-8")
        assert read_mapping(tmp_path / name, "model") == {"a": 1}


def test_only_regular_utf8_files_under_the_size_limit_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(SpecError, match="is not a regular file"):
        read_mapping(fifo, "model")  # would block forever if opened
    with pytest.raises(SpecError, match="is a folder"):
        read_mapping(tmp_path, "model")
    if Path("/dev/zero").exists():
        with pytest.raises(SpecError, match="is not a regular file"):
            read_mapping(Path("/dev/zero"), "model")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(SpecError, match=r"is not UTF-8 text: byte 9"):
        read_mapping(latin, "model")
    big = tmp_path / "big.yaml"
    big.write_text("a: " + "x" * 200 + "\n")
    monkeypatch.setattr("planner.specfiles.MAX_INPUT_BYTES", 100)
    with pytest.raises(SpecError, match="is larger than"):
        read_mapping(big, "model")


def test_writes_refuse_targets_that_are_not_regular_files(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text("keep")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for target, rule in ((link, "not a regular file"), (fifo, "not a regular file"), (tmp_path, "a folder")):
        with pytest.raises(SpecError, match=rf"cannot write '{re.escape(str(target))}': it is {rule}"):
            atomic_write_text(target, "{}")
    with pytest.raises(SpecError, match="cannot write .*Not a directory"):
        atomic_write_text(real / "plan.json", "{}")  # a path through a regular file
    assert real.read_text() == "keep" and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.json", "link.json", "real.json"]
