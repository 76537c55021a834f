"""Figures of the estimate: the timeline's invariants, and files that are valid, complete and reproducible."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from planner.catalog import load_cluster, load_model
from planner.costmodel import estimate
from planner.errors import SpecError
from planner.present.plot import (
    COMPUTE_LANE,
    IDLE_LANE,
    Segment,
    breakdown_figure,
    step_figure,
    timeline_figure,
    timeline_segments,
    write_figure,
)
from planner.schema import CostTerm, Estimate, ParallelConfig, TrainingSpec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@cache
def _estimates() -> tuple[tuple[str, Estimate], ...]:
    """Mixtral on 16 H100s: a pipelined plan (bubble, p2p), one with EP overlap and CP, one plain."""
    model = load_model("mixtral-8x7b")
    cluster = load_cluster("dgx-h100", num_nodes=2)
    training = TrainingSpec(global_batch=64)
    layouts = {
        "tp2 pp2 ep4": ParallelConfig.for_world(16, tp=2, pp=2, ep=4),
        "tp2 cp2 ep4 selective": ParallelConfig.for_world(16, tp=2, cp=2, ep=4, recompute="selective"),
        "tp1 ep8 a2a-overlap": ParallelConfig.for_world(16, ep=8, a2a_overlap=True),
    }
    return tuple((label, estimate(model, training, p, cluster)) for label, p in layouts.items())


def _critical(segments: list[Segment]) -> list[Segment]:
    return sorted((s for s in segments if not s.hidden), key=lambda s: s.start)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_timeline_critical_path_tiles_the_step(index: int) -> None:
    result = _estimates()[index][1]
    segments = timeline_segments(result)
    critical = _critical(segments)
    assert critical[0].start == 0.0
    for before, after in zip(critical, critical[1:], strict=False):
        assert after.start == pytest.approx(before.end, rel=1e-12, abs=1e-15)  # back to back, no overlap
    assert critical[-1].end == pytest.approx(result.step_time_s, rel=1e-9)
    exposed = {t.name: t.exposed_s for t in result.breakdown if t.exposed_s > 0}
    assert {s.name: s.duration for s in critical} == exposed


@pytest.mark.parametrize("index", [0, 1, 2])
def test_timeline_hidden_communication_overlaps_compute(index: int) -> None:
    result = _estimates()[index][1]
    segments = timeline_segments(result)
    compute = sorted((s for s in segments if s.lane == COMPUTE_LANE), key=lambda s: s.start)
    for before, after in zip(compute, compute[1:], strict=False):
        assert after.start >= before.end - 1e-12
    work_end = max(s.end for s in compute if s.name != "optimizer_step")
    hidden = [s for s in segments if s.hidden]
    for seg in hidden:
        assert seg.lane not in (COMPUTE_LANE, IDLE_LANE)
        assert 0.0 <= seg.start and seg.end <= work_end + 1e-9 <= result.step_time_s + 1e-9
    by_name = {s.name: s.duration for s in hidden}
    assert by_name == pytest.approx(
        {t.name: t.total_s - t.exposed_s for t in result.breakdown if t.total_s > t.exposed_s}
    )


def test_fixture_covers_hidden_communication_and_the_bubble() -> None:
    # Otherwise the invariants above would pass vacuously.
    segments = [s for _, result in _estimates() for s in timeline_segments(result)]
    assert any(s.hidden for s in segments)
    assert any(s.lane == IDLE_LANE for s in segments)
    assert {"intra_node", "inter_node"} <= {s.lane for s in segments}


def test_timeline_of_a_hand_made_estimate() -> None:
    terms = (
        CostTerm(name="gemm", total_s=3.0, exposed_s=3.0),
        CostTerm(name="ep", total_s=2.0, exposed_s=0.5, link_class="intra_node"),
        CostTerm(name="pipeline_bubble", total_s=1.0, exposed_s=1.0),
        CostTerm(name="optimizer_step", total_s=0.25, exposed_s=0.25),
    )
    rates = {"tokens_per_s_per_gpu": 1.0, "model_tflops_per_gpu": 1.0, "mfu": 0.1}
    result = Estimate(step_time_s=4.75, peak_memory_bytes=1.0, fits=True, breakdown=terms, **rates)
    assert timeline_segments(result) == [
        Segment(COMPUTE_LANE, "gemm", 0.0, 3.0),
        Segment("intra_node", "ep", 3.0, 0.5),
        Segment(IDLE_LANE, "pipeline_bubble", 3.5, 1.0),
        Segment(COMPUTE_LANE, "optimizer_step", 4.5, 0.25),
        Segment("intra_node", "ep", 1.5, 1.5, hidden=True),
    ]


def test_figures_have_the_expected_axes() -> None:
    entries = list(_estimates())
    assert len(breakdown_figure(entries, "b").axes) == 1
    assert len(timeline_figure(entries[0][1], "t").axes) == 1
    step = step_figure(entries, "s")
    assert len(step.axes) == 2
    assert [t.get_text() for t in step.axes[0].get_yticklabels()] == [label for label, _ in entries]


def test_png_is_a_readable_image(tmp_path: Path) -> None:
    from matplotlib.image import imread

    path = tmp_path / "plan.png"
    write_figure(path, list(_estimates()), "Mixtral on 16 H100")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    image = imread(path)
    height, width, channels = image.shape
    assert channels in (3, 4)
    assert 1000 <= width <= 3000 and 600 <= height <= 3000
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed away


def test_html_is_self_contained_and_complete(tmp_path: Path) -> None:
    entries = list(_estimates())
    path = tmp_path / "plan.html"
    write_figure(path, entries, "Mixtral <16 H100>")
    page = path.read_text(encoding="utf-8")
    assert page.count("<svg") == 2
    assert "<?xml" not in page and "<script" not in page
    # Addresses appear only as XML namespace names (never fetched); every reference is in-page.
    assert re.search(r'(?:href|src)="(?!#)|url\((?!#)|<link|@import', page) is None
    assert "Mixtral &lt;16 H100&gt;" in page
    for label, result in entries:
        assert label in page
        assert f"{result.step_time_s:.6g}" in page
        for term in result.breakdown:
            assert term.name in page


@pytest.mark.parametrize("suffix", [".png", ".svg", ".html"])
def test_writing_twice_gives_identical_bytes(tmp_path: Path, suffix: str) -> None:
    entries = list(_estimates())
    first, second = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
    write_figure(first, entries, "same")
    write_figure(second, entries, "same")
    assert first.read_bytes() == second.read_bytes()
    assert len(first.read_bytes()) > 10_000


def test_svg_carries_no_date_or_version(tmp_path: Path) -> None:
    import matplotlib

    path = tmp_path / "plan.svg"
    write_figure(path, list(_estimates())[:1], "t")
    text = path.read_text(encoding="utf-8")
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    assert "<dc:date>" not in text and matplotlib.__version__ not in text


def test_bad_suffix_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"--output .*plan\.pdf.*\.png, \.svg or \.html"):
        write_figure(tmp_path / "plan.pdf", list(_estimates()), "t")
    assert not list(tmp_path.iterdir())


def test_no_entries_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="at least one"):
        write_figure(tmp_path / "plan.png", [], "t")
    with pytest.raises(SpecError):
        step_figure([], "t")
