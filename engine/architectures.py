"""Every supported architecture (config.json `model_type`) as one spec, in one table.

What differs between architectures lives here and nowhere else: how config.json maps onto ModelConfig, the
architecture-specific keys of a random config.json, the tensor renames applied when loading, the router's
scoring rule, and the config keys that exercise a variant's optional parts in the tests. engine.config,
engine.random_checkpoint, engine.checkpoint and the test fixtures read ARCHITECTURES; adding an architecture
is one entry (plus, for a new scoring rule, one function in engine.routing.ROUTER_SCORES).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.config_reader import ConfigReader


@dataclass(frozen=True)
class RandomShape:
    """The shape arguments of a random config.json that architecture-specific keys are derived from."""

    hidden_size: int
    num_heads: int
    num_experts: int
    expert_width: int


@dataclass(frozen=True)
class ArchitectureSpec:
    """One architecture: what engine.config, engine.random_checkpoint, engine.checkpoint and the tests need.

    read_config: the architecture-specific ModelConfig fields, read from config.json.
    random_config: the architecture-specific keys of a config.json as transformers writes it, for a shape.
    tensor_renames: (regex, replacement) pairs turning checkpoint tensor names into the model's, in order.
    router_scoring: the name of the router's scoring rule in engine.routing.ROUTER_SCORES.
    variant_extras: config.json keys that switch on the variant's optional parts (dense layers, clipping), so
        tests built from hf config exercise them.
    """

    model_type: str
    hf_class: str
    read_config: Callable[[ConfigReader], dict[str, Any]]
    random_config: Callable[[RandomShape], dict[str, Any]]
    tensor_renames: tuple[tuple[str, str], ...] = ()
    router_scoring: str = "softmax"
    variant_extras: Mapping[str, Any] = field(default_factory=dict)

    def model_tensor_name(self, name: str) -> str:
        """A checkpoint tensor's name with this architecture's renames applied."""
        for pattern, replacement in self.tensor_renames:
            name = re.sub(pattern, replacement, name)
        return name


def _read_mixtral(reader: ConfigReader) -> dict[str, Any]:
    return {
        "moe_intermediate_size": reader.get("intermediate_size", int),
        "norm_topk_prob": True,
        "sliding_window": reader.raw.get("sliding_window"),
    }


def _read_olmoe(reader: ConfigReader) -> dict[str, Any]:
    bias = reader.get("attention_bias", bool, False)
    return {
        "moe_intermediate_size": reader.get("intermediate_size", int),
        "norm_topk_prob": reader.get("norm_topk_prob", bool, False),
        "qkv_bias": bias,
        "o_bias": bias,
        "qk_norm": "full",
        "clip_qkv": reader.raw.get("clip_qkv"),
    }


def _read_qwen_moe(reader: ConfigReader) -> dict[str, Any]:
    """The fields qwen2_moe and qwen3_moe share: dense layers between MoE layers, opt-in sliding window."""
    num_layers = reader.get("num_hidden_layers", int)
    sparse_step = reader.get("decoder_sparse_step", int, 1)
    mlp_only = reader.raw.get("mlp_only_layers") or []
    dense = tuple(i for i in range(num_layers) if i in mlp_only or (i + 1) % sparse_step != 0)
    return {
        "moe_intermediate_size": reader.get("moe_intermediate_size", int),
        "norm_topk_prob": reader.get("norm_topk_prob", bool, False),
        "dense_layers": dense,
        "dense_intermediate_size": reader.get("intermediate_size", int) if dense else 0,
        "sliding_window": reader.raw.get("sliding_window") if reader.raw.get("use_sliding_window") else None,
    }


def _read_qwen2_moe(reader: ConfigReader) -> dict[str, Any]:
    return {
        **_read_qwen_moe(reader),
        "qkv_bias": reader.get("qkv_bias", bool, True),
        "shared_expert_intermediate_size": reader.get("shared_expert_intermediate_size", int, 0),
    }


def _read_qwen3_moe(reader: ConfigReader) -> dict[str, Any]:
    fields = _read_qwen_moe(reader)
    bias = reader.get("attention_bias", bool, False)
    return {**fields, "qkv_bias": bias, "o_bias": bias, "qk_norm": "head"}


def _random_mixtral(shape: RandomShape) -> dict[str, Any]:
    return {"intermediate_size": shape.expert_width, "num_local_experts": shape.num_experts}


def _random_olmoe(shape: RandomShape) -> dict[str, Any]:
    return {"intermediate_size": shape.expert_width, "num_experts": shape.num_experts}


def _random_qwen_moe(shape: RandomShape) -> dict[str, Any]:
    return {
        "num_experts": shape.num_experts,
        "moe_intermediate_size": shape.expert_width,
        "intermediate_size": 4 * shape.expert_width,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


def _random_qwen2_moe(shape: RandomShape) -> dict[str, Any]:
    return {
        **_random_qwen_moe(shape),
        "norm_topk_prob": False,
        "shared_expert_intermediate_size": 2 * shape.expert_width,
    }


def _random_qwen3_moe(shape: RandomShape) -> dict[str, Any]:
    return {**_random_qwen_moe(shape), "norm_topk_prob": True, "head_dim": shape.hidden_size // shape.num_heads}


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    spec.model_type: spec
    for spec in (
        ArchitectureSpec(
            "mixtral",
            "MixtralForCausalLM",
            _read_mixtral,
            _random_mixtral,
            tensor_renames=((r"\.block_sparse_moe\.", ".mlp."),),  # the hub's name of the MoE block
        ),
        ArchitectureSpec(
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            _read_qwen2_moe,
            _random_qwen2_moe,
            variant_extras={"mlp_only_layers": [1], "intermediate_size": 96},  # a dense layer between MoE layers
        ),
        ArchitectureSpec("qwen3_moe", "Qwen3MoeForCausalLM", _read_qwen3_moe, _random_qwen3_moe),
        ArchitectureSpec("olmoe", "OlmoeForCausalLM", _read_olmoe, _random_olmoe, variant_extras={"clip_qkv": 4.0}),
    )
}
