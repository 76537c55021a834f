"""Shared fixtures: catalog specs and the published validation file beside the checkout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import settings

from planner.catalog import load_model
from planner.schema import ModelSpec, TrainingSpec

REPO = Path(__file__).resolve().parent.parent
SHARED_VALIDATION = REPO.parent / "shared" / "validation" / "published.yaml"

settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=200, deadline=None)
settings.load_profile("ci" if __import__("os").environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def _private_moeplan_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own ``$MOEPLAN_HOME``: a probe must not leave a last-probe profile that changes
    what ``moeplan solve`` picks by default in later tests (or on the developer's machine)."""
    monkeypatch.setenv("MOEPLAN_HOME", str(tmp_path / "moeplan-home"))


@pytest.fixture(scope="session")
def published() -> dict[str, Any]:
    """The published-measurements file of ../shared/validation (skips when the checkout has none beside it)."""
    if not SHARED_VALIDATION.exists():
        pytest.skip(f"{SHARED_VALIDATION} not present beside the checkout")
    data: dict[str, Any] = yaml.safe_load(SHARED_VALIDATION.read_text())
    return data


@pytest.fixture(scope="session")
def mixtral() -> ModelSpec:
    return load_model("mixtral-8x7b")


@pytest.fixture(scope="session")
def training() -> TrainingSpec:
    return TrainingSpec(seq_len=4096, global_batch=256)
