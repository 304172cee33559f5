"""Write random-weight checkpoints of any supported architecture in the Hugging Face layout.

Used for benchmarks (random weights time the same as trained ones), the quickstart and tests.
`moe-random-checkpoint OUT --arch qwen3_moe --layers 8 --hidden 512 --experts 32 --expert-width 512 --top-k 4`
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from engine.architectures import ARCHITECTURES, RandomShape
from engine.checkpoint import save_checkpoint
from engine.command_line import command_parser
from engine.config import SUPPORTED_MODEL_TYPES, ModelConfig
from engine.model import MoEForCausalLM
from engine.tokenizer import byte_level_tokenizer, save_tokenizer_files


def hf_config(
    model_type: str,
    *,
    vocab_size: int = 320,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    num_experts: int = 8,
    top_k: int = 2,
    expert_width: int = 32,
    max_position_embeddings: int = 2048,
    rope_theta: float = 10000.0,
    eos_token_id: int | None = None,
    router_balancing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A config.json dict as transformers writes it for model_type, from one set of shape arguments."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}")
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [ARCHITECTURES[model_type].hf_class],
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "num_experts_per_tok": top_k,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": False,
        "eos_token_id": eos_token_id,
    }
    shape = RandomShape(hidden_size, num_heads, num_experts, expert_width)
    config.update(ARCHITECTURES[model_type].random_config(shape))
    if router_balancing is not None:
        config["router_balancing"] = router_balancing
    return config


def write_tokenizer(path: Path) -> int:
    """Write the byte-level tokenizer files; return the end-of-text id."""
    return save_tokenizer_files(byte_level_tokenizer(), path)


def write_random_checkpoint(
    path: str | Path,
    model_type: str = "qwen3_moe",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    fused: bool = False,
    shape: dict[str, Any] | None = None,
) -> Path:
    """Create a model directory with random weights and a byte-level tokenizer; return its path.

    `shape` holds hf_config's keyword arguments (num_layers, hidden_size, ...).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    eos = write_tokenizer(path)
    raw = hf_config(model_type, eos_token_id=eos, **(shape or {}))
    model = MoEForCausalLM(ModelConfig.from_dict(raw))
    model.init_weights(seed=seed)
    save_checkpoint(model.to(dtype), path, fused=fused)
    return path


# Command-line flag -> hf_config argument, for every CLI that writes a random checkpoint.
SHAPE_FLAGS = {
    "layers": "num_layers",
    "hidden": "hidden_size",
    "heads": "num_heads",
    "kv-heads": "num_kv_heads",
    "experts": "num_experts",
    "expert-width": "expert_width",
    "top-k": "top_k",
    "vocab": "vocab_size",
}
SHAPE_HELP = {
    "layers": "decoder layers",
    "hidden": "hidden size",
    "heads": "attention heads",
    "kv-heads": "key/value heads (grouped-query attention)",
    "experts": "routed experts per MoE layer",
    "expert-width": "each expert's intermediate size",
    "top-k": "experts each token is routed to",
    "vocab": "vocabulary size",
}
DEMO_SHAPE = {
    "layers": 4,
    "hidden": 256,
    "heads": 8,
    "kv-heads": 4,
    "experts": 16,
    "expert-width": 256,
    "top-k": 2,
    "vocab": 320,
}


def add_shape_arguments(parser: argparse._ActionsContainer, defaults: dict[str, int]) -> None:
    """Add the --layers/--hidden/... flags with the given defaults."""
    for flag, default in defaults.items():
        parser.add_argument(f"--{flag}", type=int, default=default, help=SHAPE_HELP[flag])


def shape_from_args(args: argparse.Namespace) -> dict[str, int]:
    """The hf_config keyword arguments the shape flags name."""
    return {name: getattr(args, flag.replace("-", "_")) for flag, name in SHAPE_FLAGS.items()}


def main(argv: list[str] | None = None) -> None:
    parser = command_parser("moe-random-checkpoint", "Write a random-weight MoE checkpoint (Hugging Face layout).")
    parser.add_argument("output", type=Path, help="directory to write (created)")
    parser.add_argument("--arch", default="qwen3_moe", choices=SUPPORTED_MODEL_TYPES, help="architecture to write")
    add_shape_arguments(parser, DEMO_SHAPE)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of the tensors")
    parser.add_argument("--fused", action="store_true", help="write fused experts.gate_up_proj tensors")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    path = write_random_checkpoint(args.output, args.arch, args.seed, dtype, args.fused, shape_from_args(args))
    print(path)


if __name__ == "__main__":
    main()
