"""How the cost model prices a run of moeplan's bundled runtime (``moeplan run``): the one rule for
which profile can price it, shared by ``moeplan run``'s prediction and ``moeplan calibrate``.

A run of W ranks placed R per node is priced on a profile of R GPUs per node (which bytes cross nodes
follows from that shape), resized to W / R nodes (a profile with a probed topology is not resized: it
must have the run's size), with the bundled runtime's framework overheads (``BUNDLED_RUNTIME``: none
beyond the probe's figures) unless the profile states its own.
"""

from __future__ import annotations

from planner.catalog import with_nodes
from planner.costmodel.compute import BUNDLED_RUNTIME, with_framework
from planner.costmodel.estimate import estimate
from planner.errors import SpecError
from planner.schema import ClusterProfile, Estimate, ModelSpec, ParallelConfig, TrainingSpec

__all__ = ["estimate_run", "run_profile"]


def run_profile(profile: ClusterProfile, world: int, ranks_per_node: int) -> ClusterProfile:
    """The profile that prices a run of ``world`` ranks, ``ranks_per_node`` per node; SpecError naming the
    mismatch when ``profile`` cannot."""
    if ranks_per_node < 1 or world % ranks_per_node:
        raise SpecError(f"the run's {world} ranks are not whole nodes of {ranks_per_node} ranks")
    if ranks_per_node != profile.num_gpus_per_node:
        raise SpecError(
            f"profile '{profile.name}' has {profile.num_gpus_per_node} GPUs per node, and the run has "
            f"ranks_per_node {ranks_per_node}: price it on the profile of the cluster it runs on"
        )
    nodes = world // ranks_per_node
    if nodes != profile.num_nodes and profile.topology is not None:
        raise SpecError(
            f"profile '{profile.name}' has a probed topology of {profile.num_nodes} node(s), and the run spans "
            f"{nodes}: a probed profile is not resized"
        )
    profile = with_framework(profile, BUNDLED_RUNTIME)
    return profile if nodes == profile.num_nodes else with_nodes(profile, nodes)


def estimate_run(
    model: ModelSpec,
    training: TrainingSpec,
    parallel: ParallelConfig,
    profile: ClusterProfile,
    world: int,
    ranks_per_node: int,
) -> Estimate:
    """The cost model's estimate of a bundled-runtime run (SpecError when ``profile`` cannot price it)."""
    return estimate(model, training, parallel, run_profile(profile, world, ranks_per_node))
