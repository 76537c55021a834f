"""The model catalog and model files: names, YAML files, Hugging Face config.json mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.catalog import catalog_names, list_models, load_model, load_model_file
from planner.catalog.data import MODELS_DIR
from planner.catalog.hf_config import SUPPORTED_ARCHITECTURES
from planner.errors import SpecError

HF_DIR = Path(__file__).resolve().parent.parent / "data" / "hf"
ISSUE_MODELS = [
    "2x70B", "mixtral-8x7b", "mixtral-8x22b", "deepseek-v3", "deepseek-v2-lite", "qwen2-57b-a14b",
    "qwen3-30b-a3b", "qwen3-235b-a22b", "gpt-oss-120b", "moonlight-16b-a3b", "llama3-8x70b", "dbrx", "tiny-moe",
]  # fmt: skip
SPEC_ONLY = {"name", "source", "notes", "semantics_source"}
NOT_IN_THE_CONFIG = {
    # Training settings the released config leaves out, which the catalog takes from its other sources
    # (semantics_source): DeepSeek-V3's report (balancing, bias rate, MTP weight; YaRN only after
    # pretraining), Megatron-Bridge's gpt-oss recipe (no balancing loss), none for MoNTA's 2x70B.
    "deepseek-v3": ("moe_router_bias_update_rate", "moe_router_load_balancing_type", "moe_aux_loss_coeff",
                    "mtp_loss_scaling_factor", "yarn"),
    "gpt-oss-120b": ("moe_router_load_balancing_type",),
    "llama-2-70b": ("rotary_base",),
}  # fmt: skip


def test_catalog_has_every_model_the_product_promises() -> None:
    assert sorted(catalog_names(), key=str.lower) == sorted(ISSUE_MODELS, key=str.lower)


def test_names_are_case_insensitive() -> None:
    assert load_model("2x70b") == load_model("2x70B") == load_model("2X70B")


def test_each_bundled_file_is_named_after_its_model() -> None:
    """load_model reads only the file named after the model it is asked for (its start-up cost)."""
    for model in list_models():
        assert (MODELS_DIR / f"{model.name.lower()}.yaml").is_file(), model.name
        assert load_model(model.name) == model


@pytest.mark.parametrize("path", sorted(HF_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_hf_config_maps_to_the_catalog_entry(path: Path) -> None:
    mapped = load_model_file(path)
    assert mapped.source and "config.json" in mapped.source
    catalog_name = {"llama-2-70b": "2x70B"}.get(path.stem, path.stem)
    expected = load_model(catalog_name).model_dump(exclude=SPEC_ONLY)
    got = mapped.model_dump(exclude=SPEC_ONLY)
    if path.stem == "llama-2-70b":  # the dense backbone of 2x70B: same attention and FFN, no experts
        for key in ("num_experts", "moe_ffn_hidden_size", "moe_router_topk"):
            expected[key] = None
    for key in NOT_IN_THE_CONFIG.get(path.stem, ()):
        expected.pop(key), got.pop(key)
    assert got == expected


def test_dense_models_from_hf_have_no_experts() -> None:
    model = load_model(str(HF_DIR / "llama-2-70b.json"))
    assert not model.is_moe and model.name == "llama-2-70b"


def test_unknown_architecture_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"architectures": ["MambaForCausalLM"], "hidden_size": 4}))
    with pytest.raises(
        SpecError, match="architecture 'MambaForCausalLM' is not supported; moeplan maps"
    ) as info:
        load_model(str(path))
    assert all(arch in str(info.value) for arch in SUPPORTED_ARCHITECTURES)


def test_hf_missing_field_is_named(tmp_path: Path) -> None:
    data = json.loads((HF_DIR / "mixtral-8x7b.json").read_text())
    del data["num_local_experts"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SpecError, match="field `num_local_experts` is missing; MixtralForCausalLM needs it"):
        load_model_file(path)


def test_hf_unsupported_layer_pattern(tmp_path: Path) -> None:
    data = json.loads((HF_DIR / "qwen3-30b-a3b.json").read_text())
    data["decoder_sparse_step"] = 2
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SpecError, match="decoder_sparse_step 2 .* is not supported"):
        load_model_file(path)


def test_hf_leading_dense_layers(tmp_path: Path) -> None:
    data = json.loads((HF_DIR / "qwen3-30b-a3b.json").read_text())
    data["mlp_only_layers"] = [0, 1]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    assert load_model_file(path).first_k_dense_layers == 2


def test_yaml_model_file_round_trips(tmp_path: Path) -> None:
    import yaml

    original = load_model("deepseek-v3")
    path = tmp_path / "my-model.yaml"
    path.write_text(yaml.safe_dump(original.model_dump(exclude={"name"})))
    loaded = load_model(str(path))
    assert loaded.name == "my-model"
    assert loaded.model_dump(exclude={"name"}) == original.model_dump(exclude={"name"})


def test_json_model_spec_is_not_mistaken_for_hf(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(load_model("tiny-moe").model_dump_json())
    assert load_model(str(path)) == load_model("tiny-moe")


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(SpecError, match="did you mean 'mixtral-8x7b'"):
        load_model("mixtral-8x7")


def test_file_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "num_layers: -2\nhidden_size: 8\nnum_attention_heads: 2\nffn_hidden_size: 8\nvocab_size: 4\nnum_expert: 4\n"
    )
    with pytest.raises(SpecError) as info:
        load_model(str(path))
    message = str(info.value)
    assert "field `num_layers` (-2): Input should be greater than 0" in message
    assert "field `num_expert` (4): unknown field (did you mean `num_experts`?)" in message
    assert str(path) in message
