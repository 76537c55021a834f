"""The one schema: pydantic specs for models, hardware, training and plans (the single source of truth).

Every input file, CLI option, emitter and JSON Schema derives from these classes. Single-object rules
are validators here; rules across objects (degrees vs world size vs model) are in ``planner.feasibility``.
"""

from planner.schema.golden import CHECK_FORMAT, SEARCH_DEGREES, CheckCase, CheckSearch, SearchDegree
from planner.schema.hardware import (
    COLLECTIVE_KINDS,
    AlphaBetaFit,
    ClusterProfile,
    CollectiveKind,
    ComputeEfficiency,
    FrameworkOverheads,
    GpuSpec,
    LinkClass,
    LinkClassName,
    NicAffinity,
    PeakTflops,
    Provenance,
)
from planner.schema.margin import DEFAULT_MEMORY_MARGIN, check_memory_margin, memory_margin_bytes
from planner.schema.model import MlaSpec, ModelSpec
from planner.schema.plan import (
    PLAN_SCHEMA_VERSION,
    RECOMPUTE_MODULES,
    ClusterRef,
    CostTerm,
    DispatcherBackend,
    DispatcherKind,
    DispatcherName,
    DispatcherSpec,
    Estimate,
    MemoryUse,
    MeshAxis,
    ModelRef,
    ParallelConfig,
    Plan,
    PlanProvenance,
    SolverInfo,
)
from planner.schema.training import Precision, RoutingMode, TrainingSpec

__all__ = [
    "CHECK_FORMAT",
    "CheckCase",
    "CheckSearch",
    "COLLECTIVE_KINDS",
    "DEFAULT_MEMORY_MARGIN",
    "SEARCH_DEGREES",
    "SearchDegree",
    "check_memory_margin",
    "memory_margin_bytes",
    "PLAN_SCHEMA_VERSION",
    "RECOMPUTE_MODULES",
    "AlphaBetaFit",
    "ClusterProfile",
    "CollectiveKind",
    "ComputeEfficiency",
    "FrameworkOverheads",
    "ClusterRef",
    "CostTerm",
    "DispatcherBackend",
    "DispatcherKind",
    "DispatcherName",
    "DispatcherSpec",
    "Estimate",
    "GpuSpec",
    "LinkClass",
    "LinkClassName",
    "MemoryUse",
    "MeshAxis",
    "ModelRef",
    "MlaSpec",
    "ModelSpec",
    "NicAffinity",
    "ParallelConfig",
    "PeakTflops",
    "Plan",
    "PlanProvenance",
    "Precision",
    "Provenance",
    "RoutingMode",
    "SolverInfo",
    "TrainingSpec",
]
