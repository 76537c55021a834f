"""The catalogs: named models (``models``, with Hugging Face ``config.json`` import in ``hf_config``),
the GPUs of the hardware catalog and the bundled cluster profiles (``hardware``). Their data lives in
one folder, ``planner/catalog/data/`` (``data``)."""

from planner.catalog.hardware import (
    DEFAULT_CLUSTER,
    LAST_PROBE_NAME,
    cluster_names,
    gpu_names,
    list_clusters,
    load_cluster,
    load_cluster_file,
    load_gpu,
    moeplan_home,
    profile_yaml,
    with_nodes,
)
from planner.catalog.models import catalog_names, list_models, load_model, load_model_file
from planner.catalog.refs import (
    ResolvedCluster,
    file_sha256,
    find_file,
    load_plan_cluster,
    load_plan_model,
    resolve_cluster,
    resolve_model,
    store_probed_profile,
)

__all__ = [
    "DEFAULT_CLUSTER",
    "LAST_PROBE_NAME",
    "ResolvedCluster",
    "catalog_names",
    "cluster_names",
    "file_sha256",
    "find_file",
    "gpu_names",
    "list_clusters",
    "list_models",
    "load_cluster",
    "load_cluster_file",
    "load_gpu",
    "load_model",
    "load_model_file",
    "load_plan_cluster",
    "load_plan_model",
    "moeplan_home",
    "profile_yaml",
    "resolve_cluster",
    "resolve_model",
    "store_probed_profile",
    "with_nodes",
]
