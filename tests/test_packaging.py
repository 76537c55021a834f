"""A built wheel carries the bundled data and works from any directory (non-editable install)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "planner" / "catalog" / "data"
"""The catalogs in the checkout: the installed wheel must list as many of each."""


@pytest.mark.slow
def test_wheel_works_outside_the_checkout(tmp_path: Path) -> None:
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(REPO)], check=True
    )
    (wheel,) = wheel_dir.glob("moeplan-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "from planner.catalog.data import DATA_DIR; print(DATA_DIR)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert where.stdout.strip().startswith(str(target))
    listing = subprocess.run(
        [sys.executable, "-m", "planner", "clusters", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert len(json.loads(listing.stdout)) == len(list((DATA / "clusters").glob("*.yaml")))
    models = subprocess.run(
        [sys.executable, "-m", "planner", "models", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert len(json.loads(models.stdout)) == len(list((DATA / "models").glob("*.yaml")))
