"""The cost model: pure functions of (model, training, plan, cluster) -> numbers. No I/O, no torch.

Modules: ``params`` (parameter counts), ``flops`` (Megatron's FLOPs count), ``layout`` (where groups
live), ``traffic`` (dispatch volumes), ``comm`` (collective times), ``compute`` (kernel times),
``memory`` (bytes per GPU), ``estimate`` (the composition). See ``README.md`` beside them.
"""

from planner.costmodel.compute import BUNDLED_RUNTIME, MEGATRON_CORE_EAGER, with_framework
from planner.costmodel.estimate import estimate
from planner.costmodel.params import ParamCounts, count_params

__all__ = [
    "BUNDLED_RUNTIME",
    "MEGATRON_CORE_EAGER",
    "ParamCounts",
    "count_params",
    "estimate",
    "with_framework",
]
