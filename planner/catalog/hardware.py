"""The hardware catalog (GPUs) and cluster profiles: bundled ones by name, or any profile file.

Bundled data lives in ``planner/catalog/data/`` (``planner.catalog.data``), beside the model catalog.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from planner.catalog.data import CLUSTERS_DIR, GPUS_FILE
from planner.errors import SpecError
from planner.schema import ClusterProfile, GpuSpec
from planner.specfiles import read_mapping, suggest, validate_spec

__all__ = [
    "DEFAULT_CLUSTER",
    "LAST_PROBE_NAME",
    "cluster_names",
    "gpu_names",
    "list_clusters",
    "load_cluster",
    "load_cluster_file",
    "load_gpu",
    "moeplan_home",
    "profile_yaml",
    "with_nodes",
]

DEFAULT_CLUSTER = "a800-2x8"
"""The profile used when nothing was probed: MoNTA's 16 A800 in 2 nodes."""
LAST_PROBE_NAME = "last-probe.yaml"
"""File name of the most recent probe's profile in the moeplan home (``$MOEPLAN_HOME``, else ``~/.moeplan``)."""


def moeplan_home() -> Path:
    """Where moeplan keeps per-user state: ``$MOEPLAN_HOME`` or ``~/.moeplan``."""
    return Path(os.environ.get("MOEPLAN_HOME") or Path.home() / ".moeplan")


@cache
def _gpus() -> dict[str, GpuSpec]:
    path = GPUS_FILE
    gpus = {}
    for name, entry in read_mapping(path, "GPU catalog").items():
        fields = {"name": name, **entry} if isinstance(entry, dict) else entry
        gpus[name.lower()] = validate_spec(GpuSpec, fields, f"GPU catalog '{path}' entry '{name}'")
    return gpus


def gpu_names() -> list[str]:
    """GPU names of the hardware catalog."""
    return sorted((g.name or key for key, g in _gpus().items()), key=str.lower)


def load_gpu(name: str) -> GpuSpec:
    """A GPU of the hardware catalog by name (case-insensitive)."""
    gpu = _gpus().get(name.lower())
    if gpu is None:
        raise SpecError(f"GPU '{name}' is not in the hardware catalog; {suggest(name, gpu_names())}")
    return gpu


def _cluster_paths() -> dict[str, Path]:
    return {p.stem.lower(): p for p in sorted(CLUSTERS_DIR.glob("*.yaml"))}


def cluster_names() -> list[str]:
    """Names of the bundled cluster profiles."""
    return sorted(p.stem for p in _cluster_paths().values())


def load_cluster_file(path: Path) -> ClusterProfile:
    """A cluster profile from a YAML file; ``gpu`` may name a catalog GPU instead of spelling it out."""
    data: dict[str, Any] = read_mapping(path, "cluster profile")
    gpu = data.get("gpu")
    if isinstance(gpu, str):
        data = {**data, "gpu": load_gpu(gpu).model_dump()}
    data.setdefault("name", path.stem)
    return validate_spec(ClusterProfile, data, f"cluster profile '{path}'")


@cache
def _bundled_cluster(key: str) -> ClusterProfile:
    return load_cluster_file(_cluster_paths()[key])


def list_clusters() -> list[ClusterProfile]:
    """Every bundled cluster profile, in name order."""
    return [_bundled_cluster(name.lower()) for name in cluster_names()]


def with_nodes(profile: ClusterProfile, num_nodes: int) -> ClusterProfile:
    """The same cluster with another node count (``--nodes``); a probed topology cannot be resized."""
    if num_nodes == profile.num_nodes:
        return profile
    if profile.topology is not None:
        raise SpecError(
            f"--nodes ({num_nodes}) cannot resize cluster '{profile.name}': its topology was probed on "
            f"{profile.num_nodes} nodes. Probe the larger allocation instead."
        )
    data = {**profile.model_dump(), "num_nodes": num_nodes}
    return validate_spec(ClusterProfile, data, f"cluster '{profile.name}' with --nodes {num_nodes}")


def load_cluster(name_or_path: str, num_nodes: int | None = None) -> ClusterProfile:
    """A bundled cluster by name (case-insensitive) or a profile file by path, optionally resized."""
    key = name_or_path.lower()
    if key in _cluster_paths():
        profile = _bundled_cluster(key)
    else:
        path = Path(name_or_path)
        if path.suffix not in {".yaml", ".yml", ".json"} and not path.exists():
            raise SpecError(
                f"cluster '{name_or_path}' is neither a bundled profile nor a file; "
                f"{suggest(name_or_path, cluster_names())} See `moeplan clusters`."
            )
        profile = load_cluster_file(path)
    if num_nodes is not None:
        if num_nodes < 1:
            raise SpecError(f"--nodes ({num_nodes}) must be at least 1.")
        profile = with_nodes(profile, num_nodes)
    return profile


def profile_yaml(profile: ClusterProfile, *header: str) -> str:
    """The profile as the YAML ``--cluster`` reads back, under ``# `` comment lines of ``header``."""
    comments = "".join(f"# {line}\n" for line in header)
    return comments + yaml.safe_dump(
        profile.model_dump(mode="json", exclude_none=True), sort_keys=False, width=110
    )
