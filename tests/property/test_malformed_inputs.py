"""Malformed model and cluster files always end in a clean error: exit 2, a message, no traceback."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from planner.catalog import load_cluster, load_model
from planner.cli import app

runner = CliRunner()

MODEL = load_model("deepseek-v3").model_dump(mode="json")
CLUSTER = load_cluster("dgx-h100").model_dump(mode="json")

# Values no field of these specs accepts: every number is a non-negative count or size, no figure may be
# NaN or infinite, no name or literal ends in " ?", and no list or mapping field takes negative integers
# (a model's window_size is a pair of counts).
junk_values = st.one_of(
    st.integers(max_value=-1),
    st.floats(max_value=-1e-9),
    st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    st.text(max_size=20).map(lambda text: text + " ?"),
    st.lists(st.integers(max_value=-1), min_size=1, max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), min_size=1, max_size=2),
)
FREE_TEXT = {"source", "semantics_source", "name", "notes", "description", "medium", "date", "nic"}


def _paths(data: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of every leaf value of a nested mapping."""
    if not isinstance(data, dict) or not data:
        return [prefix]
    return [p for key, value in data.items() for p in _paths(value, (*prefix, key))]


def _replace(data: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    head, *rest = path
    copy = dict(data)
    copy[head] = _replace(copy[head], tuple(rest), value) if rest else value
    return copy


def _drop(data: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != key}


@st.composite
def broken(draw: st.DrawFn, valid: dict[str, Any], required: list[str]) -> bytes:
    """A file that must be rejected: a guaranteed-bad mutation of a valid spec, or no spec at all."""
    kind = draw(st.sampled_from(["junk_value", "drop_required", "unknown_key", "not_a_mapping", "garbage"]))
    if kind == "junk_value":
        path = draw(st.sampled_from([p for p in _paths(valid) if p[-1] not in FREE_TEXT]))
        data: Any = _replace(valid, path, draw(junk_values))
    elif kind == "drop_required":
        data = _drop(valid, draw(st.sampled_from(required)))
    elif kind == "unknown_key":
        data = {**valid, draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in valid)): 1}
    elif kind == "not_a_mapping":
        data = draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=10)))
    else:
        return draw(st.binary(max_size=200))
    return yaml.safe_dump(data, allow_unicode=True).encode()


def _run_show(kind: str, content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "input.yaml"
        path.write_bytes(content)
        result = runner.invoke(app, ["show", kind, str(path)])
    assert isinstance(result.exception, SystemExit) or result.exception is None, repr(result.exception)
    assert result.exit_code == 2, (result.exit_code, result.stdout, content[:200])
    assert "Traceback" not in result.stderr and "moeplan: error" in result.stderr
    assert result.stdout == ""


@given(broken(MODEL, ["num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size"]))
def test_malformed_model_files(content: bytes) -> None:
    _run_show("model", content)


@given(broken(CLUSTER, ["num_nodes", "num_gpus_per_node", "gpu", "links", "provenance"]))
def test_malformed_cluster_files(content: bytes) -> None:
    _run_show("cluster", content)
