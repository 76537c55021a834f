"""Hostile input refused where it is read (issue 19 items 2, 3 and 5): numbers no machine or model has, and
what a run cannot read or write, end in exit 2 within
seconds, one paragraph naming the field, no traceback, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = yaml.safe_load((ROOT / "examples" / "my-cluster.yaml").read_text())
MODEL = yaml.safe_load((ROOT / "planner" / "catalog" / "data" / "models" / "tiny-moe.yaml").read_text())


def _edited(base: dict, path: tuple[str, ...], value: object) -> dict:
    document = yaml.safe_load(yaml.safe_dump(base))  # a deep copy, aliases expanded
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return document


@pytest.mark.parametrize(
    ("what", "path", "value", "field"),
    [
        ("cluster", ("links", "inter_node", "collectives", "all_reduce", "bandwidth_gbps"), 5e-324, "bandwidth_gbps"),
        ("cluster", ("links", "intra_node", "nominal_gbps"), 1.7e308, "nominal_gbps"),
        ("cluster", ("num_nodes",), 10**9, "num_nodes"),
        ("cluster", ("num_gpus_per_node",), 2**40, "num_gpus_per_node"),
        ("cluster", ("step_overhead_s",), 1e308, "step_overhead_s"),
        ("model", ("hidden_size",), 10**400, "hidden_size"),
        ("model", ("num_layers",), 10**12, "num_layers"),
    ],
)  # fmt: skip
def test_numbers_out_of_range_exit_2(
    tmp_path: Path, what: str, path: tuple[str, ...], value: object, field: str
) -> None:
    cluster, model = tmp_path / "cluster.yaml", tmp_path / "model.yaml"
    cluster.write_text(yaml.safe_dump(_edited(CLUSTER, path, value) if what == "cluster" else CLUSTER))
    model.write_text(yaml.safe_dump(_edited(MODEL, path, value) if what == "model" else MODEL))
    out = tmp_path / "plan.json"
    done = subprocess.run(
        [sys.executable, "-m", "planner", "solve", "--model", str(model), "--cluster", str(cluster), "-o", str(out)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and field in done.stderr
    assert not out.exists()


def test_a_world_too_large_to_search_is_refused(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        yaml.safe_dump(_edited(CLUSTER, ("num_nodes",), 100_000) | {"num_gpus_per_node": 1024})
    )
    done = subprocess.run(
        [sys.executable, "-m", "planner", "solve", "--model", "tiny-moe", "--cluster", str(cluster)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2 and "must be at most 1,000,000 GPUs" in " ".join(
        w for w in done.stderr.split() if w != "│"
    )


@pytest.mark.parametrize(
    ("args", "rule"),
    [
        (["--cluster", "/nonexistent/cluster.yaml"], "does not exist"),
        (["-o", "/"], "it is a folder"),
    ],
)
def test_run_refuses_what_it_cannot_read_or_write_before_any_rank_starts(args: list[str], rule: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "planner", "run", "--model", "tiny-moe", "--nproc", "2", "--steps", "1", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and rule in done.stderr and "Traceback" not in done.stderr
