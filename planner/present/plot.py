"""Figures of the cost model's estimate, for reports and pull requests (PNG, SVG, or HTML with inline SVG).

Two views of ``Estimate.breakdown``:

- the *breakdown*: one horizontal bar per plan, stacked from each term's exposed seconds (what the
  term adds to the step), with a thin hatched bar below it for the part of communication hidden
  behind compute ("overlapped (hidden)");
- the *timeline*: a Gantt-style schematic of one step, with a lane for compute, one per link class
  and one for the pipeline bubble.

The timeline is a schematic ordering derived from each term's total and exposed seconds, not a
trace: the cost model says how long each term takes and how much of it is hidden, not when it runs.
The schematic puts compute first, communication's exposed parts after it (compute waits), then
the bubble and the optimizer step, so its critical path is the sum of exposed seconds, which is how
the cost model defines ``step_time_s``. A term with a link class is communication; one without is
compute, unless part of it is hidden (only communication hides behind compute): that term goes on
a lane of its own, "communication (no link class)" (the cost model's ``cp_kv_exchange`` carries no
link class today, so it lands there when hidden, and on the compute lane when fully exposed).

matplotlib is imported inside the functions (``import planner`` stays fast and matplotlib stays an
optional extra), and figures are ``matplotlib.figure.Figure`` objects on an Agg canvas: no pyplot,
no GUI backend, no global figure registry. Same inputs give byte-identical files.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from planner.errors import SpecError
from planner.present.labels import memory_held_by
from planner.schema import CostTerm, Estimate
from planner.specfiles import atomic_write_bytes, atomic_write_text
from planner.units import GIB

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

__all__ = [
    "COMPUTE_LANE",
    "IDLE_LANE",
    "UNCLASSIFIED_LANE",
    "Segment",
    "breakdown_figure",
    "step_figure",
    "timeline_figure",
    "timeline_segments",
    "write_figure",
]

COMPUTE_LANE = "compute"
IDLE_LANE = "idle (pipeline bubble)"
UNCLASSIFIED_LANE = "communication (no link class)"
"""Lane of a term with no link class but a hidden part: only communication hides behind compute."""

HIDDEN_LABEL = "overlapped (hidden)"
_BUBBLE = "pipeline_bubble"
_AFTER_STEP = ("optimizer_step",)
"""Compute terms that run once after every micro-batch's work (and after the gradient reduction)."""

_HATCH = "////"
_PNG_DPI = 150
_CHAR_WIDTH = 0.0085
"""Width of one 7-point character as a fraction of a timeline axis about 7.5 inches wide."""
# No dates or versions in the files (and a fixed SVG id salt, in _svg_text): an unchanged plan
# gives an unchanged figure.
_SVG_METADATA = {"Date": None, "Creator": None}
_PNG_METADATA = {"Software": None}

Colour = tuple[float, float, float, float]


@dataclass(frozen=True, slots=True)
class Segment:
    """One bar of the timeline: a term's seconds on a lane, from ``start`` for ``duration``.

    ``hidden`` segments are the overlapped part of a communication term (off the critical path);
    every other segment is on the critical path, and those tile ``[0, step]`` without overlap.
    """

    lane: str
    name: str
    start: float
    duration: float
    hidden: bool = False

    @property
    def end(self) -> float:
        """Where the segment ends, seconds from the start of the step."""
        return self.start + self.duration


def _lane(term: CostTerm) -> str:
    if term.name == _BUBBLE:
        return IDLE_LANE
    if term.link_class is not None:
        return term.link_class
    if term.exposed_s < term.total_s:
        return UNCLASSIFIED_LANE
    return COMPUTE_LANE


def _critical_order(estimate: Estimate) -> list[CostTerm]:
    """Terms in the order the timeline puts them on the critical path (breakdown order within a group)."""
    terms = estimate.breakdown
    work = [t for t in terms if _lane(t) == COMPUTE_LANE and t.name not in _AFTER_STEP]
    comm = [t for t in terms if _lane(t) not in (COMPUTE_LANE, IDLE_LANE)]
    idle = [t for t in terms if _lane(t) == IDLE_LANE]
    after = [t for t in terms if _lane(t) == COMPUTE_LANE and t.name in _AFTER_STEP]
    return work + comm + idle + after


def timeline_segments(estimate: Estimate) -> list[Segment]:
    """The schematic timeline of one step: critical-path segments in order, then hidden parts.

    Compute terms run back to back from 0; each communication term's exposed seconds follow on its
    link class's lane while compute waits; then the pipeline bubble, then the optimizer step. The
    critical path therefore ends at the sum of exposed seconds, which the cost model defines as
    ``step_time_s`` (equal up to floating-point summation order). For an estimate edited by hand so
    that the two differ, the critical path still ends at the sum and the figure's step-time line
    shows the gap. Each communication term's hidden seconds (total minus exposed) are packed, per
    lane, back to back so that they end where the compute block ends: drawn overlapping compute,
    as the cost model assumes. Only when a lane's hidden seconds exceed the compute seconds do they
    start at 0 and run past the compute block. Zero-length segments are left out.
    """
    segments: list[Segment] = []
    clock = 0.0
    ordered = _critical_order(estimate)
    work = [t for t in ordered if _lane(t) == COMPUTE_LANE and t.name not in _AFTER_STEP]
    for term in work:
        if term.exposed_s > 0:
            segments.append(Segment(COMPUTE_LANE, term.name, clock, term.exposed_s))
            clock += term.exposed_s
    compute_end = clock
    hidden_by_lane: dict[str, list[CostTerm]] = {}
    for term in ordered[len(work) :]:  # _critical_order puts the compute work first
        if term.exposed_s > 0:
            segments.append(Segment(_lane(term), term.name, clock, term.exposed_s))
            clock += term.exposed_s
        if term.total_s > term.exposed_s:
            hidden_by_lane.setdefault(_lane(term), []).append(term)
    for lane, terms in hidden_by_lane.items():
        start = max(0.0, compute_end - sum(t.total_s - t.exposed_s for t in terms))
        for term in terms:
            hidden = term.total_s - term.exposed_s
            segments.append(Segment(lane, term.name, start, hidden, hidden=True))
            start += hidden
    return segments


def _lanes(segments: Sequence[Segment]) -> list[str]:
    """Lanes top to bottom: compute, link classes (sorted), unclassified communication, idle."""
    present = {s.lane for s in segments}
    links = sorted(present - {COMPUTE_LANE, IDLE_LANE, UNCLASSIFIED_LANE})
    tail = [lane for lane in (UNCLASSIFIED_LANE, IDLE_LANE) if lane in present]
    return [COMPUTE_LANE, *links, *tail]


def _colours(entries: Sequence[tuple[str, Estimate]]) -> dict[str, Colour]:
    """One colour per term name: sorted names over a qualitative colormap, so bars and lanes agree."""
    from matplotlib import colormaps

    names = sorted({term.name for _, estimate in entries for term in estimate.breakdown})
    cmap = colormaps["tab20"]
    # tab20's ten strong colours first, then their light twins: neighbours in the legend never look alike.
    return {name: cmap((2 * i + (i // 10) % 2) % 20) for i, name in enumerate(names)}


def _text_colour(colour: Colour) -> str:
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    return "black" if luminance > 0.5 else "white"


def _hidden_patch() -> Patch:
    from matplotlib.patches import Patch

    return Patch(facecolor="white", edgecolor="0.3", hatch=_HATCH, label=HIDDEN_LABEL)


def _hidden_bar(ax: Axes, row: float, start: float, width: float, height: float, colour: Colour) -> None:
    """A hatched, light bar: communication that runs while compute runs, so it adds nothing to the step."""
    light = (colour[0], colour[1], colour[2], 0.35)
    ax.barh(row, width, left=start, height=height, color=light, edgecolor=colour, hatch=_HATCH, linewidth=0.5)


def _draw_breakdown(ax: Axes, entries: Sequence[tuple[str, Estimate]], colours: dict[str, Colour]) -> None:
    from matplotlib.patches import Patch

    longest = max((max(e.step_time_s, _hidden_total(e)) for _, e in entries), default=0.0)
    used: set[str] = set()
    for row, (_, estimate) in enumerate(entries):
        left = 0.0
        for term in _critical_order(estimate):
            if term.exposed_s > 0:
                ax.barh(
                    row, term.exposed_s, left=left, height=0.5, color=colours[term.name], edgecolor="white"
                )
                left += term.exposed_s
                used.add(term.name)
        ax.text(left + longest * 0.01, row, f"{estimate.step_time_s:.4g} s", va="center", fontsize=8)
        hidden_left = 0.0
        for term in _critical_order(estimate):
            hidden = term.total_s - term.exposed_s
            if hidden > 0:
                _hidden_bar(ax, row + 0.4, hidden_left, hidden, 0.16, colours[term.name])
                hidden_left += hidden
                used.add(term.name)
    ax.set_yticks(range(len(entries)), [label for label, _ in entries])
    ax.set_ylim(len(entries) - 0.4, -0.5)  # first (best) plan at the top
    ax.set_xlim(0, longest * 1.12 or 1.0)
    ax.set_xlabel("seconds per step")
    ax.grid(axis="x", linewidth=0.3)
    ax.set_axisbelow(True)
    handles = [Patch(color=colours[name], label=name) for name in sorted(used)]
    handles.append(_hidden_patch())
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _hidden_total(estimate: Estimate) -> float:
    return sum(max(0.0, t.total_s - t.exposed_s) for t in estimate.breakdown)


def _draw_timeline(ax: Axes, estimate: Estimate, colours: dict[str, Colour], full_legend: bool) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    segments = timeline_segments(estimate)
    lanes = _lanes(segments)
    span = max([estimate.step_time_s, *(s.end for s in segments)]) or 1.0
    for seg in segments:
        row = lanes.index(seg.lane)
        colour = colours[seg.name]
        if seg.hidden:
            _hidden_bar(ax, row, seg.start, seg.duration, 0.6, colour)
        else:
            ax.barh(row, seg.duration, left=seg.start, height=0.6, color=colour, edgecolor="white")
        if seg.duration >= (len(seg.name) + 2) * _CHAR_WIDTH * span:  # label only where it fits
            text = "black" if seg.hidden else _text_colour(colour)
            ax.text(
                seg.start + seg.duration / 2, row, seg.name, ha="center", va="center", fontsize=7, color=text
            )
    ax.axvline(estimate.step_time_s, color="black", linestyle="--", linewidth=1.0)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_ylim(len(lanes) - 0.5, -0.5)
    ax.set_xlim(0, span * 1.02)
    ax.set_xlabel("seconds into the step (schematic order derived from the breakdown, not a trace)")
    ax.grid(axis="x", linewidth=0.3)
    ax.set_axisbelow(True)
    handles: list[Patch | Line2D] = []
    if full_legend:
        names = sorted({s.name for s in segments})
        handles = [Patch(color=colours[name], label=name) for name in names]
    handles.append(_hidden_patch())
    step_label = f"step time {estimate.step_time_s:.4g} s"
    handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1.0, label=step_label))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # Agg, chosen per figure: no pyplot, no GUI backend
    return figure


def _breakdown_height(count: int) -> float:
    return 1.4 + 0.75 * count


def _timeline_height(estimate: Estimate) -> float:
    return 1.5 + 0.45 * len(_lanes(timeline_segments(estimate)))


def _require_entries(entries: Sequence[tuple[str, Estimate]]) -> None:
    if not entries:
        raise SpecError("Nothing to plot: at least one (label, estimate) entry is required.")


def breakdown_figure(entries: Sequence[tuple[str, Estimate]], title: str) -> Figure:
    """One stacked bar of exposed seconds per (label, estimate), the first at the top.

    Each term keeps one colour across bars. The hatched bar below each bar is the communication
    hidden behind compute (total minus exposed seconds), which does not lengthen the step.
    """
    _require_entries(entries)
    figure = _new_figure(10.0, _breakdown_height(len(entries)))
    ax = figure.add_subplot()
    _draw_breakdown(ax, entries, _colours(entries))
    ax.set_title(title)
    return figure


def timeline_figure(estimate: Estimate, title: str) -> Figure:
    """Gantt-style schematic of one step: compute, one lane per link class, and the pipeline bubble.

    This is a schematic ordering derived from the breakdown's totals and exposures, not a trace
    (see ``timeline_segments``): hatched bars are communication hidden behind compute, solid
    communication bars are exposed time that compute waits for, and the dashed line is
    ``step_time_s``, where the critical path ends.
    """
    return _timeline_figure(estimate, title, _colours([("", estimate)]))


def _timeline_figure(estimate: Estimate, title: str, colours: dict[str, Colour]) -> Figure:
    figure = _new_figure(10.0, _timeline_height(estimate))
    ax = figure.add_subplot()
    _draw_timeline(ax, estimate, colours, full_legend=True)
    ax.set_title(title)
    return figure


def step_figure(entries: Sequence[tuple[str, Estimate]], title: str) -> Figure:
    """The breakdown of every entry above the schematic timeline of the first: one image for a report."""
    _require_entries(entries)
    top, bottom = _breakdown_height(len(entries)), _timeline_height(entries[0][1])
    figure = _new_figure(11.0, top + bottom)
    breakdown_ax, timeline_ax = figure.subplots(2, 1, height_ratios=[top, bottom])
    colours = _colours(entries)
    _draw_breakdown(breakdown_ax, entries, colours)
    breakdown_ax.set_title("Exposed seconds per step by term (hatched: communication hidden behind compute)")
    _draw_timeline(timeline_ax, entries[0][1], colours, full_legend=False)
    timeline_ax.set_title(f"Schematic timeline of one step: {entries[0][0]}")
    figure.suptitle(title)
    return figure


def _png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_PNG_DPI, metadata=_PNG_METADATA)
    figure.clear()
    return buffer.getvalue()


def _svg_text(figure: Figure) -> str:
    from matplotlib import rc_context

    buffer = io.StringIO()
    # Scoped: the process's rcParams are left as they were. Fonts stay text (small files).
    with rc_context({"svg.hashsalt": "moeplan", "svg.fonttype": "none"}):
        figure.savefig(buffer, format="svg", metadata=_SVG_METADATA)
    figure.clear()
    return buffer.getvalue()


def _inline_svg(figure: Figure) -> str:
    """The figure's ``<svg>`` element alone: an HTML page takes no XML prolog or DOCTYPE."""
    text = _svg_text(figure)
    return text[text.index("<svg") :]


def _seconds(value: float) -> str:
    return f"{value:.6g}"


def _table(label: str, estimate: Estimate) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(t.name)}</td><td>{html.escape(t.link_class or '')}</td>"
        f"<td>{_seconds(t.total_s)}</td><td>{_seconds(t.exposed_s)}</td></tr>"
        for t in estimate.breakdown
    )
    return (
        f"<h2>{html.escape(label)}</h2>\n<table>\n"
        "<thead><tr><th>term</th><th>link class</th><th>total s</th><th>exposed s</th></tr></thead>\n"
        f"<tbody>{rows}</tbody>\n"
        f'<tfoot><tr><th colspan="3">step time s</th><th>{_seconds(estimate.step_time_s)}</th></tr></tfoot>\n'
        "</table>\n" + _memory_table(estimate)
    )


def _memory_table(estimate: Estimate) -> str:
    """Where the peak memory goes (``Estimate.memory``), or nothing for an estimate without it."""
    use = estimate.memory
    if use is None:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{b / GIB:.2f}</td></tr>" for name, b in memory_held_by(use)
    )
    return (
        f"<table>\n<thead><tr><th>memory on pipeline rank {use.pipeline_rank}</th><th>GiB</th></tr></thead>\n"
        f"<tbody>{rows}</tbody>\n"
        f"<tfoot><tr><th>peak</th><th>{estimate.peak_memory_bytes / GIB:.2f}</th></tr>"
        + (
            f"<tr><th>optimizer state on the host (CPU memory)</th><th>{use.host_optimizer / GIB:.2f}</th></tr>"
            if use.host_optimizer
            else ""
        )
        + "</tfoot>\n</table>\n"
    )


_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:75em}"
    "svg{max-width:100%;height:auto}"
    "table{border-collapse:collapse;margin-bottom:1.5em}"
    "th,td{border:1px solid #bbb;padding:0.2em 0.6em;text-align:right}"
    "td:first-child,td:nth-child(2){text-align:left}"
)


def _html_page(entries: Sequence[tuple[str, Estimate]], title: str) -> str:
    first_label, first = entries[0]
    timeline_title = f"Schematic timeline of one step: {first_label}"
    # Both figures colour each term from every entry's names, so a term looks the same in both.
    parts = [
        "<!DOCTYPE html>\n",
        f'<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n',
        f"<style>{_CSS}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n",
        f"<figure>\n{_inline_svg(breakdown_figure(entries, 'Exposed seconds per step by term'))}</figure>\n",
        f"<figure>\n{_inline_svg(_timeline_figure(first, timeline_title, _colours(entries)))}",
        "<figcaption>A schematic ordering derived from the breakdown's totals and exposures, not a trace."
        "</figcaption>\n</figure>\n",
        *(_table(label, estimate) for label, estimate in entries),
        "</body>\n</html>\n",
    ]
    return "".join(parts)


def write_figure(path: Path, entries: Sequence[tuple[str, Estimate]], title: str) -> None:
    """Write the step figure as ``.png`` or ``.svg``, or an ``.html`` page with both figures and tables.

    The page is self-contained (inline SVG and CSS, no scripts, nothing fetched). Files are written
    atomically and carry no date or version, so the same entries give byte-identical files.
    """
    suffix = path.suffix.lower()
    if suffix not in (".png", ".svg", ".html"):
        raise SpecError(
            f"Option --output ('{path}') must end in .png, .svg or .html: the suffix picks the figure's "
            "format (a PNG or SVG image, or an HTML page with the figures and the term tables)."
        )
    _require_entries(entries)
    if suffix == ".png":
        atomic_write_bytes(path, _png_bytes(step_figure(entries, title)))
    elif suffix == ".svg":
        atomic_write_text(path, _svg_text(step_figure(entries, title)))
    else:
        atomic_write_text(path, _html_page(entries, title))
