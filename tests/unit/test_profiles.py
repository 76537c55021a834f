"""Hardware catalog and bundled cluster profiles: load, cite, resize; topology graph."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from planner.catalog import (
    DEFAULT_CLUSTER,
    cluster_names,
    gpu_names,
    list_clusters,
    load_cluster,
    load_gpu,
)
from planner.errors import SpecError
from planner.schema import COLLECTIVE_KINDS
from planner.topology import build_topology, link_class_between, node_of_rank, topology_node_link_data

ISSUE_GPUS = {"V100", "A100-SXM-40GB", "A100-SXM-80GB", "A800", "H100", "H800", "H200", "B200", "GB200"}
ISSUE_CLUSTERS = {"a800-2x8", "h800-dsv3", "dgx-h100", "dgx-a100", "v100-pcie", "gb200-nvl72"}


def test_every_gpu_the_product_promises_is_catalogued() -> None:
    names = " ".join(gpu_names())
    assert all(gpu in names for gpu in ISSUE_GPUS), names


def test_bundled_clusters() -> None:
    assert set(cluster_names()) == ISSUE_CLUSTERS
    assert DEFAULT_CLUSTER in cluster_names()


@pytest.mark.parametrize("name", sorted(ISSUE_CLUSTERS))
def test_every_figure_carries_its_source(name: str) -> None:
    cluster = load_cluster(name)
    texts = [cluster.gpu.source, cluster.provenance.source]
    for link in cluster.links.values():
        texts.append(link.source)
        texts.extend(link.collectives[kind].source for kind in COLLECTIVE_KINDS)
    for text in texts:
        # A citation, not a placeholder; and not cut short (an unquoted ' #' starts a YAML comment).
        assert len(text) > 20 and not text.rstrip().endswith((",", ";")), text


def test_datasheet_figures() -> None:
    h100 = load_gpu("h100-sxm")
    assert (h100.peak_tflops.bf16, h100.peak_tflops.fp8, h100.hbm_gib, h100.hbm_gbps) == (
        989.5,
        1979,
        80,
        3350,
    )
    assert load_gpu("V100-PCIe-16GB").peak_tflops.bf16 is None


def test_published_cluster_figures() -> None:
    dsv3 = load_cluster("h800-dsv3")
    assert dsv3.world_size == 2048
    assert dsv3.links["intra_node"].collectives["all_to_all"].bandwidth_gbps == 160  # DeepSeek-V3 s3.2.2
    assert dsv3.links["inter_node"].nominal_gbps == 50
    a800 = load_cluster("a800-2x8")
    assert (a800.num_nodes, a800.num_gpus_per_node, a800.gpu.name) == (2, 8, "A800-SXM-80GB")


def test_nodes_override() -> None:
    assert load_cluster("dgx-h100", num_nodes=16).world_size == 128
    with pytest.raises(SpecError, match=r"--nodes \(0\) must be at least 1"):
        load_cluster("dgx-h100", num_nodes=0)


def test_probed_topology_cannot_be_resized(tmp_path: Path) -> None:
    profile = load_cluster("a800-2x8")
    data = {**profile.model_dump(mode="json"), "topology": topology_node_link_data(profile)}
    path = tmp_path / "probed.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_cluster(str(path)).topology is not None
    with pytest.raises(SpecError, match="its topology was probed on 2 nodes"):
        load_cluster(str(path), num_nodes=4)


def test_profile_file_may_name_a_catalog_gpu(tmp_path: Path) -> None:
    data = load_cluster("a800-2x8").model_dump(mode="json")
    data["gpu"] = "H100-SXM"
    data.pop("name")
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    mine = load_cluster(str(path))
    assert mine.name == "mine" and mine.gpu.name == "H100-SXM"
    data["gpu"] = "H100-SMX"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(
        SpecError, match="GPU 'H100-SMX' is not in the hardware catalog; did you mean 'H100-SXM'"
    ):
        load_cluster(str(path))


def test_unknown_cluster_suggests() -> None:
    with pytest.raises(SpecError, match="did you mean 'dgx-h100'"):
        load_cluster("dgx-h10")


def test_topology_of_a_regular_cluster() -> None:
    cluster = load_cluster("dgx-h100", num_nodes=2)
    graph = build_topology(cluster)
    gpus = [v for v, d in graph.nodes(data=True) if d["kind"] == "gpu"]
    nics = [v for v, d in graph.nodes(data=True) if d["kind"] == "nic"]
    assert len(gpus) == 16 and len(nics) == 16
    assert graph.nodes["n1/gpu3"]["rank"] == 11
    assert graph.edges["n0/gpu0", "n0/mlx5_0"]["link_class"] == "pcie"
    assert graph.edges["n0/mlx5_0", "fabric"]["bandwidth_gbps"] == 50
    assert node_of_rank(cluster, 11) == 1
    assert link_class_between(cluster, 0, 7) == "intra_node"
    assert link_class_between(cluster, 7, 8) == "inter_node"


def test_topology_without_nic_affinity_links_gpus_to_the_fabric() -> None:
    graph = build_topology(load_cluster("a800-2x8"))
    assert graph.edges["n1/gpu0", "fabric"]["link_class"] == "inter_node"
    assert graph.number_of_nodes() == 1 + 2 + 16


def test_all_clusters_build() -> None:
    for cluster in list_clusters():
        assert build_topology(cluster).number_of_nodes() >= cluster.world_size
