"""``nvidia-smi topo -m`` parsing, checked against real recorded outputs (tests/data/nvtopo/SOURCES.md)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import networkx as nx
import pytest

from planner.probe.nvtopo import (
    TopoMatrix,
    add_node_to_graph,
    nic_affinity,
    nvlink_count,
    parse_topo_matrix,
    read_nvidia_smi_topo,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "nvtopo"
RECORDED = sorted(p.name for p in DATA.glob("*.txt"))
TABBED = [name for name in RECORDED if "\t" in (DATA / name).read_text()]


def load(name: str) -> TopoMatrix:
    return parse_topo_matrix((DATA / name).read_text())


def graph_of(matrix: TopoMatrix, node: int = 0) -> nx.Graph:
    graph = nx.Graph()
    add_node_to_graph(graph, matrix, node)
    return graph


def vertices(graph: nx.Graph, kind: str) -> list[str]:
    return [v for v, data in graph.nodes(data=True) if data["kind"] == kind]


def edges(graph: nx.Graph, **attrs: Any) -> list[tuple[str, str]]:
    return [(a, b) for a, b, d in graph.edges(data=True) if all(d.get(k) == v for k, v in attrs.items())]


def affinity_of(matrix: TopoMatrix) -> dict[int, tuple[str, str]]:
    return {a.gpu: (a.nic, a.path) for a in nic_affinity(matrix)}


def test_every_recorded_output_has_a_source() -> None:
    sources = (DATA / "SOURCES.md").read_text()
    assert len(RECORDED) >= 6
    for name in RECORDED:
        assert f"`{name}`" in sources, name


@pytest.mark.parametrize("name", RECORDED)
def test_matrix_is_symmetric_with_self_on_the_diagonal(name: str) -> None:
    matrix = load(name)
    devices = matrix.gpus + matrix.nics
    assert len(matrix.cells) == len(devices) ** 2
    for a in devices:
        assert matrix.connection(a, a) == "X"
        for b in devices:
            assert matrix.connection(a, b) == matrix.connection(b, a)


@pytest.mark.parametrize("name", TABBED)
@pytest.mark.parametrize("spaces", ["expandtabs", "two spaces"])
def test_spaces_instead_of_tabs_parse_the_same(name: str, spaces: str) -> None:
    text = (DATA / name).read_text()
    pasted = text.expandtabs(8) if spaces == "expandtabs" else text.replace("\t", "  ")
    assert "\t" not in pasted
    assert parse_topo_matrix(pasted) == parse_topo_matrix(text)


def test_a100_nv12_with_nic_legend() -> None:
    matrix = load("a100_8gpu_nv12_nic_legend.txt")
    assert matrix.gpus == tuple(f"GPU{i}" for i in range(8))
    assert len(matrix.nics) == 17
    assert matrix.nics[:2] == ("mlx5_2", "mlx5_3") and matrix.nics[-1] == "mlx5_bond_0"
    assert matrix.nic_legend["NIC16"] == "mlx5_bond_0"
    assert matrix.connection("GPU0", "GPU1") == "NV12"
    assert matrix.connection("GPU0", "mlx5_2") == "PXB"
    assert matrix.connection("GPU0", "NIC0") == "PXB"  # the legend name works too
    assert matrix.connection("GPU2", "mlx5_2") == "SYS"
    assert matrix.connection("mlx5_2", "mlx5_3") == "PIX"
    assert matrix.cpu_affinity["GPU7"] == "0-103"
    assert set(matrix.numa_affinity.values()) == {0}
    affinity = affinity_of(matrix)
    assert affinity[0] == ("mlx5_2", "PXB")
    assert affinity[1] == ("mlx5_2", "PXB")  # four NICs tie at PXB: the first listed wins
    assert affinity[2] == ("mlx5_6", "PXB")
    assert affinity[6] == ("mlx5_14", "PXB")

    graph = graph_of(matrix)
    assert len(vertices(graph, "gpu")) == 8 and len(vertices(graph, "nic")) == 17
    nvlink = edges(graph, link_class="intra_node", nvlinks=12)
    assert len(nvlink) == 28
    assert graph.degree("n0") == 8
    assert graph.edges["n0/gpu2", "n0/mlx5_6"] == {"link_class": "pcie", "path": "PXB"}


def test_h100_nv18_with_nic_legend() -> None:
    matrix = load("h100_8gpu_nv18_nic_legend.txt")
    assert len(matrix.gpus) == 8
    assert matrix.nics == tuple(f"mlx5_{i}" for i in range(8))
    assert matrix.connection("GPU0", "GPU7") == "NV18"
    assert matrix.connection("GPU4", "mlx5_4") == "PIX"
    assert matrix.connection("GPU0", "mlx5_4") == "SYS"
    assert matrix.connection("GPU0", "mlx5_1") == "NODE"
    assert matrix.cpu_affinity["GPU4"] == "48-95,144-191"
    assert matrix.numa_affinity == {f"GPU{i}": i // 4 for i in range(8)}
    assert affinity_of(matrix) == {i: (f"mlx5_{i}", "PIX") for i in range(8)}

    graph = graph_of(matrix)
    assert len(vertices(graph, "gpu")) == 8 and len(vertices(graph, "nic")) == 8
    assert len(edges(graph, link_class="intra_node", nvlinks=18)) == 28
    assert len(edges(graph, link_class="pcie", path="PIX")) == 8


def test_h800_nv8_legend_with_gaps_and_a_bond() -> None:
    matrix = load("h800_8gpu_nv8_nic_legend.txt")
    assert len(matrix.gpus) == 8 and len(matrix.nics) == 9
    assert matrix.nics[1] == "mlx5_3" and matrix.nics[8] == "mlx5_bond_0"
    assert matrix.connection("GPU3", "GPU4") == "NV8"
    assert nvlink_count(matrix.connection("GPU3", "GPU4")) == 8
    assert matrix.connection("GPU1", "mlx5_3") == "PIX"
    assert matrix.connection("GPU0", "mlx5_bond_0") == matrix.connection("GPU0", "NIC8") == "NODE"
    assert matrix.connection("GPU4", "mlx5_bond_0") == "SYS"
    assert matrix.cpu_affinity["GPU7"] == "56-111,168-223"
    assert matrix.numa_affinity["GPU3"] == 0 and matrix.numa_affinity["GPU7"] == 1
    affinity = affinity_of(matrix)
    assert affinity[0] == ("mlx5_0", "PIX")
    assert affinity[1] == ("mlx5_3", "PIX")
    assert affinity[7] == ("mlx5_9", "PIX")
    assert "mlx5_bond_0" not in {nic for nic, _ in affinity.values()}

    graph = graph_of(matrix)
    assert len(vertices(graph, "nic")) == 9
    assert len(edges(graph, link_class="intra_node", nvlinks=8)) == 28
    assert graph.degree("n0/mlx5_bond_0") == 0


def test_b300_tabs_with_a_stripped_underline_escape() -> None:
    text = (DATA / "b300_8gpu_nv18_tabs_underline.txt").read_text()
    assert "[4m" in text and "\x1b" not in text  # as recorded: the escape byte is lost, "[4m" is left
    matrix = parse_topo_matrix(text)
    assert matrix.gpus == tuple(f"GPU{i}" for i in range(8))
    assert matrix.nics == (*(f"mlx5_{i}" for i in range(10, 18)), "mlx5_bond_0")
    assert matrix.connection("GPU0", "GPU1") == "NV18"
    assert matrix.connection("GPU0", "mlx5_10") == "PXB"
    assert matrix.connection("GPU4", "mlx5_bond_0") == "NODE"
    assert matrix.cpu_affinity["GPU4"] == "64-127,192-255"
    assert matrix.numa_affinity["GPU0"] == 0 and matrix.numa_affinity["GPU4"] == 1
    assert affinity_of(matrix) == {i: (f"mlx5_{10 + i}", "PXB") for i in range(8)}


def test_v100_older_format_names_nics_by_rdma_device() -> None:
    matrix = load("v100_sxm2_4gpu_nv3_mlx5_columns.txt")
    assert matrix.gpus == ("GPU0", "GPU1", "GPU2", "GPU3")
    assert matrix.nics == ("mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3")
    assert matrix.nic_legend == {}
    assert matrix.connection("GPU0", "GPU1") == "NV3"
    assert matrix.connection("GPU0", "GPU2") == "SYS"
    assert matrix.connection("GPU2", "mlx5_2") == "NODE"
    assert matrix.connection("mlx5_0", "mlx5_1") == "PIX"
    assert matrix.cpu_affinity == {"GPU0": "0-63", "GPU1": "0-63", "GPU2": "64-127", "GPU3": "64-127"}
    assert matrix.numa_affinity == {"GPU0": 0, "GPU1": 0, "GPU2": 8, "GPU3": 8}
    affinity = affinity_of(matrix)
    assert affinity[0] == ("mlx5_0", "NODE") and affinity[3] == ("mlx5_2", "NODE")

    graph = graph_of(matrix)
    assert len(vertices(graph, "gpu")) == 4 and len(vertices(graph, "nic")) == 4
    assert sorted(edges(graph, link_class="intra_node", nvlinks=3)) == [
        ("n0/gpu0", "n0/gpu1"),
        ("n0/gpu2", "n0/gpu3"),
    ]
    assert len(edges(graph, link_class="pcie", path="SYS")) == 4
    assert graph.degree("n0") == 0  # not every pair has NVLink: no NVSwitch


def test_pcie_only_a100_pair() -> None:
    matrix = load("a100_2gpu_pcie_mlx5_columns.txt")
    assert matrix.gpus == ("GPU0", "GPU1") and matrix.nics == ("mlx5_0", "mlx5_1")
    assert matrix.connection("GPU0", "GPU1") == "SYS"
    assert matrix.numa_affinity == {"GPU0": 0, "GPU1": 1}
    assert affinity_of(matrix) == {0: ("mlx5_0", "NODE"), 1: ("mlx5_1", "NODE")}

    graph = graph_of(matrix)
    assert edges(graph, link_class="intra_node") == []
    assert graph.edges["n0/gpu0", "n0/gpu1"] == {"link_class": "pcie", "path": "SYS"}


def test_pcie_only_a10_with_nic_legend() -> None:
    matrix = load("a10_4gpu_pcie_nic_legend.txt")
    assert len(matrix.gpus) == 4 and matrix.nics == ("mlx5_0", "mlx5_1")
    assert matrix.connection("mlx5_0", "mlx5_1") == "PIX"
    assert matrix.cpu_affinity["GPU3"] == "0-127"
    assert affinity_of(matrix) == dict.fromkeys(range(4), ("mlx5_0", "SYS"))

    graph = graph_of(matrix)
    assert len(edges(graph, link_class="pcie", path="SYS")) == 6 + 4
    assert graph.degree("n0/mlx5_1") == 0


def test_ranks_and_node_naming_follow_planner_topology() -> None:
    matrix = load("h100_8gpu_nv18_nic_legend.txt")
    graph = nx.Graph()
    add_node_to_graph(graph, matrix, 0, ranks=range(8))
    add_node_to_graph(graph, matrix, 1, ranks=range(8, 16))
    assert graph.nodes["n1"] == {"kind": "scale_up_switch", "node": 1}
    assert graph.nodes["n1/gpu3"] == {"kind": "gpu", "node": 1, "local_rank": 3, "rank": 11}
    assert graph.nodes["n1/mlx5_3"] == {"kind": "nic", "node": 1}
    assert graph.edges["n1/gpu3", "n1"] == {"link_class": "intra_node"}
    assert not nx.has_path(graph, "n0/gpu0", "n1/gpu0")  # nodes join only through the fabric
    assert "rank" not in graph_of(matrix).nodes["n0/gpu0"]
    with pytest.raises(ValueError, match="8 GPUs but 4 ranks"):
        add_node_to_graph(nx.Graph(), matrix, 0, ranks=range(4))


def test_ansi_underlined_header() -> None:
    text = (
        "\t\x1b[4mGPU0\tGPU1\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
        "GPU0\t X \tNV4\tPXB\t0-15\t0\t\tN/A\n"
        "GPU1\tNV4\t X \tSYS\t16-31\t1\t\tN/A\n"
        "NIC0\tPXB\tSYS\t X \n"
        "\nNIC Legend:\n\n  NIC0: mlx5_0\n"
    )
    matrix = parse_topo_matrix(text)
    assert matrix.gpus == ("GPU0", "GPU1") and matrix.nics == ("mlx5_0",)
    assert matrix.connection("GPU0", "GPU1") == "NV4"
    assert matrix.numa_affinity == {"GPU0": 0, "GPU1": 1}
    assert matrix.cpu_affinity["GPU1"] == "16-31"


def test_not_a_matrix_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match="no header row starting with GPU0") as raised:
        parse_topo_matrix("No devices were found\n")
    assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match="no header row"):
        parse_topo_matrix("")


def test_a_short_row_is_an_error() -> None:
    text = (DATA / "v100_sxm2_4gpu_nv3_mlx5_columns.txt").read_text()
    broken = text.replace("GPU1\tNV3\t X \tSYS\tSYS\tNODE\tNODE\tSYS\tSYS\t0-63\t0", "GPU1\tNV3\t X \tSYS")
    with pytest.raises(ValueError, match="row GPU1"):
        parse_topo_matrix(broken)


def test_unknown_device() -> None:
    with pytest.raises(KeyError, match="GPU9"):
        load("a100_2gpu_pcie_mlx5_columns.txt").connection("GPU0", "GPU9")


@pytest.mark.parametrize(
    ("code", "links"), [("NV18", 18), ("NV12", 12), ("NV8", 8), ("NV1", 1), ("PIX", 0), ("SYS", 0), ("X", 0)]
)
def test_nvlink_count(code: str, links: int) -> None:
    assert nvlink_count(code) == links


def test_read_nvidia_smi_topo_runs_and_parses() -> None:
    text = (DATA / "h100_8gpu_nv18_nic_legend.txt").read_text()
    calls: list[tuple[list[str], dict[str, Any]]] = []

    def fake_run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append((args, kwargs))
        return subprocess.CompletedProcess(args, 0, stdout=text, stderr="")

    matrix = read_nvidia_smi_topo(runner=fake_run)
    assert matrix == parse_topo_matrix(text)
    assert calls[0][0] == ["nvidia-smi", "topo", "-m"]
    assert calls[0][1]["timeout"] == 20


def test_read_nvidia_smi_topo_without_nvidia_smi() -> None:
    def missing(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError(2, "No such file or directory", args[0])

    def failing(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(args, 9, stdout="", stderr="NVIDIA-SMI has failed")

    def hanging(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(args, kwargs["timeout"])

    assert read_nvidia_smi_topo(runner=missing) is None
    assert read_nvidia_smi_topo(runner=failing) is None
    assert read_nvidia_smi_topo(runner=hanging) is None
