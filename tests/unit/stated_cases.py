"""A validation file of one published case beside its copy that states a software setting: what the tests of
each optional ``parallel`` field of the validation format price and refuse."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from planner.accuracy.validate import CaseResult, validate_suite
from planner.accuracy.validation_file import load_validation_file
from tests.conftest import REPO


def write_pair(
    folder: Path, source: str, pick: Callable[[dict[str, Any]], bool], stated: dict[str, Any]
) -> Path:
    """``benchmarks/data/<source>``'s first case that ``pick`` accepts and its copy with ``stated`` added to its
    ``parallel``, written to ``folder`` as an unlocked file (the locked files are read here as data only)."""
    document = yaml.safe_load((REPO / "benchmarks" / "data" / source).read_text())
    document.pop("locked", None)
    case = next(c for c in document["cases"] if pick(c))
    copy = {**case, "id": case["id"] + "-STATED", "parallel": {**case["parallel"], **stated}}
    document["cases"] = [case, copy]
    path = folder / "cases.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def unstated_and_stated(
    folder: Path, source: str, pick: Callable[[dict[str, Any]], bool], stated: dict[str, Any]
) -> tuple[CaseResult, CaseResult]:
    """The validated pair of ``write_pair``: (the case as published, the case stating ``stated``)."""
    unstated, with_setting = validate_suite(
        load_validation_file(write_pair(folder, source, pick, stated))
    ).cases
    return unstated, with_setting
