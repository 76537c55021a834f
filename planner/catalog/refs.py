"""Where a plan's model and cluster profile come from, recorded when it is made and followed to load
them again: the plan alone then prices, emits and runs without the caller naming its inputs.

- A catalog model or a bundled profile is recorded by name (a bundled profile is resized to the plan's
  node count when loaded).
- A file is recorded by its path as given and the SHA-256 of its bytes; loading looks for it as given
  (relative to the current directory), then relative to the plan file's folder, and refuses a file
  whose bytes changed since (a plan priced on other figures would silently mean something else).
- A probed profile is stored in the moeplan home under its content hash
  (``$MOEPLAN_HOME/profiles/<name>-<sha256[:12]>.yaml``), because ``last-probe.yaml`` is replaced by
  the next probe; the plan records that stored copy. ``--cluster`` naming the last probe's file, or no
  ``--cluster`` when a probe exists, is recorded this way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from planner.catalog.hardware import (
    DEFAULT_CLUSTER,
    LAST_PROBE_NAME,
    cluster_names,
    load_cluster,
    moeplan_home,
)
from planner.catalog.models import catalog_names, load_model, load_model_file
from planner.errors import SpecError
from planner.schema import ClusterProfile, ClusterRef, ModelRef, ModelSpec
from planner.specfiles import atomic_write_bytes

__all__ = [
    "PROBED_DIR",
    "ResolvedCluster",
    "file_sha256",
    "find_file",
    "load_plan_cluster",
    "load_plan_model",
    "resolve_cluster",
    "resolve_model",
    "store_probed_profile",
]

PROBED_DIR = "profiles"
"""Folder of the moeplan home where probed profiles are kept under their content hash."""


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise SpecError(f"file '{path}' cannot be read: {exc.strerror or exc}.") from None


def store_probed_profile(data: bytes, name: str) -> Path:
    """Keep a probed profile's bytes in the moeplan home under their hash (written once, atomically)."""
    digest = hashlib.sha256(data).hexdigest()
    path = moeplan_home() / PROBED_DIR / f"{name}-{digest[:12]}.yaml"
    if not path.is_file() or path.read_bytes() != data:
        atomic_write_bytes(path, data)
    return path


@dataclass(frozen=True, slots=True)
class ResolvedCluster:
    """A cluster profile, how a plan records it, and (for the default) a sentence saying which it is."""

    profile: ClusterProfile
    ref: ClusterRef
    note: str | None = None


def _probed(path: Path, num_nodes: int | None) -> ResolvedCluster:
    data = path.read_bytes()
    profile = load_cluster(str(path), num_nodes)
    stored = store_probed_profile(data, profile.name)
    digest = hashlib.sha256(data).hexdigest()
    return ResolvedCluster(
        profile, ClusterRef(name=profile.name, source="probe", path=str(stored), sha256=digest)
    )


def _same_file(path: Path, other: Path) -> bool:
    """Whether both are the same regular file (False for a path no file can have, e.g. ENAMETOOLONG: the
    file reader then refuses it with the reason)."""
    try:
        return path.is_file() and other.is_file() and path.resolve() == other.resolve()
    except OSError:
        return False


def resolve_cluster(name_or_path: str | None, num_nodes: int | None = None) -> ResolvedCluster:
    """The profile ``--cluster`` names (None: the last probe, else the bundled default), and its record."""
    last = moeplan_home() / LAST_PROBE_NAME
    if name_or_path is None:
        if last.is_file():
            found = _probed(last, num_nodes)
            return ResolvedCluster(found.profile, found.ref, f"using the last probed profile {last}")
        profile = load_cluster(DEFAULT_CLUSTER, num_nodes)
        note = (
            f"no probed profile at {last}: using the bundled '{DEFAULT_CLUSTER}' (pass --cluster to choose)"
        )
        return ResolvedCluster(profile, ClusterRef(name=profile.name, source="bundled"), note)
    if name_or_path.lower() in {name.lower() for name in cluster_names()}:
        profile = load_cluster(name_or_path, num_nodes)
        return ResolvedCluster(profile, ClusterRef(name=profile.name, source="bundled"))
    path = Path(name_or_path)
    if _same_file(path, last):
        return _probed(path, num_nodes)
    profile = load_cluster(name_or_path, num_nodes)
    ref = ClusterRef(name=profile.name, source="file", path=name_or_path, sha256=file_sha256(path))
    return ResolvedCluster(profile, ref)


def resolve_model(name_or_path: str) -> tuple[ModelSpec, ModelRef]:
    """The model ``--model`` names, and how a plan records it."""
    model = load_model(name_or_path)
    if name_or_path.lower() in {name.lower() for name in catalog_names()}:
        return model, ModelRef(name=model.name or name_or_path, source="catalog")
    ref = ModelRef(
        name=model.name or Path(name_or_path).stem,
        source="file",
        path=name_or_path,
        sha256=file_sha256(Path(name_or_path)),
    )
    return model, ref


def _candidates(given: str, plan_dir: Path | None) -> list[Path]:
    path = Path(given)
    return [path] if path.is_absolute() or plan_dir is None else [path, plan_dir / path]


def find_file(given: str, plan_dir: Path | None) -> Path | None:
    """The file as given (relative to the current directory), else relative to the plan's folder."""
    return next((candidate for candidate in _candidates(given, plan_dir) if candidate.is_file()), None)


def _locate(given: str, what: str, plan_dir: Path | None) -> Path:
    found = find_file(given, plan_dir)
    if found is None:
        where = " or ".join(f"'{c}'" for c in _candidates(given, plan_dir))
        raise SpecError(
            f"the plan's {what} file '{given}' is not at {where}: run from the directory the plan was solved in, "
            f"or name the {what} yourself (--{what} FILE)."
        )
    return found


def _verified(given: str, recorded: str, what: str, plan_dir: Path | None) -> Path:
    path = _locate(given, what, plan_dir)
    now = file_sha256(path)
    if now != recorded:
        raise SpecError(
            f"the plan's {what} file '{path}' changed since the plan was made (sha256 {recorded[:12]} then, "
            f"{now[:12]} now): re-solve the plan, or pass --{what} {path} to use the file as it is now."
        )
    return path


def load_plan_model(ref: ModelRef, plan_dir: Path | None = None) -> ModelSpec:
    """The model a plan records (``plan_dir``: the plan file's folder, where a relative path may point)."""
    if ref.source == "derived":
        raise SpecError(f"the plan's model '{ref.name}' was defined inside another document: pass --model.")
    if ref.source == "catalog":
        return load_model(ref.name)
    assert ref.path is not None and ref.sha256 is not None  # the schema's rule for files
    return load_model_file(_verified(ref.path, ref.sha256, "model", plan_dir))


def load_plan_cluster(ref: ClusterRef, num_nodes: int, plan_dir: Path | None = None) -> ClusterProfile:
    """The cluster profile a plan records, at the plan's node count."""
    if ref.source == "derived":
        raise SpecError(
            f"the plan's cluster '{ref.name}' was derived from another profile (--what-if) and not stored: "
            "pass --cluster to price the plan on a profile."
        )
    if ref.source == "bundled":
        return load_cluster(ref.name, num_nodes)
    assert ref.path is not None and ref.sha256 is not None  # the schema's rule for files
    return load_cluster(str(_verified(ref.path, ref.sha256, "cluster", plan_dir)), num_nodes)
