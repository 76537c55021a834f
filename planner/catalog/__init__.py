"""The catalogs: named models (``models``, with Hugging Face ``config.json`` import in ``hf_config``),
the GPUs of the hardware catalog and the bundled cluster profiles (``hardware``). Their data lives in
one folder, ``planner/catalog/data/`` (``data``)."""

from planner.catalog.hardware import (
    DEFAULT_CLUSTER,
    LAST_PROBE_NAME,
    cluster_names,
    default_cluster,
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

__all__ = [
    "DEFAULT_CLUSTER",
    "LAST_PROBE_NAME",
    "catalog_names",
    "cluster_names",
    "default_cluster",
    "gpu_names",
    "list_clusters",
    "list_models",
    "load_cluster",
    "load_cluster_file",
    "load_gpu",
    "load_model",
    "load_model_file",
    "moeplan_home",
    "profile_yaml",
    "with_nodes",
]
