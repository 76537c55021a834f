"""Run torchtitan's own configuration code on emitted launches (``python tests/unit/torchtitan_check.py``).

Reads a JSON list of cases on stdin, each ``{"module", "config", "args", "subcommand", "world",
"num_layers", "expect"}``, and writes a JSON list of results on stdout, one per case: ``{"ok": true}`` or
``{"ok": false, "error": "..."}``. For each case it parses ``--module M --config C args subcommand`` with
torchtitan's ``ConfigManager`` (tyro: an unknown or misplaced flag is an error), compares the parsed
fields with ``expect``, builds the device mesh with ``ParallelDims`` on a fake process group of ``world``
ranks (``_validate`` and ``_validate_meshes``: degrees multiply to the world, EP borrows a whole number of
ranks), and compares the pipeline split's module names with torchtitan's own
(``_generate_llm_fqn_per_model_part``). A process of its own: torchtitan's import and the process group
stay out of the test process.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from typing import Any


def _check(case: dict[str, Any]) -> None:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torchtitan.config import ConfigManager
    from torchtitan.distributed.parallel_dims import ParallelDims
    from torchtitan.distributed.pipeline_parallel import _generate_llm_fqn_per_model_part

    argv = ["--module", case["module"], "--config", case["config"], *case["args"], case["subcommand"]]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            config = ConfigManager().parse_args(argv)
        except SystemExit as exit_:  # tyro prints its refusal and exits
            raise AssertionError(f"torchtitan refused the arguments: {err.getvalue()[-2000:]}") from exit_
    for name, want in case["expect"].items():
        section, field = name.split(".")
        got = getattr(getattr(config, section), field)
        assert got == want, f"{name}: torchtitan read {got!r}, the plan says {want!r}"
    ac = config.activation_checkpoint
    read = (
        {"SelectiveAC": "selective", "FullAC": "full"}[type(ac).__qualname__.split(".")[0]] if ac else "none"
    )
    assert case["subcommand"] == f"activation_checkpoint:{read}", (read, case["subcommand"])
    world = case["world"]
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        dims = ParallelDims.from_config(config.parallelism, world)
        dims.build_mesh()
        dims._validate_meshes()
    finally:
        dist.destroy_process_group()
    parts = config.parallelism.module_fqns_per_model_part
    if config.parallelism.pipeline_parallel_degree > 1:
        names = [name for part in parts for name in part]
        assert names == _generate_llm_fqn_per_model_part(1, case["num_layers"], 1, 1)[0], names[:4]


def main() -> None:
    results = []
    for case in json.load(sys.stdin):
        try:
            _check(case)
            results.append({"ok": True})
        except Exception as error:  # reported per case, so one bad case names itself
            results.append({"ok": False, "error": f"{type(error).__name__}: {error}"})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
