"""``moeplan models``, ``clusters``, ``show model|cluster|gpu`` and ``schema``: the catalogs and the
documents' JSON Schema."""

from enum import StrEnum
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from planner.catalog import list_clusters, list_models, load_cluster, load_gpu, load_model
from planner.cli.app import JsonFlag, app, out, print_json, show_app, user_errors
from planner.costmodel import count_params
from planner.present.report import render_cluster, render_clusters, render_model, render_models
from planner.schema import ClusterProfile, GpuSpec, ModelSpec, Plan, TrainingSpec
from planner.schema.docs import json_schema

__all__: list[str] = []


def _model_summary(model: ModelSpec) -> dict[str, Any]:
    counts = count_params(model)
    return {
        "name": model.name,
        "total_params": counts.total,
        "active_params": counts.active,
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "num_experts": model.num_experts,
        "moe_router_topk": model.moe_router_topk,
        "attention": model.attention,
    }


def _cluster_summary(cluster: ClusterProfile) -> dict[str, Any]:
    return {
        "name": cluster.name,
        "num_nodes": cluster.num_nodes,
        "num_gpus_per_node": cluster.num_gpus_per_node,
        "num_gpus": cluster.world_size,
        "gpu": cluster.gpu.name,
        "hbm_gib": cluster.gpu.hbm_gib,
        "description": cluster.description,
    }


@app.command()
@user_errors
def models(as_json: JsonFlag = False) -> None:
    """List the model catalog with total and active parameter counts."""
    catalog = list_models()
    if as_json:
        print_json([_model_summary(m) for m in catalog])
    else:
        out.print(render_models(catalog))


@app.command()
@user_errors
def clusters(as_json: JsonFlag = False) -> None:
    """List the bundled cluster profiles and their sizes."""
    profiles = list_clusters()
    if as_json:
        print_json([_cluster_summary(c) for c in profiles])
    else:
        out.print(render_clusters(profiles))


@show_app.command("model")
@user_errors
def show_model(
    name: Annotated[
        str, typer.Argument(help="Catalog name, a moeplan model YAML, or a Hugging Face config.json.")
    ],
    as_json: JsonFlag = False,
) -> None:
    """Show a model's fields, parameter counts and source."""
    model = load_model(name)
    if as_json:
        counts = count_params(model)
        print_json(
            {
                **_model_summary(model),
                "routed_expert_params": counts.routed_experts,
                "mtp_params": counts.mtp,
                "spec": model.model_dump(mode="json"),
            }
        )
    else:
        out.print(render_model(model))


@show_app.command("cluster")
@user_errors
def show_cluster(
    name: Annotated[str, typer.Argument(help="Bundled profile name or a cluster profile YAML.")],
    nodes: Annotated[int | None, typer.Option(help="Override the node count of a bundled profile.")] = None,
    topology: Annotated[
        bool, typer.Option("--topology", help="With --json, include the networkx graph.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Show a cluster profile: GPU, link classes with per-collective fits, provenance."""
    cluster = load_cluster(name, nodes)
    if as_json:
        data = cluster.model_dump(mode="json")
        if topology:
            # networkx is imported only here: it costs ~130 ms of start-up that other commands skip.
            from planner.topology import topology_node_link_data

            data["topology"] = topology_node_link_data(cluster)
        print_json(data)
    else:
        out.print(render_cluster(cluster))


@show_app.command("gpu")
@user_errors
def show_gpu(name: Annotated[str, typer.Argument(help="GPU name of the hardware catalog.")]) -> None:
    """Show a GPU's datasheet figures (JSON)."""
    print_json(load_gpu(name).model_dump(mode="json"))


class SchemaName(StrEnum):
    ALL = "all"
    MODEL = "model"
    GPU = "gpu"
    CLUSTER = "cluster"
    TRAINING = "training"
    PLAN = "plan"


_SCHEMAS: dict[SchemaName, type[BaseModel]] = {
    SchemaName.MODEL: ModelSpec,
    SchemaName.GPU: GpuSpec,
    SchemaName.CLUSTER: ClusterProfile,
    SchemaName.TRAINING: TrainingSpec,
    SchemaName.PLAN: Plan,
}


@app.command()
@user_errors
def schema(which: Annotated[SchemaName, typer.Argument(help="Which document.")] = SchemaName.ALL) -> None:
    """Print the JSON Schema of the input files and of the plan (field docs included)."""
    if which is SchemaName.ALL:
        print_json({name.value: json_schema(spec) for name, spec in _SCHEMAS.items()})
    else:
        print_json(json_schema(_SCHEMAS[which]))
