"""Checkpoint loading: both tensor layouts, sharded files, router_balancing, and every bad-checkpoint error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, CheckpointError, SamplingParams
from engine.checkpoint import load_model
from tests.conftest import copy_checkpoint, edit_config

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


def prompt_logprobs(path: Path) -> list[float]:
    llm = LLM(path, dtype="float32", device="cpu", max_model_len=64)
    output = llm.generate([PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    return [entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], PROMPT[1:])]


def fuse_experts(path: Path) -> None:
    """Rewrite per-expert tensors under the fused names transformers 5 can write."""
    tensors = load_file(str(path / "model.safetensors"))
    fused: dict[str, torch.Tensor] = {}
    layers = {name.split(".experts.")[0] for name in tensors if ".experts." in name}
    for prefix in layers:
        count = len({n for n in tensors if n.startswith(f"{prefix}.experts.") and n.endswith("down_proj.weight")})
        gate_up = [
            torch.cat(
                [
                    tensors.pop(f"{prefix}.experts.{e}.gate_proj.weight"),
                    tensors.pop(f"{prefix}.experts.{e}.up_proj.weight"),
                ]
            )
            for e in range(count)
        ]
        down = [tensors.pop(f"{prefix}.experts.{e}.down_proj.weight") for e in range(count)]
        fused[f"{prefix}.experts.gate_up_proj"] = torch.stack(gate_up)
        fused[f"{prefix}.experts.down_proj"] = torch.stack(down)
    save_file({**tensors, **fused}, str(path / "model.safetensors"))


def rename_to_mixtral_hub(path: Path) -> None:
    """Rewrite a mixtral checkpoint with the hub's block_sparse_moe / w1 w2 w3 names."""
    tensors = load_file(str(path / "model.safetensors"))
    renames = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    out = {}
    for name, tensor in tensors.items():
        if ".mlp." in name:
            name = name.replace(".mlp.", ".block_sparse_moe.")
            for old, new in renames.items():
                name = name.replace(f".{old}.", f".{new}.")
        out[name] = tensor
    save_file(out, str(path / "model.safetensors"))


def test_fused_and_per_expert_layouts_load_identically(hf_checkpoint, tmp_path: Path) -> None:
    source = hf_checkpoint("qwen2_moe")
    fused = copy_checkpoint(source, tmp_path / "fused")
    fuse_experts(fused)
    assert any(name.endswith("experts.gate_up_proj") for name in load_file(str(fused / "model.safetensors")))
    assert prompt_logprobs(fused) == prompt_logprobs(source)


def test_mixtral_hub_names_load(hf_checkpoint, tmp_path: Path) -> None:
    source = hf_checkpoint("mixtral")
    hub = copy_checkpoint(source, tmp_path / "hub")
    rename_to_mixtral_hub(hub)
    assert any(".block_sparse_moe.experts.0.w1." in n for n in load_file(str(hub / "model.safetensors")))
    assert prompt_logprobs(hub) == prompt_logprobs(source)


def test_sharded_checkpoint_loads(tiny_model: Path, tmp_path: Path) -> None:
    sharded = copy_checkpoint(tiny_model, tmp_path / "sharded")
    tensors = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(sharded / file))
    weight_map = {n: file for file, shard_names in shards.items() for n in shard_names}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert prompt_logprobs(sharded) == prompt_logprobs(tiny_model)


def test_router_balancing_is_exposed(tiny_model: Path, tmp_path: Path) -> None:
    unknown = load_model(tiny_model, torch.float32, torch.device("cpu"))
    assert unknown.router_balancing is None
    simbal = copy_checkpoint(tiny_model, tmp_path / "simbal")
    edit_config(simbal, router_balancing={"method": "simbal", "coef": 0.1})
    model = load_model(simbal, torch.float32, torch.device("cpu"))
    assert model.router_balancing == {"method": "simbal", "coef": 0.1}
    assert model.config.router_balancing is not None and model.config.router_balancing.method == "simbal"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path / "model.safetensors"))


def break_missing_dir(path: Path) -> None:
    for file in path.iterdir():
        file.unlink()
    path.rmdir()


def break_missing_config(path: Path) -> None:
    (path / "config.json").unlink()


def break_bad_json(path: Path) -> None:
    (path / "config.json").write_text("{not json")


def break_model_type(path: Path) -> None:
    edit_config(path, model_type="llama")


def break_missing_key(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    del config["hidden_size"]
    (path / "config.json").write_text(json.dumps(config))


def break_missing_tensor(path: Path) -> None:
    tensors = _tensors(path)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    _save(path, tensors)


def break_unexpected_tensor(path: Path) -> None:
    _save(path, {**_tensors(path), "model.layers.0.mlp.surprise.weight": torch.zeros(2)})


def break_extra_expert(path: Path) -> None:
    _save(path, {**_tensors(path), "model.layers.0.mlp.experts.99.down_proj.weight": torch.zeros(64, 32)})


def break_shape(path: Path) -> None:
    tensors = _tensors(path)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 63)
    _save(path, tensors)


def break_safetensors(path: Path) -> None:
    (path / "model.safetensors").write_bytes(b"\x00garbage" * 10)


def break_no_weights(path: Path) -> None:
    (path / "model.safetensors").unlink()


def break_tokenizer(path: Path) -> None:
    (path / "tokenizer.json").unlink()


def break_tokenizer_json(path: Path) -> None:
    (path / "tokenizer.json").write_text("{}")


def break_index(path: Path) -> None:
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-2.safetensors"}}))


def break_index_escape(path: Path) -> None:
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../model.safetensors"}}))


def break_index_types(path: Path) -> None:
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))


def break_integer_weights(path: Path) -> None:
    tensors = _tensors(path)
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int64)
    _save(path, tensors)


def break_nan_lm_head(path: Path) -> None:
    tensors = _tensors(path)
    tensors["lm_head.weight"] = torch.full_like(tensors["lm_head.weight"], float("nan"))
    _save(path, tensors)


def break_inf_expert(path: Path) -> None:
    tensors = _tensors(path)
    tensors["model.layers.2.mlp.experts.1.down_proj.weight"][0, 0] = float("inf")
    _save(path, tensors)


BAD_CHECKPOINTS = [
    (break_missing_dir, r"model directory does not exist"),
    (break_missing_config, r"config\.json: config\.json is missing"),
    (break_bad_json, r"config\.json: not valid JSON"),
    (break_model_type, r"unsupported model_type 'llama'"),
    (break_missing_key, r"required key 'hidden_size' is missing"),
    (break_missing_tensor, r"model\.safetensors: tensor model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight is missing"),
    (break_unexpected_tensor, r"model\.safetensors: unexpected tensor model\.layers\.0\.mlp\.surprise\.weight"),
    (break_extra_expert, r"unexpected tensor model\.layers\.0\.mlp\.experts\.99\.down_proj\.weight: expert 99"),
    (break_shape, r"tensor model\.layers\.0\.self_attn\.q_proj\.weight has shape \[64, 63\], expected \[64, 64\]"),
    (break_safetensors, r"model\.safetensors: unreadable safetensors file"),
    (break_no_weights, r"no model\.safetensors or model\.safetensors\.index\.json"),
    (break_tokenizer, r"tokenizer\.json: tokenizer\.json is missing"),
    (break_tokenizer_json, r"tokenizer\.json: unreadable tokenizer"),
    (break_index, r"index\.json: lists shard model-2\.safetensors, which does not exist"),
    (break_index_escape, r"index\.json: tensor x maps to '\.\./model\.safetensors'; expected a file name in"),
    (break_index_types, r"index\.json: 'weight_map' must be a non-empty object"),
    (break_integer_weights, r"tensor model\.norm\.weight has dtype I64, expected a floating-point dtype"),
    (break_nan_lm_head, r"model\.safetensors: tensor lm_head\.weight holds \d+ NaN or infinite values"),
    (break_inf_expert, r"tensor model\.layers\.2\.mlp\.experts\.1\.down_proj\.weight holds 1 NaN or infinite"),
]


@pytest.mark.parametrize("corrupt, message", BAD_CHECKPOINTS, ids=[c.__name__ for c, _ in BAD_CHECKPOINTS])
def test_bad_checkpoint_gives_clear_error(tiny_model: Path, tmp_path: Path, corrupt, message: str) -> None:
    broken = copy_checkpoint(tiny_model, tmp_path / "broken")
    corrupt(broken)
    with pytest.raises(CheckpointError, match=message):
        LLM(broken, dtype="float32", device="cpu", max_model_len=64)
