"""``moeplan emit`` and ``moeplan plot``: a plan file as a launch format, or as figures."""

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from planner.cli.app import app, out, user_errors
from planner.cli.options import DefaultClusterOpt, EmitFormat, GbsOpt, NodesOpt, Opt, PrecisionOpt, SeqLenOpt
from planner.emit import FORMATS
from planner.errors import SpecError

__all__: list[str] = []


class LaunchChoice(StrEnum):
    runtime = "runtime"
    megatron = "megatron"
    torchtitan = "torchtitan"


_FORMATS_HELP = "Launch format: " + "; ".join(f"{name}: {f.description}" for name, f in FORMATS.items()) + "."


@app.command("emit")
@user_errors
def emit_command(
    plan_file: Annotated[Path, Opt("--plan", help="A plan document written by moeplan solve -o.")],
    fmt: Annotated[EmitFormat, Opt("--format", help=_FORMATS_HELP)],
    megatron_version: Annotated[str | None, Opt(help="Megatron-Core release to target (e.g. 0.16).")] = None,
    launch: Annotated[
        LaunchChoice | None,
        Opt(
            help="Slurm: what each node runs: moeplan's runtime, Megatron-LM's pretrain_gpt.py ($MEGATRON_LM) or "
            "torchtitan.train."
        ),
    ] = None,
    partition: Annotated[str | None, Opt(help="Slurm: --partition.")] = None,
    account: Annotated[str | None, Opt(help="Slurm: --account.")] = None,
    time: Annotated[
        str | None, Opt(help="Slurm: --time (minutes, HH:MM:SS or D-HH:MM:SS; default 01:00:00).")
    ] = None,
    job_name: Annotated[str | None, Opt(help="Slurm: --job-name (default moeplan).")] = None,
    cpus_per_task: Annotated[int | None, Opt(help="Slurm: --cpus-per-task of each node's task.")] = None,
    slurm_output: Annotated[str | None, Opt(help="Slurm: --output path (default %x-%j.out).")] = None,
    slurm_error: Annotated[str | None, Opt(help="Slurm: --error path (default: with the output).")] = None,
) -> None:
    """Print a plan as Megatron-LM arguments, a torchtitan config, a torchrun command or a Slurm script."""
    from planner.emit import SlurmOptions
    from planner.workflows.emit import emit_plan_file

    given = {
        "launch": launch.value if launch else None, "partition": partition, "account": account, "time": time,
        "job_name": job_name, "cpus_per_task": cpus_per_task, "output": slurm_output, "error": slurm_error,
    }  # fmt: skip
    chosen: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
    if chosen and fmt.value != "slurm":
        flags = ", ".join("--" + name.replace("_", "-") for name in chosen)
        raise SpecError(f"{flags} apply to --format slurm, not {fmt.value}.")
    print(emit_plan_file(plan_file, fmt.value, megatron_version, SlurmOptions(**chosen)), end="")


@app.command("plot")
@user_errors
def plot_command(
    output: Annotated[
        Path, Opt("-o", "--output", help="Figure file: .png, .svg or .html (page with tables).")
    ],
    plan_file: Annotated[
        Path | None, Opt("--plan", help="Draw this plan document (moeplan solve -o).")
    ] = None,
    model: Annotated[str | None, Opt(help="Or solve this model and draw its top plans.")] = None,
    cluster: DefaultClusterOpt = None,
    nodes: NodesOpt = None,
    seq_len: SeqLenOpt = None,
    gbs: GbsOpt = None,
    precision: PrecisionOpt = None,
    top: Annotated[int, Opt(help="Plans to compare in the breakdown (the best first).")] = 3,
) -> None:
    """Draw the estimate breakdown of the top plans and a timeline of one step (PNG, SVG or HTML)."""
    from planner.present.plot import write_figure
    from planner.workflows.layouts import layout_from, shorthand_assignments
    from planner.workflows.plot import plan_entries, solved_entries

    if (plan_file is None) == (model is None):
        raise SpecError(
            "moeplan plot needs exactly one of --plan (a plan document) and --model (solve, then draw)"
        )
    if top < 1:
        raise SpecError(f"--top ({top}) must be at least 1")
    if plan_file is not None:
        if any(v is not None for v in (cluster, nodes, seq_len, gbs, precision)):
            raise SpecError(
                "--cluster, --nodes, --seq-len, --gbs and --precision apply with --model; a plan (--plan) "
                "records its own (moeplan estimate --plan --set changes them)"
            )
        entries, title = plan_entries(plan_file)
    else:
        assert model is not None
        training, _ = layout_from(shorthand_assignments(seq_len=seq_len, gbs=gbs, precision=precision), 1)
        entries, title = solved_entries(model, cluster, nodes, training, top)
    write_figure(output, entries, title)
    out.print(
        f"wrote {output}: {len(entries)} plan(s), best {entries[0][1].step_time_s:.4g} s per step",
        soft_wrap=True,
    )
