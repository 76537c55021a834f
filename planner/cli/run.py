"""``moeplan run``: train a plan's layout with the bundled torch.distributed runtime, beside the cost
model's prediction of what ran; every plan setting the runtime does not run is named."""

import json
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Annotated

from planner.cli.app import JsonFlag, app, out, print_json, user_errors, warn
from planner.cli.options import BackendChoice, DispatcherChoice, Opt, SetOpt, set_assignments
from planner.cli.progress import progress_bar
from planner.execution.launcher import ProgressFn
from planner.present.report import render_run
from planner.specfiles import atomic_write_text, check_writable

__all__: list[str] = []


@app.command("run")
@user_errors
def run_command(
    plan_file: Annotated[
        Path | None, Opt("--plan", help="A plan document (moeplan solve -o); flags override it.")
    ] = None,
    model: Annotated[
        str | None, Opt(help="Model to train instead of the plan's (e.g. tiny-moe on CPU).")
    ] = None,
    nproc: Annotated[int | None, Opt(help="Start N local ranks over loopback.")] = None,
    testbed: Annotated[bool, Opt("--testbed", help="Run the ranks on the emulated cluster.")] = False,
    ranks_per_node: Annotated[
        int | None,
        Opt(help="Local runs: treat every R consecutive ranks as one node (default: the plan's node shape)."),
    ] = None,
    tp: Annotated[int | None, Opt(help="Tensor parallel degree (attention and dense FFNs split).")] = None,
    sequence_parallel: Annotated[
        bool | None,
        Opt(
            "--sequence-parallel/--no-sequence-parallel",
            help="Split the residual stream over TP along the sequence (Megatron SP); default: the plan's.",
        ),
    ] = None,
    pp: Annotated[
        int | None, Opt(help="Pipeline stages (torch.distributed.pipelining 1F1B; interleaved with --vpp).")
    ] = None,
    vpp: Annotated[int | None, Opt(help="Virtual pipeline stages per rank (interleaved 1F1B).")] = None,
    ep: Annotated[int | None, Opt(help="Expert parallel degree.")] = None,
    etp: Annotated[int | None, Opt(help="Expert tensor parallel degree (each expert's FFN split).")] = None,
    cp: Annotated[
        int | None, Opt(help="Context parallel degree (key/value all-gather over the CP group).")
    ] = None,
    mbs: Annotated[int | None, Opt(help="Micro-batch size.")] = None,
    dispatcher: Annotated[
        DispatcherChoice | None,
        Opt(help="Token dispatcher (overrides the plan's; one the runtime implements)."),
    ] = None,
    a2a_chunks: Annotated[int | None, Opt(help="Chunks of the monta dispatcher's pipeline.")] = None,
    condense_threshold: Annotated[
        float | None,
        Opt(help="Luffy condensation: cosine similarity above which a token reuses another's result."),
    ] = None,
    topology_aware_routing: Annotated[
        bool | None,
        Opt(
            "--topology-aware-routing/--no-topology-aware-routing",
            help="TA-MoE's topology-aware loss (target from the cluster's bandwidths); default: the plan's.",
        ),
    ] = None,
    sequence_migration: Annotated[
        bool | None,
        Opt(
            "--sequence-migration/--no-sequence-migration",
            help="Luffy sequence migration (alltoall dispatcher, tp/cp/pp/etp 1); default: the plan's.",
        ),
    ] = None,
    set_fields: SetOpt = None,
    strict: Annotated[
        bool,
        Opt("--strict", help="Refuse a plan with settings the runtime does not run (default: list them)."),
    ] = False,
    steps: Annotated[int, Opt(help="Optimizer steps.")] = 20,
    seed: Annotated[int, Opt(help="Seed of the weights and the synthetic data.")] = 0,
    seq_len: Annotated[
        int | None, Opt(help="Sequence length (default: the plan's when running its model, else 64).")
    ] = None,
    gbs: Annotated[
        int | None,
        Opt(
            help="Global batch (default: the plan's when running its model, else 2 micro-batches per DP rank)."
        ),
    ] = None,
    cluster: Annotated[
        str | None,
        Opt(
            help="Profile for the prediction and TA-MoE (default: the plan's, else the last probe, else a800-2x8)."
        ),
    ] = None,
    checkpoint_dir: Annotated[
        Path | None, Opt(help="Write checkpoints here (torch.distributed.checkpoint, atomic).")
    ] = None,
    checkpoint_every: Annotated[
        int, Opt(help="Steps between checkpoints (the last step is always saved).")
    ] = 10,
    keep_checkpoints: Annotated[
        int,
        Opt(
            help="Checkpoints kept in --checkpoint-dir; older ones are removed after each save (default 2: "
            "the newest and one before it, in case the newest proves bad)."
        ),
    ] = 2,
    resume: Annotated[
        bool,
        Opt(
            "--resume",
            help="Continue from the newest checkpoint in --checkpoint-dir (same ranks, layout and model).",
        ),
    ] = False,
    timeout: Annotated[
        float, Opt(help="Collective timeout, seconds: a dead rank fails the job after this long.")
    ] = 60.0,
    output: Annotated[
        Path | None,
        Opt("-o", "--output", help="Write the run record (JSON) here, e.g. for moeplan calibrate."),
    ] = None,
    backend: Annotated[
        BackendChoice, Opt(help="auto: NCCL when every local rank has a GPU, else gloo.")
    ] = BackendChoice.AUTO,
    as_json: JsonFlag = False,
) -> None:
    """Train a plan's layout with the bundled torch.distributed runtime and compare it with the prediction."""
    from planner.workflows.layouts import shorthand_assignments
    from planner.workflows.run_report import run_and_report
    from planner.workflows.run_request import RunAsk, build_run_request, runs_as_rank

    assignments = shorthand_assignments(
        tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, etp=etp, mbs=mbs, sequence_parallel=sequence_parallel,
        dispatcher=dispatcher, a2a_chunks=a2a_chunks, topology_aware_routing=topology_aware_routing,
        sequence_migration=sequence_migration, seq_len=seq_len, gbs=gbs,
    ) + set_assignments(set_fields)  # fmt: skip
    ask = RunAsk(
        plan_path=plan_file, model=model, nproc=nproc, testbed=testbed, ranks_per_node=ranks_per_node,
        assignments=tuple(assignments), steps=steps, seed=seed, cluster=cluster,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
        resume=resume,
        timeout_s=timeout, backend=backend.value, condense_threshold=condense_threshold, strict=strict,
    )  # fmt: skip
    # Progress from the start: choosing the backend imports torch, which takes seconds. A torchrun rank
    # shows none (its job's launcher has the terminal); an input error within a second shows none either.
    bar: AbstractContextManager[ProgressFn | None] = (
        nullcontext() if runs_as_rank(ask) else progress_bar("run", delay_s=1.0)
    )
    with bar as progress:
        if progress is not None:
            progress(0, 0, "checking the layout and this host's devices")
        if output is not None:
            check_writable(output)  # before the job, not after it: a run's record would be lost
        request = build_run_request(ask)
        for ignored in request.ignored:
            warn(str(ignored))
        for note in request.notes:
            warn(note)
        report = run_and_report(request, cluster, progress)
    if report is None:  # not rank 0 of a torchrun job: rank 0 reports for the job
        return
    if output is not None:
        atomic_write_text(output, json.dumps(report, indent=2, sort_keys=True) + "\n")
    if as_json:
        print_json(report)
    else:
        out.print(render_run(report))
