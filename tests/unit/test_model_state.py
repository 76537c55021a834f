"""Model state (issue 16 items 2 and 4): gradient and Adam-state precision, optimizer CPU offload, and the
flagship it makes possible, ``moeplan solve --model 2x70B`` on MoNTA's 16 A800s."""

from __future__ import annotations

import pytest

from planner.catalog import load_cluster, load_model
from planner.costmodel.estimate import estimate
from planner.costmodel.memory import (
    HOST_STATE_BYTES,
    MemoryModel,
    memory_coefficients,
    optimizer_bytes_per_param,
    with_optimizer,
)
from planner.costmodel.optimizer import (
    HOST_ADAM_BYTES_PER_PARAM,
    HOST_COPY_BYTES,
    host_capacity_per_gpu,
    optimizer_rates,
)
from planner.costmodel.routing import layout_imbalance
from planner.emit import megatron_args
from planner.emit.megatron_rules import check_megatron_rules
from planner.errors import InfeasiblePlanError, SpecError
from planner.feasibility import check_plan
from planner.frameworks import framework
from planner.schema import (
    DEFAULT_MEMORY_MARGIN,
    OptimizerConfig,
    ParallelConfig,
    TrainingSpec,
    memory_margin_bytes,
)
from planner.search import SearchOptions, solve
from planner.search.bounds import memory_floor
from planner.search.space import candidate_layouts, optimizer_ladder
from planner.units import GIB
from tests.cli.invoke import invoke

PRECISION_AWARE = OptimizerConfig(precision_aware=True)


@pytest.mark.parametrize(
    ("config", "precision", "expected"),
    [
        (OptimizerConfig(), "bf16", (12.0, 0.0)),  # FP32 master, m, v (Megatron-LM's default)
        (PRECISION_AWARE, "bf16", (10.0, 0.0)),  # the master as a 16-bit remainder of the BF16 weight
        (PRECISION_AWARE, "fp8", (12.0, 0.0)),  # FP8: Megatron-Core keeps an FP32 master
        (OptimizerConfig(precision_aware=True, exp_avg_dtype="bf16"), "bf16", (6.0, 0.0)),
        (OptimizerConfig(precision_aware=True, exp_avg_dtype="bf16"), "mxfp8", (8.0, 0.0)),
        # Megatron-Bridge's recipes: Megatron-Core keeps a full FP32 master under BF16 too
        (
            OptimizerConfig(precision_aware=True, exp_avg_dtype="bf16", param_remainders=False),
            "bf16",
            (8.0, 0.0),
        ),
        (OptimizerConfig(precision_aware=True, param_remainders=False), "bf16", (12.0, 0.0)),
        (OptimizerConfig(precision_aware=True, offload_fraction=0.5), "bf16", (6.0, HOST_STATE_BYTES / 2)),
        (OptimizerConfig(precision_aware=True, offload_fraction=1.0), "bf16", (0.0, HOST_STATE_BYTES)),
    ],
)
def test_optimizer_bytes_follow_megatron(config: OptimizerConfig, precision: str, expected: tuple) -> None:
    assert optimizer_bytes_per_param(config, precision) == expected


def test_the_schema_refuses_what_megatron_refuses() -> None:
    with pytest.raises(ValueError, match="needs precision_aware"):
        OptimizerConfig(offload_fraction=0.5)
    with pytest.raises(ValueError, match="needs precision_aware"):
        OptimizerConfig(exp_avg_dtype="bf16")
    with pytest.raises(ValueError, match="FP32 moments"):
        OptimizerConfig(precision_aware=True, exp_avg_dtype="bf16", offload_fraction=1.0)
    with pytest.raises(ValueError, match="only used with offload"):
        OptimizerConfig(overlap_offload=True)
    with pytest.raises(ValueError, match="only differs under precision_aware"):
        OptimizerConfig(param_remainders=False)


def test_bf16_gradients_halve_the_gradient_buffer_and_the_reduction() -> None:
    model, cluster = load_model("mixtral-8x7b"), load_cluster("dgx-h100", 2)
    training = TrainingSpec(global_batch=64)
    fp32 = ParallelConfig.for_world(16, tp=2, ep=8)
    bf16 = fp32.model_copy(update={"optimizer": OptimizerConfig(main_grads_dtype="bf16")})
    a, b = memory_coefficients(model, training, fp32), memory_coefficients(model, training, bf16)
    assert b.moe_layer_state[1] == pytest.approx(a.moe_layer_state[1] / 2)
    assert b.moe_layer_state[2] == a.moe_layer_state[2]  # the optimizer state does not change
    sent = [estimate(model, training, p, cluster).gradient_bytes_per_link_class for p in (fp32, bf16)]
    reduced = lambda s: sum(s.values())  # noqa: E731
    assert reduced(sent[1]) < reduced(sent[0])  # the gradient reduce-scatter moves 2 bytes, not 4


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_a_rung_derived_from_the_base_prices_as_the_layout_itself(precision: str) -> None:
    model, training = load_model("deepseek-v2-lite"), TrainingSpec(global_batch=64, precision=precision)
    base = ParallelConfig.for_world(16, tp=2, pp=2, ep=4, recompute="full")
    mem = memory_coefficients(model, training, base)
    ladder = optimizer_ladder(OptimizerConfig(), precision, True, framework("megatron"))
    assert any(r.precision_aware and not r.offloads for r in ladder) == (precision == "bf16")
    for rung in ladder:
        derived = with_optimizer(mem, base.optimizer, rung, precision)
        direct = memory_coefficients(model, training, base.model_copy(update={"optimizer": rung}))
        for field in ("dense_layer_state", "moe_layer_state", "first_rank_state", "last_rank_state",
                      "host_per_layer", "host_edges"):  # fmt: skip
            assert getattr(derived, field) == pytest.approx(getattr(direct, field), rel=1e-12), field


def test_the_ladder_needs_megatron_and_a_known_host() -> None:
    assert optimizer_ladder(OptimizerConfig(), "bf16", True, framework("torchtitan")) == ()
    assert not any(
        r.offloads for r in optimizer_ladder(OptimizerConfig(), "bf16", False, framework("megatron"))
    )
    # BF16 moments (the user's choice) cannot be offloaded: the host's Adam keeps FP32 state.
    bf16 = OptimizerConfig(precision_aware=True, exp_avg_dtype="bf16")
    assert optimizer_ladder(bf16, "bf16", True, framework("megatron")) == ()


def test_offload_time_is_copies_and_host_adam_overlapped_or_not() -> None:
    cluster = load_cluster("a800-2x8")
    host = cluster.host
    assert host is not None
    overlapped = OptimizerConfig(precision_aware=True, offload_fraction=1.0, overlap_offload=True)
    serial = overlapped.model_copy(update={"overlap_offload": False})
    copy_s = HOST_COPY_BYTES / (host.device_copy_gbps * 1e9)
    adam_s = HOST_ADAM_BYTES_PER_PARAM / (host.memory_gbps * 1e9 / cluster.num_gpus_per_node)
    per_param = lambda c: optimizer_rates(c, "bf16", cluster).per_host_byte * HOST_STATE_BYTES  # noqa: E731
    assert per_param(overlapped) == pytest.approx(max(copy_s, adam_s))
    assert per_param(serial) == pytest.approx(copy_s + adam_s)
    assert optimizer_rates(overlapped, "bf16", cluster).per_gpu_byte == 0.0  # nothing left on the GPU
    with pytest.raises(SpecError, match="states neither: give its profile a host: block"):
        optimizer_rates(overlapped, "fp16", load_cluster("v100-pcie"))


def test_the_flagship_fits_on_montas_16_a800s_with_the_optimizer_on_the_host() -> None:
    model, cluster = load_model("2x70B"), load_cluster("a800-2x8")
    result = solve(model, TrainingSpec(), cluster)
    plan = result.plan
    assert plan.solver is not None and plan.solver.optimal
    assert plan.estimate is not None and plan.estimate.fits and plan.estimate.memory is not None
    hbm = cluster.gpu.hbm_gib * GIB
    assert plan.estimate.peak_memory_bytes <= hbm - memory_margin_bytes(DEFAULT_MEMORY_MARGIN, hbm)
    assert plan.parallel.optimizer.offloads and plan.parallel.optimizer.precision_aware
    assert 0 < plan.estimate.memory.host_optimizer <= host_capacity_per_gpu(cluster)
    # Its Megatron arguments pass the emitter's rules and carry the offload.
    check_megatron_rules(plan, model, (0, 16))
    args = megatron_args(plan, model)
    for flag in ("--use-precision-aware-optimizer", "--optimizer-cpu-offload", "--optimizer-offload-fraction",
                 "--overlap-cpu-optimizer-d2h-h2d", "--use-distributed-optimizer"):  # fmt: skip
        assert flag in args, flag
    # Without offload (or under a framework that has none) it does not fit, and the refusal says why.
    with pytest.raises(InfeasiblePlanError, match=r"now off: --optimizer-offload none"):
        solve(model, TrainingSpec(), cluster, SearchOptions(memory_relief=False))
    with pytest.raises(InfeasiblePlanError, match=r"--framework torchtitan does not"):
        solve(model, TrainingSpec(), cluster, SearchOptions(framework="torchtitan"))


@pytest.mark.parametrize(
    ("name", "cluster_name", "nodes"), [("mixtral-8x7b", "dgx-h100", 2), ("2x70B", "a800-2x8", 2)]
)
def test_a_plan_leaves_megatron_lm_defaults_only_for_a_layout_that_needs_it(
    name: str, cluster_name: str, nodes: int
) -> None:
    model, cluster, training = (
        load_model(name),
        load_cluster(cluster_name, nodes),
        TrainingSpec(global_batch=64),
    )
    plan = solve(model, training, cluster).plan
    if plan.parallel.optimizer == OptimizerConfig():
        return
    # The same layout with Megatron-LM's defaults does not fit in HBM less the margin, at any split.
    hbm = cluster.gpu.hbm_gib * GIB
    capacity = hbm - memory_margin_bytes(DEFAULT_MEMORY_MARGIN, hbm)
    default = plan.parallel.model_copy(update={"optimizer": OptimizerConfig(), "layers_per_stage": None})
    assert memory_floor(memory_coefficients(model, training, default), model) > capacity


def test_megatron_rules_for_the_optimizer_settings() -> None:
    model, cluster = load_model("2x70B"), load_cluster("a800-2x8")
    plan = solve(model, TrainingSpec(), cluster).plan
    replicated = plan.model_copy(
        update={"parallel": plan.parallel.model_copy(update={"distributed_optimizer": False})}
    )
    with pytest.raises(SpecError, match="needs the distributed optimizer"):
        check_megatron_rules(replicated, model, (0, 16))
    moments = OptimizerConfig(precision_aware=True, exp_avg_dtype="bf16", main_grads_dtype="bf16")
    bf16 = plan.model_copy(
        update={"parallel": plan.parallel.model_copy(update={"optimizer": moments, "a2a_overlap": False})}
    )
    with pytest.raises(SpecError, match=r"exp_avg_dtype \(bf16\) needs megatron_version 0.13"):
        check_megatron_rules(bf16, model, (0, 12))
    args = megatron_args(bf16, model)
    for flag in ("--grad-reduce-in-bf16", "--main-grads-dtype", "--exp-avg-dtype", "--exp-avg-sq-dtype"):
        assert flag in args, flag
    assert "--optimizer-cpu-offload" not in args
    fp32_master = bf16.model_copy(
        update={
            "parallel": bf16.parallel.model_copy(
                update={"optimizer": moments.model_copy(update={"param_remainders": False})}
            )
        }
    )
    with pytest.raises(SpecError, match=r"param_remainders \(False\) has no Megatron-LM flag"):
        megatron_args(fp32_master, model)


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--optimizer-offload", "2"], "must be auto"),
        (["--optimizer-offload", "half"], "must be auto"),
        (["--optimizer-offload", "0.5", "--exp-avg-dtype", "bf16"], "exp_avg_dtype must be fp32"),
    ],
)
def test_solve_refuses_bad_optimizer_flags(flags: list[str], said: str) -> None:
    code, stdout, stderr = invoke(
        "solve", "--model", "tiny-moe", "--cluster", "a800-2x8", "--gbs", "32", *flags
    )
    assert code == 2 and stdout == "" and said in " ".join(stderr.replace("│", " ").split())


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        (
            "deepseek-v3",
            {"tp": 2, "pp": 8, "ep": 32, "recompute": "selective", "recompute_modules": ("mla_up_proj",)},
        ),
        ("mixtral-8x7b", {"tp": 2, "pp": 2, "ep": 8, "recompute": "full"}),
        ("mixtral-8x7b", {"tp": 1, "ep": 8, "fsdp": True}),
        ("qwen3-30b-a3b", {"tp": 2, "ep": 8, "sequence_parallel": False}),
    ],
)
def test_activations_by_module_sum_to_the_activations(name: str, layout: dict[str, object]) -> None:
    model, cluster = load_model(name), load_cluster("dgx-h100", 32)
    parallel = ParallelConfig.for_world(256, **layout)
    use = estimate(model, TrainingSpec(global_batch=512), parallel, cluster).memory
    assert use is not None and use.activations_by_module
    assert sum(use.activations_by_module.values()) == pytest.approx(use.activations, rel=1e-12)
    if parallel.recompute == "full":
        assert "layer inputs (full recompute)" in use.activations_by_module
    if "mla_up_proj" in parallel.recompute_modules:
        assert "attention" in use.activations_by_module  # MLA latents stay


@pytest.mark.parametrize("name", ["deepseek-v3", "mixtral-8x7b", "2x70B"])
def test_one_memory_model_prices_a_search_as_each_layout_alone(name: str) -> None:
    """The search shares one MemoryModel over its layouts (each part once per distinct key): every
    layout's coefficients must equal those made for it alone, or a key misses a field a part reads."""
    model, cluster = load_model(name), load_cluster("a800-2x8")
    training = TrainingSpec(precision="bf16")
    options = SearchOptions(optimizer=PRECISION_AWARE) if name == "mixtral-8x7b" else SearchOptions()
    layouts = list(candidate_layouts(model, training, cluster.world_size, 8, options, cluster.gpu))
    sample = layouts[::7]
    for p in layouts[::97]:  # the same layout without the distributed optimizer, then under FSDP
        sample += [
            p.model_copy(update={"distributed_optimizer": False, "fsdp": fsdp}) for fsdp in (False, True)
        ]
        if p.optimizer == OptimizerConfig():  # and as FSDP2 shards it, kept gathered or resharded
            sample += [
                p.model_copy(update={"dp_sharding": "fsdp2", "fsdp": fsdp, "fp8_param_gather": False})
                for fsdp in (False, True)
            ]
    shared = MemoryModel(model, training)
    for p in sample:
        imbalance = layout_imbalance(model, training, p)
        assert shared.coefficients(p, imbalance) == memory_coefficients(model, training, p, imbalance), p


def test_megatron_fsdp_state_as_megatron_keeps_it() -> None:
    """Megatron-FSDP (optim_grads_params): FP32 main-weight shards (no remainders), the embedding and the
    output layer whole, the gathered and prefetched units and two units' gradients unsharded."""
    model, training = load_model("mixtral-8x7b"), TrainingSpec()
    aware = OptimizerConfig(precision_aware=True)
    assert optimizer_bytes_per_param(aware, "bf16", fsdp=True) == (12.0, 0.0)
    base = ParallelConfig.for_world(32, tp=2, pp=2, ep=8, etp=1, sequence_parallel=True)
    fsdp = base.model_copy(update={"fsdp": True, "distributed_optimizer": False})
    mem = memory_coefficients(model, training, fsdp)
    vocab = model.vocab_size * model.hidden_size / fsdp.tp
    assert mem.first_rank_state[0] == pytest.approx(2.0 * vocab)  # whole, not 2 / (dp x cp)
    dense = memory_coefficients(model, training, base)
    assert mem.moe_layer_state[0] <= dense.moe_layer_state[0] / fsdp.edp  # sharded over dp x cp and edp
    unit = dense.moe_layer_state[0] / 2.0  # a MoE layer's local parameters (BF16 weights on this rank)
    stage = -(-model.num_layers // fsdp.pp)
    prefetched = min(max(5e8, unit), (stage - 1) * unit)
    assert mem.recompute_workspace == pytest.approx(2.0 * (unit + prefetched) + 2 * 4.0 * unit)


def test_fsdp2_state_as_torchtitan_keeps_it() -> None:
    """PyTorch FSDP2 as torchtitan runs it: FP32 parameter and gradient shards and FP32 Adam state, 16 bytes
    over the shard, plus the BF16 weights whole while kept gathered (its distributed-optimizer mapping) or
    two units of them when resharded after forward, and a unit's BF16 gradient with its FP32 copy."""
    model, training = load_model("mixtral-8x7b"), TrainingSpec()
    base = ParallelConfig.for_world(32, tp=2, pp=2, ep=8, etp=1, sequence_parallel=True)
    megatron = memory_coefficients(model, training, base)
    kept = memory_coefficients(model, training, base.model_copy(update={"dp_sharding": "fsdp2"}))
    params = megatron.moe_layer_state[0] / 2.0  # BF16 weights on this rank, Megatron's
    edp = base.edp  # a MoE layer is mostly experts, sharded over EDP; its attention over DP x CP
    assert kept.moe_layer_state[1] < megatron.moe_layer_state[1] / edp  # gradients sharded, not 4 whole
    total = sum(kept.moe_layer_state)
    assert 2.0 * params + 16.0 * params / base.dp <= total <= 2.0 * params + 16.0 * params / edp
    resharded = memory_coefficients(
        model,
        training,
        base.model_copy(update={"dp_sharding": "fsdp2", "fsdp": True, "distributed_optimizer": False}),
    )
    assert sum(resharded.moe_layer_state) == pytest.approx(total - 2.0 * params)
    unit = max(params, megatron.dense_layer_state[0] / 2.0)
    assert kept.recompute_workspace == pytest.approx(6.0 * unit)
    assert resharded.recompute_workspace == pytest.approx(4.0 * unit + 6.0 * unit)
    # The embedding is an FSDP unit too: sharded, not whole as under Megatron-FSDP.
    assert resharded.first_rank_state[0] == pytest.approx(
        4.0 * model.vocab_size * model.hidden_size / base.tp / base.dp
    )


def test_fsdp2_is_torchtitan_s_and_only_its() -> None:
    model, cluster = load_model("mixtral-8x7b"), load_cluster("dgx-h100")
    plan = solve(model, TrainingSpec(), cluster, SearchOptions(framework="torchtitan")).plan
    assert plan.parallel.dp_sharding == "fsdp2"
    megatron_plan = solve(model, TrainingSpec(), cluster).plan
    assert megatron_plan.parallel.dp_sharding == "megatron"
    said = [str(v) for v in framework("torchtitan").rules(model, TrainingSpec(), megatron_plan.parallel)]
    assert any("dp_sharding" in s and "--framework torchtitan" in s for s in said), said
    said = [str(v) for v in framework("megatron").rules(model, TrainingSpec(), plan.parallel)]
    assert any("dp_sharding" in s for s in said), said
    with pytest.raises(SpecError, match=r"dp_sharding \(fsdp2\) is torchtitan's FSDP2"):
        megatron_args(plan, model)
    aware = plan.parallel.model_copy(update={"optimizer": OptimizerConfig(precision_aware=True)})
    assert any(v.field == "dp_sharding" for v in check_plan(model, TrainingSpec(), aware, cluster.world_size))
    plain = plan.parallel.model_copy(update={"distributed_optimizer": False})
    assert any(v.field == "dp_sharding" for v in check_plan(model, TrainingSpec(), plain, cluster.world_size))


@pytest.mark.parametrize(("version", "written"), [("0.16", False), ("0.17", True)])
def test_megatron_fsdp_gradients_dtype_is_written_where_it_defaults_to_bf16(
    version: str, written: bool
) -> None:
    model, cluster = load_model("mixtral-8x7b"), load_cluster("dgx-h100")
    plan = solve(model, TrainingSpec(), cluster, SearchOptions(fixed=(("pp", 1),))).plan
    fsdp = plan.model_copy(
        update={
            "parallel": plan.parallel.model_copy(
                update={"fsdp": True, "distributed_optimizer": False, "a2a_overlap": False}
            )
        }
    )
    args = megatron_args(fsdp, model, version)
    assert ("--megatron-fsdp-main-grads-dtype" in args) is written
    if written:
        assert args[args.index("--megatron-fsdp-main-grads-dtype") + 1] == "fp32"
