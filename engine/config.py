"""Model configuration parsed from a Hugging Face config.json, one normalized shape for all architectures."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.architectures import ARCHITECTURES
from engine.config_reader import CheckpointError, ConfigReader
from engine.paths import bundled

SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
# The bundled SimBal-trained model (trained by `moe-train`, see its model card): what commands serve by default.
DEFAULT_MODEL_DIR = bundled("models/tiny-simbal")


@dataclass(frozen=True)
class RouterBalancing:
    """How the router was balanced during training (config.json `router_balancing`), e.g. simbal or lbl."""

    method: str
    coef: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "coef": self.coef, **self.extra}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only MoE model; every supported model_type maps onto these fields."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # "none", "head" (per-head RMSNorm, qwen3) or "full" (over all heads, olmoe)
    clip_qkv: float | None = None
    shared_expert_intermediate_size: int = 0
    dense_intermediate_size: int = 0
    dense_layers: tuple[int, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None
    router_balancing: RouterBalancing | None = None
    router_scoring: str = "softmax"  # a name in engine.routing.ROUTER_SCORES
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the layers with an MoE block, in order (dense layers left out): what per-layer expert
        counts, plans and routing policies are keyed by."""
        return [layer for layer in range(self.num_layers) if self.is_moe_layer(layer)]

    @classmethod
    def from_dir(cls, path: Path) -> ModelConfig:
        config_path = path / "config.json"
        if not path.is_dir():
            raise CheckpointError(f"{path}: model directory does not exist")
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: config.json is missing from the model directory")
        try:
            raw = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"{config_path}: expected a JSON object at the top level")
        return cls.from_dict(raw, source=str(config_path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        reader = ConfigReader(raw, source)
        model_type = reader.get("model_type", str)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: unsupported model_type {model_type!r}; expected one of {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        hidden_act = reader.get("hidden_act", str, "silu")
        if hidden_act != "silu":
            raise CheckpointError(f"{source}: hidden_act {hidden_act!r} is not supported; expected 'silu'")
        hidden = reader.get("hidden_size", int)
        heads = reader.get("num_attention_heads", int)
        num_layers = reader.get("num_hidden_layers", int)
        num_experts = raw.get("num_local_experts", raw.get("num_experts"))
        if not isinstance(num_experts, int) or num_experts < 1:
            raise CheckpointError(f"{source}: 'num_experts' (or 'num_local_experts') must be a positive integer")
        common: dict[str, Any] = {
            "model_type": model_type,
            "vocab_size": reader.get("vocab_size", int),
            "hidden_size": hidden,
            "num_layers": num_layers,
            "num_heads": heads,
            "num_kv_heads": reader.get("num_key_value_heads", int, heads) or heads,
            "head_dim": reader.get("head_dim", int, hidden // heads) or hidden // heads,
            "num_experts": num_experts,
            "top_k": reader.get("num_experts_per_tok", int),
            "rms_norm_eps": reader.get("rms_norm_eps", float, 1e-6),
            "rope_theta": _rope_theta(raw, source),
            "max_position_embeddings": reader.get("max_position_embeddings", int, 4096),
            "tie_word_embeddings": reader.get("tie_word_embeddings", bool, False),
            "eos_token_ids": _token_ids(raw.get("eos_token_id")),
            "router_balancing": _router_balancing(raw.get("router_balancing"), source),
            "raw": raw,
        }
        spec = ARCHITECTURES[model_type]
        config = cls(**common, **spec.read_config(reader), router_scoring=spec.router_scoring)
        if not 1 <= config.top_k <= config.num_experts:
            raise CheckpointError(f"{source}: num_experts_per_tok={config.top_k} must be in 1..{config.num_experts}")
        if heads % config.num_kv_heads:
            raise CheckpointError(
                f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={config.num_kv_heads}"
            )
        return config


def _rope_theta(raw: dict[str, Any], source: str) -> float:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported; only 'default' RoPE is")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise CheckpointError(f"{source}: rope_theta must be a positive number, got {theta!r}")
    return float(theta)


def _token_ids(value: Any) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, int))
    return ()


def _router_balancing(value: Any, source: str) -> RouterBalancing | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("method"), str):
        raise CheckpointError(f"{source}: 'router_balancing' must be an object with a string 'method'")
    coef = value.get("coef")
    if coef is not None and not isinstance(coef, (int, float)):
        raise CheckpointError(f"{source}: 'router_balancing.coef' must be a number, got {coef!r}")
    extra = {k: v for k, v in value.items() if k not in ("method", "coef")}
    return RouterBalancing(method=value["method"], coef=None if coef is None else float(coef), extra=extra)
