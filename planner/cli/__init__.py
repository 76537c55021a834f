"""The ``moeplan`` command line (typer): one module per command group, each parsing options and
rendering results; the work is done in ``planner.workflows``.

- ``catalog``: models, clusters, show, schema;
- ``estimate``; ``solve``; ``emit`` (emit and plot); ``run``; ``probe`` (probe and testbed);
- ``accuracy`` (validate, check, calibrate).

The modules register their commands on import, in this order (the order ``moeplan --help`` lists).

They do not use ``from __future__ import annotations``: typer reads every command's annotations at each
start, and strings it must ``eval`` (compiling each) cost about 40 ms where evaluated annotations cost
nothing.
"""

# isort: off
from planner.cli import catalog, estimate, solve, emit, run, probe, accuracy  # noqa: F401
from planner.cli.app import app, main

# isort: on

__all__ = ["app", "main"]
