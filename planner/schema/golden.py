"""A regression case for ``moeplan check``: the inputs of one solve and the plan it must keep producing."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, PositiveFloat, PositiveInt, model_validator

from planner.schema._base import Spec
from planner.schema.margin import DEFAULT_MEMORY_MARGIN, check_memory_margin
from planner.schema.plan import DispatcherName
from planner.schema.training import TrainingSpec

__all__ = ["CHECK_FORMAT", "SEARCH_DEGREES", "CheckCase", "CheckSearch", "SearchDegree"]

SearchDegree = Literal["tp", "pp", "vpp", "cp", "ep", "etp", "micro_batch"]
"""The layout choices a user can hold at a value or bound (``moeplan solve --tp 2 --max-ep 64``)."""
SEARCH_DEGREES: tuple[SearchDegree, ...] = ("tp", "pp", "vpp", "cp", "ep", "etp", "micro_batch")

CHECK_FORMAT = "moeplan-check/1"
"""The ``format`` value every case file carries (how ``moeplan check`` tells a case from other YAML)."""


class CheckSearch(Spec):
    """What the solve may vary, as ``moeplan solve``'s options say it (defaults: the solver's)."""

    dispatchers: tuple[DispatcherName, ...] | None = None
    """Dispatchers to consider (``--dispatcher``: kinds, or kernel libraries such as ``deepep``); null:
    the solver's default set."""
    topology_aware_routing: bool = False
    """Allow TA-MoE's topology-aware dispatch (``--topology-aware-routing``)."""
    condense_fraction: float = Field(default=0.0, ge=0, lt=1)
    """Luffy's condensation rho (``--condense``)."""
    sequence_migration: bool = False
    """Offer Luffy's sequence migration (``--sequence-migration``)."""
    framework: Literal["megatron", "torchtitan", "moeplan"] = "megatron"
    """The framework the plan is for (``--framework``)."""
    memory_margin: Annotated[str, AfterValidator(check_memory_margin)] = DEFAULT_MEMORY_MARGIN
    """Memory kept free on every GPU (``--memory-margin``: 5%, 0.05 or 4GiB)."""
    fixed: dict[SearchDegree, PositiveInt] = Field(default_factory=dict)
    """Degrees held at a value (``--tp``, ``--pp``, ``--vpp``, ``--cp``, ``--ep``, ``--etp``, ``--mbs``)."""
    maxima: dict[SearchDegree, PositiveInt] = Field(default_factory=dict)
    """Upper bounds on degrees (``--max-tp``, ``--max-pp``, ``--max-ep``, ...)."""
    recompute: Literal["none", "selective", "full"] | None = None
    """Recompute granularity held (``--recompute``); null: the search chooses."""
    exhaustive: bool = False
    """Enumerate every stage assignment instead of the ILP (``--exhaustive``)."""
    time_limit_s: PositiveFloat = 120.0
    """Solver time limit. A case whose solve is cut by it is reported, since its plan is not proven."""


class CheckCase(Spec):
    """One case file (YAML): model, cluster, training settings, search options and the expected plan.

    Paths (``cluster`` when it is a file, ``expected``) are relative to the case file's folder.
    """

    format: Literal["moeplan-check/1"]
    """File format tag; ``moeplan check`` only reads files that carry it."""
    description: str | None = None
    """One line for people: what the case guards."""
    model: str
    """Catalog name or model file (as ``--model``)."""
    cluster: str
    """Bundled profile name or profile file (as ``--cluster``)."""
    nodes: PositiveInt | None = None
    """Node count override (as ``--nodes``)."""
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    """Sequence length, global batch, precision, routing."""
    search: CheckSearch = Field(default_factory=CheckSearch)
    """Solver options."""
    expected: str | None = None
    """The expected plan document (stable JSON as ``moeplan check --update`` writes it)."""
    expect_infeasible: bool = False
    """The case guards that no layout fits (solve's exit 3); then there is no ``expected`` plan."""
    tolerance: float = Field(default=0.005, ge=0, lt=1)
    """Largest relative change of the predicted step time that still passes (the layout must be identical)."""

    @model_validator(mode="after")
    def _expects_one_outcome(self) -> CheckCase:
        if self.expect_infeasible == (self.expected is not None):
            raise ValueError("give exactly one of expected (a plan file) and expect_infeasible: true")
        return self
