"""The architecture table: every registered spec round-trips through config.json, and errors list the table."""

from __future__ import annotations

import pytest

from engine.architectures import ARCHITECTURES
from engine.config import SUPPORTED_MODEL_TYPES, CheckpointError, ModelConfig
from engine.moe import SparseMoE
from engine.random_checkpoint import hf_config
from engine.routing import ROUTER_SCORES


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_every_architecture_round_trips_through_its_config_json(model_type: str) -> None:
    spec = ARCHITECTURES[model_type]
    raw = hf_config(model_type)
    config = ModelConfig.from_dict(raw)
    assert config.model_type == spec.model_type == model_type
    assert raw["architectures"] == [spec.hf_class]
    assert config.router_scoring == spec.router_scoring and spec.router_scoring in ROUTER_SCORES
    assert ModelConfig.from_dict({**raw, **spec.variant_extras}).model_type == model_type


def test_unknown_model_type_errors_list_the_table() -> None:
    assert SUPPORTED_MODEL_TYPES == tuple(ARCHITECTURES)
    names = ", ".join(ARCHITECTURES)
    with pytest.raises(CheckpointError, match=f"unsupported model_type 'llama'; expected one of {names}$"):
        ModelConfig.from_dict({**hf_config("qwen3_moe"), "model_type": "llama"})
    with pytest.raises(ValueError, match="unsupported model_type 'llama'") as raised:
        hf_config("llama")
    assert all(repr(name) in str(raised.value) for name in ARCHITECTURES)


def test_tensor_renames_belong_to_their_architecture() -> None:
    hub = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    assert ARCHITECTURES["mixtral"].model_tensor_name(hub) == "model.layers.0.mlp.experts.0.w1.weight"
    assert ARCHITECTURES["qwen3_moe"].model_tensor_name(hub) == hub


def test_a_moe_block_refuses_a_scoring_rule_routing_does_not_know() -> None:
    with pytest.raises(ValueError, match="unknown router scoring 'nope'; expected one of \\('softmax',\\)"):
        SparseMoE(0, 8, 4, 2, 8, norm_topk_prob=True, router_scoring="nope")
