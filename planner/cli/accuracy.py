"""``moeplan validate``, ``check`` and ``calibrate``: the cost model against measurements, plans under
version control, and a profile fitted to measured runs."""

from pathlib import Path
from typing import Annotated

import typer

from planner.cli.app import JsonFlag, app, out, print_json, user_errors
from planner.cli.options import Opt
from planner.cli.progress import progress_bar
from planner.present.report import render_calibration, render_check_outcome, render_validation

__all__: list[str] = []


@app.command("validate")
@user_errors
def validate_command(
    path: Annotated[Path, typer.Argument(help="A file in the moeplan-validation/1 format.")],
    with_solve: Annotated[
        bool, Opt("--solve", help="Also solve each group and compare with its best measured configuration.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Compare the cost model with published measurements: error per case, ranking per group."""
    from planner.workflows.validate import validate_file

    if with_solve:  # minutes for a file of many groups; scoring alone takes about a second
        with progress_bar("validate") as progress:
            found = validate_file(path, with_solve, progress)
    else:
        found = validate_file(path, with_solve)
    if as_json:
        print_json(found.to_json())
        return
    out.print(render_validation(found.report, found.fit, found.locked))
    for solution in found.solutions.values():
        p = solution.solver_plan
        out.print(
            f"{solution.group}: solver plan tp{p['tp']} pp{p['pp']} vpp{p['vpp']} ep{p['ep']} etp{p['etp']} "
            f"mbs{p['micro_batch']} {p['recompute']} -> {solution.solver_predicted:.3f} s predicted; best measured "
            f"configuration {solution.best_measured_predicted:.3f} s predicted"
            + ("" if solution.best_measured_fits else " (predicted not to fit)")
        )


@app.command("check")
@user_errors
def check_command(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(help="Case files (*.check.yaml) or folders holding them; default: examples/."),
    ] = None,
    update: Annotated[
        bool, Opt("--update", help="Rewrite the expected plans from today's solve (on purpose).")
    ] = False,
    junit_xml: Annotated[
        Path | None, Opt(help="Also write a JUnit XML report here (for CI systems).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Re-solve golden plan cases and fail (exit 1) with a readable diff when a plan or its time moved."""
    from planner.workflows.check import check_cases

    def show(outcome: object) -> None:
        out.print(render_check_outcome(outcome), highlight=False, soft_wrap=True)  # type: ignore[arg-type]

    found = check_cases(paths or [Path("examples")], update, junit_xml, None if as_json else show)
    counts = found.counts
    if as_json:
        print_json({"cases": [o.to_json() for o in found.outcomes], "counts": counts, "ok": found.ok})
    else:
        out.print(
            f"{len(found.outcomes)} cases: {counts['pass']} pass, {counts['regression']} regressed, "
            f"{counts['updated']} updated"
        )
    if not found.ok:
        raise typer.Exit(1)


@app.command("calibrate")
@user_errors
def calibrate_command(
    runs: Annotated[Path, Opt(help="Folder of `moeplan run -o` records to fit to.")],
    cluster: Annotated[str, Opt(help="The profile of the cluster the runs ran on (name or file).")],
    output: Annotated[Path, Opt("-o", "--output", help="Write the calibrated profile (YAML) here.")],
    held_out: Annotated[
        Path | None, Opt(help="Folder of further records left out of the fit, to measure generalization.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Fit a profile's efficiencies to measured runs; report the error before and after, fit and held out."""
    from planner.workflows.calibrate import calibrate_profile

    report = calibrate_profile(runs, cluster, output, held_out)
    if as_json:
        print_json(report)
    else:
        out.print(render_calibration(report))
