"""A plan file and the inputs it records: the model and the cluster profile, loaded from the plan alone
(``planner.catalog.refs``), unless the user names others."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from planner.catalog import load_cluster, load_model, load_plan_cluster, load_plan_model
from planner.emit import load_plan
from planner.schema import ClusterProfile, ModelSpec, Plan

__all__ = ["PlanFile", "read_plan"]


@dataclass(frozen=True, slots=True)
class PlanFile:
    """A plan and where it was read from (a relative input path may be relative to its folder)."""

    plan: Plan
    path: Path

    def model(self, override: str | None = None) -> ModelSpec:
        """The plan's model, or the one ``override`` names."""
        return load_model(override) if override else load_plan_model(self.plan.model, self.path.parent)

    def cluster(self, override: str | None = None, num_nodes: int | None = None) -> ClusterProfile:
        """The plan's cluster profile at its node count, or the one ``override`` names (at ``num_nodes``,
        else the plan's node count when the override is resizable)."""
        nodes = num_nodes or self.plan.num_nodes
        if override:
            return load_cluster(override, num_nodes)
        return load_plan_cluster(self.plan.cluster, nodes, self.path.parent)


def read_plan(path: Path | str) -> PlanFile:
    """Read a plan document (a version 1 plan is migrated where it can be; see ``load_plan``)."""
    return PlanFile(load_plan(path), Path(path))
