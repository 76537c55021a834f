"""Parse ``nvidia-smi topo -m``: which GPUs share NVLink, how far each NIC is, and each GPU's CPU/NUMA affinity.

The format (``../shared/reference/ecosystem.md`` §5.1; real outputs, with their sources, are recorded in
``tests/data/nvtopo/``)::

            GPU0    GPU1    NIC0    NIC1    CPU Affinity    NUMA Affinity   GPU NUMA ID
    GPU0     X      NV18    PIX     SYS     0-47,96-143     0               N/A
    GPU1    NV18     X      SYS     PIX     48-95,144-191   1               N/A
    NIC0    PIX     SYS      X      SYS
    NIC1    SYS     PIX     SYS      X

    Legend:
      X    = Self
      ...
    NIC Legend:

      NIC0: mlx5_0
      NIC1: mlx5_1

- The header names the device columns (``GPUk``, then ``NICk``; drivers before the NIC Legend named
  NICs by their RDMA device, ``mlx5_0``), then affinity columns: ``CPU Affinity``, ``NUMA Affinity`` and,
  on newer drivers, ``GPU NUMA ID``. NIC rows have no affinity cells. Rows come in column order.
- A cell is ``X`` (self), ``NV#`` (a bonded set of # NVLinks) or a PCIe path, nearest first:
  ``PIX`` (one PCIe bridge) < ``PXB`` (several bridges) < ``PHB`` (a host bridge) < ``NODE`` (between host
  bridges of one NUMA node) < ``SYS`` (across NUMA nodes). Drivers before 2018 printed ``SOC`` for ``SYS``.
- nvidia-smi separates cells with tabs and underlines the header with ANSI escapes (``\\x1b[4m`` ...
  ``\\x1b[0m``). Pasted copies lose both: tabs become spaces (a single one after a 7-character cell such
  as ``mlx5_10``), and the escape byte may vanish, leaving ``[4m``. Cells and affinity values never
  contain spaces, so rows are split on any whitespace and the header's device columns are the row labels.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import networkx as nx

from planner.schema import NicAffinity

__all__ = [
    "NVIDIA_SMI_TOPO",
    "PCIE_PATHS",
    "TopoMatrix",
    "add_node_to_graph",
    "nic_affinity",
    "nvlink_count",
    "parse_topo_matrix",
    "read_nvidia_smi_topo",
]

NVIDIA_SMI_TOPO = ("nvidia-smi", "topo", "-m")
NVIDIA_SMI_TIMEOUT_S = 20

PciePath = Literal["PIX", "PXB", "PHB", "NODE", "SYS"]
PCIE_PATHS: tuple[PciePath, ...] = ("PIX", "PXB", "PHB", "NODE", "SYS")
"""PCIe path codes, nearest first."""
_PATH_RANK: dict[str, int] = {path: rank for rank, path in enumerate(PCIE_PATHS)}

_ANSI = re.compile(r"\x1b?\[[0-9;]*m")
_NVLINK = re.compile(r"NV(\d+)")
_GPU = re.compile(r"GPU(\d+)")
_LEGEND_ENTRY = re.compile(r"\s*(NIC\d+):\s*(\S+)\s*$")
_AFFINITY_SPLIT = re.compile(r"\t|\s{2,}")
_LEGACY_CODES = {"SOC": "SYS"}


@dataclass(frozen=True)
class TopoMatrix:
    """One node's ``nvidia-smi topo -m`` matrix, NICs under their real names where the NIC Legend gives them."""

    gpus: tuple[str, ...]
    """GPU names in column order: ``GPU0``, ``GPU1``, ..."""
    nics: tuple[str, ...]
    """NIC names in column order: the RDMA device (``mlx5_0``) when known, else ``NICk``."""
    cells: dict[tuple[str, str], str] = field(repr=False)
    """Connection code for every ordered pair of devices (``X`` on the diagonal)."""
    cpu_affinity: dict[str, str]
    """GPU name to its CPU Affinity cell (e.g. ``0-47,96-143``); empty when the column is absent."""
    numa_affinity: dict[str, int | None]
    """GPU name to its NUMA node; None for ``N/A`` or a list of nodes; empty when the column is absent."""
    nic_legend: dict[str, str] = field(default_factory=dict)
    """``NICk`` to the RDMA device, from the NIC Legend; empty for outputs without one."""

    def connection(self, a: str, b: str) -> str:
        """The code between two devices (``X``, ``NV#``, ``PIX`` ... ``SYS``); NICs by real or ``NICk`` name."""
        pair = (self.nic_legend.get(a, a), self.nic_legend.get(b, b))
        try:
            return self.cells[pair]
        except KeyError:
            devices = ", ".join(self.gpus + self.nics)
            raise KeyError(f"no device pair {a!r}, {b!r} in the topology (devices: {devices})") from None


def nvlink_count(code: str) -> int:
    """Bonded NVLinks a connection code stands for: ``NV18`` is 18, any PCIe path or ``X`` is 0."""
    match = _NVLINK.fullmatch(code)
    return int(match.group(1)) if match else 0


def parse_topo_matrix(text: str) -> TopoMatrix:
    """Parse the output of ``nvidia-smi topo -m``, tab-separated as printed or with spaces as pasted.

    Raises ValueError (one line) when the text holds no matrix or a row does not fit its header.
    """
    lines = _ANSI.sub("", text).splitlines()
    start = next((i for i, line in enumerate(lines) if _is_header(line)), None)
    if start is None:
        raise ValueError("not `nvidia-smi topo -m` output: no header row starting with GPU0")
    header = lines[start]
    rows: list[list[str]] = []
    for line in lines[start + 1 :]:
        tokens = line.split()
        if not tokens or tokens[0].startswith("Legend"):
            break
        rows.append(tokens)
    if not rows:
        raise ValueError("`nvidia-smi topo -m` header row is not followed by any device row")
    labels = [row[0] for row in rows]
    count = len(labels)
    spans = [m.span() for m in re.finditer(r"\S+", header)]
    if [header[a:b] for a, b in spans[:count]] != labels:
        raise ValueError(f"`nvidia-smi topo -m` header does not list the row devices {' '.join(labels)}")
    affinity_columns = [c for c in _AFFINITY_SPLIT.split(header[spans[count - 1][1] :].strip()) if c]

    cells: dict[tuple[str, str], str] = {}
    values: dict[str, dict[str, str]] = {}
    for row in rows:
        label, codes = row[0], row[1 : count + 1]
        if len(codes) < count:
            raise ValueError(f"`nvidia-smi topo -m` row {label} has {len(codes)} cells, expected {count}")
        for column, code in zip(labels, codes, strict=True):
            code = _LEGACY_CODES.get(code, code)
            if code != "X" and code not in _PATH_RANK and not _NVLINK.fullmatch(code):
                raise ValueError(f"`nvidia-smi topo -m` row {label}, column {column}: unknown code {code!r}")
            cells[(label, column)] = code
        values[label] = dict(zip(affinity_columns, row[count + 1 :], strict=False))

    legend = _nic_legend(lines[start + 1 + len(rows) :])
    gpus = tuple(label for label in labels if _GPU.fullmatch(label))
    nics = tuple(legend.get(label, label) for label in labels if not _GPU.fullmatch(label))
    return TopoMatrix(
        gpus=gpus,
        nics=nics,
        cells={(legend.get(a, a), legend.get(b, b)): code for (a, b), code in cells.items()},
        cpu_affinity={g: values[g]["CPU Affinity"] for g in gpus if "CPU Affinity" in values[g]},
        numa_affinity={
            g: _numa_node(values[g]["NUMA Affinity"]) for g in gpus if "NUMA Affinity" in values[g]
        },
        nic_legend=legend,
    )


def nic_affinity(matrix: TopoMatrix) -> tuple[NicAffinity, ...]:
    """Each GPU's nearest NIC (``PIX`` < ``PXB`` < ``PHB`` < ``NODE`` < ``SYS``; ties go to the first listed)."""
    affinities = []
    for gpu in matrix.gpus:
        best: tuple[int, str] | None = None
        for nic in matrix.nics:
            rank = _PATH_RANK.get(matrix.connection(gpu, nic))
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, nic)
        if best is not None:
            affinities.append(NicAffinity(gpu=_gpu_index(gpu), nic=best[1], path=PCIE_PATHS[best[0]]))
    return tuple(affinities)


def add_node_to_graph(
    graph: nx.Graph, matrix: TopoMatrix, node: int, ranks: Sequence[int] | None = None
) -> None:
    """Add one node's GPUs, NICs and links to a cluster graph, named as ``planner.topology`` names them.

    Vertices: the scale-up switch ``n{node}``, GPUs ``n{node}/gpu{j}`` (``rank=ranks[j]`` when ranks are
    given) and every NIC ``n{node}/{nic}``. Edges: GPU pairs with NVLink are ``intra_node`` with their
    ``nvlinks``, other GPU pairs ``pcie`` with their ``path``; each GPU reaches its nearest NIC over ``pcie``.
    When every GPU pair has NVLink (an NVSwitch node), each GPU also links ``intra_node`` to ``n{node}``.
    """
    if ranks is not None and len(ranks) != len(matrix.gpus):
        raise ValueError(f"node {node} has {len(matrix.gpus)} GPUs but {len(ranks)} ranks were given")
    switch = f"n{node}"
    graph.add_node(switch, kind="scale_up_switch", node=node)
    vertex = {}
    for position, gpu in enumerate(matrix.gpus):
        local = _gpu_index(gpu)
        vertex[gpu] = f"n{node}/gpu{local}"
        attrs: dict[str, Any] = {"kind": "gpu", "node": node, "local_rank": local}
        if ranks is not None:
            attrs["rank"] = ranks[position]
        graph.add_node(vertex[gpu], **attrs)
    for nic in matrix.nics:
        graph.add_node(f"n{node}/{nic}", kind="nic", node=node)

    fully_nvlinked = True
    for i, a in enumerate(matrix.gpus):
        for b in matrix.gpus[i + 1 :]:
            code = matrix.connection(a, b)
            links = nvlink_count(code)
            if links:
                graph.add_edge(vertex[a], vertex[b], link_class="intra_node", nvlinks=links)
            else:
                fully_nvlinked = False
                graph.add_edge(vertex[a], vertex[b], link_class="pcie", path=code)
    if fully_nvlinked:
        for gpu in matrix.gpus:
            graph.add_edge(vertex[gpu], switch, link_class="intra_node")
    for affinity in nic_affinity(matrix):
        graph.add_edge(
            vertex[f"GPU{affinity.gpu}"], f"n{node}/{affinity.nic}", link_class="pcie", path=affinity.path
        )


def read_nvidia_smi_topo(
    runner: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
) -> TopoMatrix | None:
    """Run ``nvidia-smi topo -m`` and parse it; None when nvidia-smi is missing, fails or times out."""
    try:
        result = runner(
            list(NVIDIA_SMI_TOPO), capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return parse_topo_matrix(result.stdout)


def _is_header(line: str) -> bool:
    tokens = line.split()
    return bool(tokens) and tokens[0] == "GPU0" and (len(tokens) == 1 or tokens[1] != "X")


def _nic_legend(lines: Sequence[str]) -> dict[str, str]:
    legend: dict[str, str] = {}
    in_legend = False
    for line in lines:
        if line.strip() == "NIC Legend:":
            in_legend = True
        elif in_legend and (match := _LEGEND_ENTRY.match(line)):
            legend[match.group(1)] = match.group(2)
    return legend


def _numa_node(value: str) -> int | None:
    return int(value) if value.isdigit() else None


def _gpu_index(name: str) -> int:
    match = _GPU.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a GPU name (GPU<k>)")
    return int(match.group(1))
