"""Rich renderables for the CLI: catalog tables and spec views. With cli.py, the only rich user."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from planner.costmodel import count_params
from planner.present.labels import layout_label, memory_held_by
from planner.schema import COLLECTIVE_KINDS, ClusterProfile, Estimate, ModelSpec, ParallelConfig, Plan
from planner.units import GIB, human_bytes, human_count

if TYPE_CHECKING:
    from planner.accuracy.golden import CaseOutcome
    from planner.accuracy.validate import ValidationReport
    from planner.costmodel.framework_fit import FitUse

__all__ = [
    "render_calibration",
    "render_check_outcome",
    "render_cluster",
    "render_clusters",
    "render_estimate",
    "render_memory",
    "render_model",
    "render_models",
    "render_plan",
    "render_probe",
    "render_run",
    "render_validation",
    "render_what_if",
]


def _experts(model: ModelSpec) -> str:
    if not model.is_moe:
        return "dense"
    text = f"{model.num_experts} top-{model.moe_router_topk}"
    if model.shared_expert_ffn_hidden_size:
        text += " +shared"
    return text


def render_models(models: list[ModelSpec]) -> Table:
    """One row per catalog model: depth, attention kind, experts, total and active parameters (fits 80 columns)."""
    table = Table(title="Model catalog", title_justify="left")
    for column, justify in (
        ("name", "left"),
        ("layers", "right"),
        ("attn", "left"),
        ("experts", "left"),
        ("total", "right"),
        ("active", "right"),
    ):
        table.add_column(column, justify=justify, no_wrap=column in ("name", "experts"))  # type: ignore[arg-type]
    for model in models:
        counts = count_params(model)
        table.add_row(
            model.name or "?",
            str(model.num_layers),
            model.attention.upper(),
            _experts(model),
            human_count(counts.total),
            human_count(counts.active),
        )
    return table


def render_model(model: ModelSpec) -> Group:
    """Every field of one model, its parameter counts, and its source."""
    counts = count_params(model)
    table = Table(title=f"Model {model.name}", title_justify="left", show_header=False)
    table.add_column("field")
    table.add_column("value")
    for field, value in model.model_dump(exclude={"source", "notes", "name"}).items():
        table.add_row(field, str(value))
    table.add_row("total parameters", f"{human_count(counts.total)} ({counts.total:,})")
    table.add_row("active parameters", f"{human_count(counts.active)} ({counts.active:,})")
    if counts.mtp:
        table.add_row("MTP parameters", f"{human_count(counts.mtp)} (not in the total)")
    parts: list[Table | Text] = [table, Text(f"source: {model.source}", style="dim")]
    if model.notes:
        parts.append(Text(f"notes: {model.notes}", style="dim"))
    return Group(*parts)


def render_clusters(clusters: list[ClusterProfile]) -> Table:
    """One row per cluster profile: size, GPU, and all-to-all bandwidth per link class."""
    table = Table(title="Cluster profiles", title_justify="left")
    for column in ("name", "nodes", "GPUs/node", "GPUs", "GPU", "HBM", "intra a2a GB/s", "inter a2a GB/s"):
        table.add_column(column, no_wrap=column in ("name", "GPU"))
    for cluster in clusters:
        inter = cluster.links.get("inter_node")
        table.add_row(
            cluster.name,
            str(cluster.num_nodes),
            str(cluster.num_gpus_per_node),
            str(cluster.world_size),
            cluster.gpu.name or "?",
            human_bytes(cluster.gpu.hbm_gib * 2**30),
            f"{cluster.links['intra_node'].collectives['all_to_all'].bandwidth_gbps:g}",
            f"{inter.collectives['all_to_all'].bandwidth_gbps:g}" if inter else "-",
        )
    return table


def render_cluster(cluster: ClusterProfile) -> Group:
    """A cluster's size, GPU, and the alpha-beta fit of every collective on each link class."""
    gpu = cluster.gpu
    peak = gpu.peak_tflops.bf16 or gpu.peak_tflops.fp16
    header = Text(
        f"{cluster.name}: {cluster.num_nodes} nodes x {cluster.num_gpus_per_node} {gpu.name} = "
        f"{cluster.world_size} GPUs; {peak:g} TFLOP/s half precision, {gpu.hbm_gib:g} GiB at {gpu.hbm_gbps:g} GB/s"
    )
    table = Table(title="Links: busbw per GPU (nccl-tests convention) and latency", title_justify="left")
    table.add_column("link class", no_wrap=True)
    table.add_column("collective", no_wrap=True)
    table.add_column("busbw GB/s", justify="right")
    table.add_column("latency us", justify="right")
    table.add_column("medium (nominal GB/s per direction)")
    for name, link in sorted(cluster.links.items()):
        for i, kind in enumerate(COLLECTIVE_KINDS):
            fit = link.collectives[kind]
            medium = f"{link.medium} ({link.nominal_gbps:g})" if i == 0 else ""
            table.add_row(
                name if i == 0 else "", kind, f"{fit.bandwidth_gbps:g}", f"{fit.latency_us:g}", medium
            )
    provenance = cluster.provenance
    footer = Text(f"provenance ({provenance.kind}): {provenance.source}", style="dim")
    return Group(header, table, footer)


def render_memory(estimate: Estimate, hbm_bytes: float) -> Table:
    """Where the peak memory goes, on the GPU where it is reached, and what is left of ``hbm_bytes``."""
    use = estimate.memory
    table = Table(
        title="Memory per GPU"
        + (f" (pipeline rank {use.pipeline_rank}, where it peaks)" if use is not None else ""),
        title_justify="left",
    )
    table.add_column("held by", no_wrap=True)
    table.add_column("GiB", justify="right")
    table.add_column("share", justify="right")
    peak = estimate.peak_memory_bytes
    for name, amount in memory_held_by(use) if use is not None else []:
        table.add_row(name, f"{amount / GIB:.2f}", f"{amount / peak:.1%}" if peak else "")
    table.add_row("peak", f"{peak / GIB:.2f}", "", style="bold")
    table.add_row("free of the GPU's memory", f"{(hbm_bytes - peak) / GIB:.2f}", "")
    if use is not None and use.host_optimizer:
        table.add_row("optimizer state on the host (CPU memory)", f"{use.host_optimizer / GIB:.2f}", "")
    return table


def _mfu(estimate: Estimate) -> str:
    """MFU over the peak the run's GEMMs run against: an FP8 run's FP8 peak, never its BF16 one alone."""
    return f"MFU {estimate.mfu:.1%}" if estimate.mfu_fp8 is None else f"MFU {estimate.mfu_fp8:.1%}"


def _mfu_peak(estimate: Estimate) -> str:
    """Which peak the headline's MFU is over (and, for FP8, the BF16 figure the validation format uses)."""
    half = estimate.mfu_peak.upper()
    if estimate.mfu_fp8 is None:
        return f"MFU: model TFLOP/s over the GPU's dense {half} peak."
    return f"MFU: model TFLOP/s over the GPU's dense FP8 peak; over its {half} peak it is {estimate.mfu:.1%}."


def render_estimate(estimate: Estimate, title: str, hbm_bytes: float | None = None) -> Group:
    """Headline figures, then every term of the step time (total and exposed), then bytes per link class,
    then (given the GPU's memory) where the peak memory goes."""
    head = Text(
        f"step {estimate.step_time_s:.3f} s | {estimate.tokens_per_s_per_gpu:,.0f} tokens/s/GPU | "
        f"{estimate.model_tflops_per_gpu:.0f} model TFLOP/s/GPU | {_mfu(estimate)} | "
        f"memory {human_bytes(estimate.peak_memory_bytes)}" + ("" if estimate.fits else " (DOES NOT FIT)")
    )
    table = Table(title=title, title_justify="left")
    table.add_column("term", no_wrap=True)
    table.add_column("total s", justify="right")
    table.add_column("exposed s", justify="right")
    table.add_column("share", justify="right")
    table.add_column("link")
    for term in sorted(estimate.breakdown, key=lambda t: -t.exposed_s):
        share = term.exposed_s / estimate.step_time_s if estimate.step_time_s else 0.0
        table.add_row(
            term.name, f"{term.total_s:.4f}", f"{term.exposed_s:.4f}", f"{share:.1%}", term.link_class or ""
        )
    traffic = ", ".join(f"{link} {human_bytes(b)}" for link, b in estimate.bytes_per_link_class.items())
    parts: list[Table | Text] = [
        head,
        table,
        Text(f"bytes per GPU per step: {traffic or 'none'}", style="dim"),
        Text(_mfu_peak(estimate), style="dim"),
    ]
    if hbm_bytes is not None:
        parts.append(render_memory(estimate, hbm_bytes))
    return Group(*parts)


def render_validation(report: ValidationReport, fit: FitUse | None = None, locked: bool = False) -> Group:
    """Predicted against measured per case, and the ranking of each group; ``locked``: the file is one the
    fit script scores after fitting and never fits to."""
    cases = Table(title="Cases: predicted vs measured", title_justify="left")
    for column in ("case", "metric", "predicted", "measured", "error", "fits", "peak GiB", "measured GiB"):
        cases.add_column(
            column, no_wrap=column == "case", justify="left" if column in ("case", "metric") else "right"
        )
    for case in report.cases:
        cases.add_row(
            case.id,
            case.metric,
            f"{case.predicted:,.3f}" if case.metric == "step_time_s" else f"{case.predicted:,.0f}",
            "oom"
            if case.measured is None
            else f"{case.measured:,.3f}"
            if case.metric == "step_time_s"
            else f"{case.measured:,.0f}",
            "" if case.error is None else f"{case.error:+.1%}",
            "yes" if case.fits else "OOM",
            f"{case.predicted_peak_gib:.1f}",
            ""
            if case.measured_peak_gib is None
            else f"{case.measured_peak_gib:.1f} ({case.memory_error:+.0%})",
        )
    groups = Table(title="Groups: ranking", title_justify="left")
    for column in ("group", "cases", "Kendall tau", "pairs ordered right", "best measured predicted best"):
        groups.add_column(column)
    for group in report.groups:
        groups.add_row(
            group.group,
            str(len(group.case_ids)),
            "n/a (predicted tie)" if math.isnan(group.kendall_tau) else f"{group.kendall_tau:+.2f}",
            f"{group.pairs_right:g} of {group.pairs}" if group.pairs else "",
            "yes" if group.top1_match else "NO",
        )
    first, ranked = report.top1_groups
    ranking = f"ranking: the best measured configuration predicted best in {first} of {ranked} groups" + (
        f"; {report.pairwise_accuracy:.0%} of {report.pairs} measured pairs ordered right"
        if report.pairs
        else ""
    )
    memory = (
        f"memory: {len(report.false_oom)} run(s) that ran predicted out of memory"
        + (f" ({', '.join(report.false_oom)})" if report.false_oom else "")
        + (
            f", {len(report.oom_unless_unstated)} that fit only with the model-state settings "
            f"their source leaves open at their lightest ({', '.join(report.oom_unless_unstated)})"
            if report.oom_unless_unstated
            else ""
        )
        + f", {len(report.missed_oom)} that ran out of memory predicted to fit"
        + (f" ({', '.join(report.missed_oom)})" if report.missed_oom else "")
        + (
            f"; peak allocated memory error {report.memory_mape:.1%} over the runs that report a peak"
            if report.memory_mape is not None
            else "; no run reports its peak memory"
        )
    )
    error = f"mean absolute error over cases with a measured value: {report.mape:.1%}"
    if fit is not None:
        error += (
            f" (in-sample: {fit.figure} was fitted to this file by benchmarks/fit_framework_overheads.py; "
            f"held out, {fit.method}: {fit.held_out:.1%}, the error to expect on runs the fit has not seen)"
        )
    elif locked:
        error += (
            " (held out: a locked file, which benchmarks/fit_framework_overheads.py scores but never fits to)"
        )
    return Group(
        cases,
        groups,
        Text(error),
        Text(ranking),
        Text(memory),
    )


def _why(best: Estimate, other: Estimate) -> str:
    """The term whose exposed time grew the most from the best plan to ``other``."""
    mine = {t.name: t.exposed_s for t in best.breakdown}
    theirs = {t.name: t.exposed_s for t in other.breakdown}
    name = max(set(mine) | set(theirs), key=lambda n: theirs.get(n, 0.0) - mine.get(n, 0.0))
    return f"{name} +{theirs.get(name, 0.0) - mine.get(name, 0.0):.3f} s"


def render_plan(plan: Plan, alternatives: list[tuple[ParallelConfig, Estimate]], hbm_bytes: float) -> Group:
    """The chosen plan, its estimate, memory headroom, and the next best structures with why they lose."""
    p, estimate, solver = plan.parallel, plan.estimate, plan.solver
    assert estimate is not None and solver is not None  # a solved plan carries both
    t = plan.training
    header = Text(
        f"{plan.model.name} on {plan.cluster.name} ({plan.num_gpus} GPUs), sequence {t.seq_len}, global batch "
        f"{t.global_batch}, {t.precision}, routing {t.routing}\n"
        f"solver: {solver.status}{' (proven optimal)' if solver.optimal else ' (NOT proven optimal)'}, "
        f"{solver.candidates:,} layouts" + (f", {solver.solve_time_s:.2f} s" if solver.solve_time_s else "")
    )
    layout = Table(title="Plan", title_justify="left", show_header=False)
    layout.add_column("field")
    layout.add_column("value")
    layout.add_row("layout", layout_label(p))
    dispatcher = p.dispatcher.kind + (f" ({p.dispatcher.backend})" if p.dispatcher.backend else "")
    if p.dispatcher.num_chunks > 1:  # a pipelined dispatcher (the schema allows chunks only there)
        dispatcher += f", {p.dispatcher.num_chunks} chunks"
    # Model-altering techniques, named where the plan carries one.
    if p.dispatcher.topology_aware_routing:
        dispatcher += ", TA-MoE routing"
    if p.dispatcher.condense_fraction:
        dispatcher += f", condensation rho {p.dispatcher.condense_fraction:g}"
    if p.dispatcher.sequence_migration:
        dispatcher += ", sequence migration"
    if not p.moe_router_fusion:
        dispatcher += ", router unfused"
    if p.a2a_overlap:
        dispatcher += ", overlapped with compute"
        if p.delay_wgrad_compute:
            dispatcher += " (weight gradients delayed)"
    layout.add_row("dispatcher", dispatcher)
    modules = f" ({', '.join(p.effective_recompute_modules)})" if p.effective_recompute_modules else ""
    layout.add_row("recompute", p.recompute + modules)
    layout.add_row("sequence parallel", "yes" if p.sequence_parallel else "no")
    if p.dp_sharding == "fsdp2" and (p.distributed_optimizer or p.fsdp):
        kept = "resharded after forward" if p.fsdp else "BF16 weights kept gathered from forward to backward"
        layout.add_row("optimizer", f"FSDP2: FP32 weight, gradient and Adam shards over DP; {kept}")
    else:
        reduce = (
            ""
            if p.overlap_grad_reduce
            else "; gradients reduced after the backward (no --overlap-grad-reduce)"
        )
        layout.add_row("optimizer", p.optimizer.summary + reduce)
    if p.fp8_param_gather:
        layout.add_row("weights", "FP8, gathered in FP8 (--fp8-param-gather)")
    if p.attention_backend == "unfused":
        layout.add_row("attention", "unfused (keeps each layer's score matrix)")
    if p.tp_comm_overlap:
        layout.add_row("TP overlap", "Transformer Engine userbuffers (--tp-comm-overlap)")
    if p.cuda_graphs:
        how = "whole step" if p.cuda_graphs == ("full_iteration",) else "Transformer Engine, per layer"
        layout.add_row("CUDA graphs", f"{', '.join(p.cuda_graphs)} ({how})")
    if p.layers_per_stage is not None:
        layout.add_row("layers per stage", " ".join(str(n) for n in p.layers_per_stage))
    headroom = hbm_bytes - estimate.peak_memory_bytes
    margin = solver.memory_margin_bytes
    kept = f"; --memory-margin {human_bytes(margin)}" if margin else ""
    layout.add_row(
        "memory",
        f"{human_bytes(estimate.peak_memory_bytes)} of {human_bytes(hbm_bytes)} ({human_bytes(headroom)} free{kept})",
    )
    others = Table(title="Next best structures", title_justify="left")
    for column in ("layout", "step s", "slower", "why (largest growing term)"):
        others.add_column(column)
    for parallel, other in alternatives:
        slower = other.step_time_s / estimate.step_time_s - 1
        others.add_row(
            layout_label(parallel), f"{other.step_time_s:.3f}", f"+{slower:.1%}", _why(estimate, other)
        )
    return Group(header, layout, render_estimate(estimate, "Estimate", hbm_bytes), others)


def render_probe(summary: dict[str, Any]) -> Table:
    """The fitted link classes of a probe (``planner.probe.build.probe_summary``), one row per collective."""
    table = Table(
        title=(
            f"Probed {summary['nodes']} node(s) x {summary['ranks_per_node']} ranks ({summary['backend']}) "
            f"in {summary['elapsed_s']:.0f} s of a {summary['budget_s']:g} s budget"
        ),
        title_justify="left",
    )
    for column in ("link class", "collective", "busbw GB/s", "latency us", "fit rms", "sizes"):
        table.add_column(column, justify="left" if column in ("link class", "collective") else "right")
    for link in summary["links"]:
        for i, (kind, fit) in enumerate(sorted(link["collectives"].items())):
            table.add_row(
                link["class"] if i == 0 else "",
                kind,
                f"{fit['bandwidth_gbps']:.4g}",
                f"{fit['latency_us']:.1f}",
                f"{fit['rms_relative_error']:.1%}",
                str(fit["points"]),
            )
        summary_row = f"best {link['bandwidth_gbps']:.4g}"
        if "node_bandwidth_gbps" in link:
            summary_row += f" (node {link['node_bandwidth_gbps']:.4g})"
        table.add_row(
            "", "[bold]per rank[/]", summary_row, f"{link['latency_us']:.1f}", "", "", end_section=True
        )
    return table


def render_run(report: dict[str, Any]) -> Group:
    """A ``moeplan run`` record next to the cost model's prediction for the same layout."""
    p = report["parallel"]
    steps = Table(
        title=(
            f"{report['model']} on {report['world_size']} {report['backend']} ranks: tp{p['tp']} "
            + (f"pp{p['pp']} " if p["pp"] > 1 else "")
            + (f"vpp{p['vpp']} " if p["vpp"] > 1 else "")
            + (f"cp{p['cp']} " if p["cp"] > 1 else "")
            + f"ep{p['ep']} "
            + (f"etp{p['etp']} " if p["etp"] > 1 else "")
            + f"dp{p['dp']} mbs{p['micro_batch']}, dispatcher {p['dispatcher']['kind']}"
            + (f" (layout of plan {report['plan']})" if report.get("plan") else "")
        ),
        title_justify="left",
    )
    for column in ("step", "loss", "time s"):
        steps.add_column(column, justify="right")
    for record in report["steps"]:
        steps.add_row(str(record["step"]), f"{record['loss']:.4f}", f"{record['time_s']:.3f}")
    compare = Table(title=f"measured vs predicted ({report['prediction_note']})", title_justify="left")
    for column in ("figure", "measured", "predicted"):
        compare.add_column(column, justify="left" if column == "figure" else "right")
    predicted = report.get("predicted") or {}
    timed = [r["time_s"] for r in report["steps"][1:]] or [r["time_s"] for r in report["steps"]]
    compare.add_row(
        "step time s",
        f"{sum(timed) / len(timed):.4f}",
        f"{predicted['step_time_s']:.4f}" if predicted else "-",
    )
    world = report["world_size"]
    for link, total in sorted(report["bytes_per_link_class"].items()):
        # The runtime counts every collective, gradients included: compare with both predicted kinds.
        per_gpu = (
            predicted.get("bytes_per_link_class", {}).get(link, 0.0)
            + predicted.get("gradient_bytes_per_link_class", {}).get(link, 0.0)
            if predicted
            else None
        )
        compare.add_row(
            f"{link} bytes per rank per step",
            human_bytes(total / world),
            human_bytes(per_gpu) if per_gpu is not None else "-",
        )
    if report.get("interface_tx_bytes"):
        kernel = sum(report["interface_tx_bytes"].values()) / len(report["steps"]) / world
        compare.add_row("inter_node bytes per rank per step, kernel counters", human_bytes(kernel), "-")
    compare.add_row("peak memory", human_bytes(report["peak_memory_bytes"]),
                    human_bytes(predicted["peak_memory_bytes"]) if predicted else "-")  # fmt: skip
    ignored = report.get("ignored_plan_fields") or []
    if not ignored:
        return Group(steps, compare)
    limits = Table(title="plan settings the runtime did not run", title_justify="left")
    for column in ("setting", "plan", "ran", "why"):
        limits.add_column(column)
    for entry in ignored:
        limits.add_row(entry["field"], str(entry["value"]), str(entry["runs"]), entry["reason"])
    return Group(steps, compare, limits)


_CHECK_STATUS = {"pass": "[green]PASS[/]", "regression": "[red bold]FAIL[/]", "updated": "[yellow]UPDATED[/]"}


def render_check_outcome(outcome: CaseOutcome) -> Text:
    """One case of ``moeplan check``: status, file, time, then the readable diff indented below."""
    head = Text.from_markup(
        f"{_CHECK_STATUS[outcome.status]} {outcome.path} [dim]({outcome.seconds:.1f} s)[/]"
    )
    # A passing case says nothing more unless its predicted time moved (within the tolerance).
    quiet = outcome.status == "pass" and not outcome.relative_change
    body = [] if quiet else [Text(f"    {line}") for line in outcome.summary()]
    return Text("\n").join([head, *body])


def render_calibration(report: dict[str, Any]) -> Group:
    """``moeplan calibrate``: the knobs before and after, each run's error, and the mean errors."""
    knobs = Table(title="Calibrated knobs", title_justify="left")
    for column in ("knob", "probe", "calibrated"):
        knobs.add_column(column, justify="left" if column == "knob" else "right")
    for knob in report["knobs"]:
        knobs.add_row(knob["name"], f"{knob['before']:.4g}", f"{knob['after']:.4g}")
    runs = Table(title="Step time per run: measured vs predicted", title_justify="left")
    for column in ("run", "set", "measured s", "before s", "error", "after s", "error "):
        runs.add_column(column, justify="left" if column in ("run", "set") else "right")
    for row in report["runs"]:
        runs.add_row(
            Path(row["run"]).stem, row["set"], f"{row['measured_s']:.4f}",
            f"{row['predicted_before_s']:.4f}", f"{row['error_before']:+.1%}",
            f"{row['predicted_after_s']:.4f}", f"{row['error_after']:+.1%}",
        )  # fmt: skip
    lines = [
        f"{name} runs ({part['runs']}): mean absolute error {part['mape_before']:.1%} -> {part['mape_after']:.1%}"
        for name, part in (("fit", report["fit"]), ("held-out", report["held_out"]))
        if part is not None
    ]
    return Group(knobs, runs, *[Text(line) for line in lines], Text(f"wrote {report['output']}"))


def render_what_if(comparison: dict[str, Any]) -> Group:
    """``solve --what-if``: the plan on the changed profile, the fields that moved and the time change."""
    said = ", ".join(f"{field}={value}" for field, value in comparison["assignments"].items())
    title = Text(f"What if {said}:", style="bold")
    if comparison["plan"] is None:
        return Group(title, Text(f"  no layout fits: {comparison['infeasible']}"))
    plan = Plan.model_validate(comparison["plan"])
    assert plan.estimate is not None
    lines = [
        f"  layout {layout_label(plan.parallel)} | dispatcher {plan.parallel.dispatcher.kind}",
        f"  step time {plan.estimate.step_time_s:.4g} s ({comparison['relative_change']:+.1%}), "
        f"{plan.estimate.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, memory {human_bytes(plan.estimate.peak_memory_bytes)}",
    ]
    lines += [f"  {c['field']}: {c['before']} -> {c['after']}" for c in comparison["changes"]] or [
        "  the same layout"
    ]
    return Group(title, *[Text(line) for line in lines])
