"""``moeplan probe`` and ``moeplan testbed up|down|status``: measure a cluster, or emulate one."""

from pathlib import Path
from typing import Annotated, Any

from planner.cli.app import JsonFlag, app, out, print_json, testbed_app, user_errors, warn
from planner.cli.options import BackendChoice, Opt
from planner.cli.progress import progress_bar
from planner.present.report import render_probe
from planner.specfiles import check_writable

__all__: list[str] = []


@app.command("probe")
@user_errors
def probe_command(
    nproc: Annotated[int | None, Opt(help="Start N local ranks over loopback (not under torchrun).")] = None,
    backend: Annotated[
        BackendChoice, Opt(help="nccl on GPUs, gloo on CPUs; auto picks nccl when every rank has a GPU.")
    ] = BackendChoice.AUTO,
    testbed: Annotated[
        bool, Opt("--testbed", help="Run the ranks on the emulated cluster of `moeplan testbed up`.")
    ] = False,
    budget: Annotated[float, Opt(help="Seconds the whole probe may take, start-up included.")] = 60.0,
    output: Annotated[
        Path | None,
        Opt(
            "-o", "--output", help="Write the cluster profile (YAML) here; it is also kept as the last probe."
        ),
    ] = None,
    name: Annotated[str | None, Opt(help="Profile name (default probe-HOST-NODESxRANKS).")] = None,
    gpu: Annotated[
        str | None,
        Opt(
            help="Catalog GPU whose datasheet peaks the measured fractions refer to (default: by device name)."
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Discover the cluster's topology, time its collectives (nccl-tests conventions) and write a profile.

    Under torchrun it runs as one rank per process; `--nproc N` starts N local ranks; `--testbed` runs on
    the emulated cluster. The profile is what `moeplan solve --cluster FILE` reads. Series the profile
    does not need and that give no fit are skipped, and poor fits kept, each with a warning; a series it
    needs that gives no fit is exit 5 with nothing written.
    """
    import shlex
    import sys

    from planner.probe.build import nccl_tests_table, probe_summary
    from planner.workflows.probe import ProbeRequest, run_probe

    if output is not None:
        check_writable(output)  # before the probe's minutes, not after them
    request = ProbeRequest(
        nproc=nproc,
        backend=backend.value,
        testbed=testbed,
        budget_s=budget,
        output=output,
        name=name,
        gpu=gpu,
        command=shlex.join(["moeplan", *sys.argv[1:]]),
    )
    with progress_bar("probe") as progress:
        outcome = run_probe(request, progress)
    if outcome is None:  # a rank other than 0 under torchrun
        return
    summary = probe_summary(outcome.results, outcome.profile)
    summary["written"] = [str(path) for path in outcome.written]
    if as_json:
        print_json(summary)
    else:
        print(nccl_tests_table(outcome.results))
        out.print(render_probe(summary))
        for path in outcome.written:
            out.print(f"wrote {path}")
    # On stderr whatever the format: series skipped and poor fits, as the profile's provenance records them.
    for line in outcome.profile.provenance.warnings or ():
        warn(line)


def _testbed_summary(bed: Any) -> dict[str, Any]:
    return {
        "nodes": bed.nodes,
        "ranks_per_node": bed.ranks_per_node,
        "inter_node_mbit": bed.inter_node_mbit,
        "inter_node_gbps": bed.inter_node_gbps,
        "inter_node_delay_ms": bed.inter_node_delay_ms,
        "namespaces": bed.namespaces,
        "addresses": bed.addresses,
        "interface": bed.interface,
        "created": bed.created,
    }


def _print_testbed(bed: Any, as_json: bool) -> None:
    if as_json:
        print_json(_testbed_summary(bed))
        return
    out.print(
        f"testbed: {bed.nodes} nodes x {bed.ranks_per_node} ranks, inter-node {bed.inter_node_mbit:g} Mbit/s "
        f"({bed.inter_node_gbps:.6g} GB/s) per node link and direction, delay {bed.inter_node_delay_ms:g} ms"
    )
    for node in range(bed.nodes):
        out.print(f"  node {node}: namespace {bed.namespace(node)}, {bed.interface} {bed.address(node)}")


@testbed_app.command("up")
@user_errors
def testbed_up(
    nodes: Annotated[int, Opt(help="Nodes (network namespaces).")] = 2,
    ranks_per_node: Annotated[int, Opt(help="Ranks each node runs (they share its link).")] = 2,
    inter_node_mbit: Annotated[float, Opt(help="Each node's link rate per direction, Mbit/s.")] = 200.0,
    inter_node_delay_ms: Annotated[
        float, Opt(help="One-way node-to-node delay, ms (needs the kernel's netem qdisc).")
    ] = 0.0,
    as_json: JsonFlag = False,
) -> None:
    """Create the emulated cluster: namespaces as nodes, veth links through a bridge, tc rate limits."""
    from planner.execution.testbed import up

    _print_testbed(up(nodes, ranks_per_node, inter_node_mbit, inter_node_delay_ms), as_json)


@testbed_app.command("down")
@user_errors
def testbed_down(as_json: JsonFlag = False) -> None:
    """Remove everything the testbed created (also after a crash)."""
    from planner.execution.testbed import down

    removed = down()
    if as_json:
        print_json({"removed": removed})
    else:
        out.print(f"removed {', '.join(removed)}" if removed else "nothing to remove")


@testbed_app.command("status")
@user_errors
def testbed_status(as_json: JsonFlag = False) -> None:
    """Show the running testbed, if any."""
    from planner.execution.testbed import status

    bed = status()
    if bed is None:
        if as_json:
            print_json(None)
        else:
            out.print("no testbed is up")
        return
    _print_testbed(bed, as_json)
