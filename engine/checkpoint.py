"""Read and write Hugging Face MoE checkpoints (config.json + safetensors), validating everything first.

Loading maps every tensor name onto a model parameter and checks shapes and coverage from the safetensors
headers alone, before any weight is allocated: a bad checkpoint raises CheckpointError naming the file and
tensor, and leaves nothing half-loaded. Both per-expert hub names (experts.N.w1/w2/w3 or
experts.N.gate_proj/up_proj/down_proj) and fused transformers-5 names (experts.gate_up_proj,
experts.down_proj) are accepted, after the architecture's tensor renames (engine.architectures: mixtral's hub
`block_sparse_moe`).
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.architectures import ARCHITECTURES
from engine.config import CheckpointError, ModelConfig
from engine.expert_parallel import ExpertShard
from engine.model import MoEForCausalLM

_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_PART = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class _TensorHeader:
    """What a safetensors header says of one tensor."""

    file: Path
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class _Assignment:
    """Where one checkpoint tensor goes: a parameter, optionally one expert's row block of it."""

    param: str
    expert: int | None
    part: str  # "all", "gate", "up" or "down"


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory, from the index when sharded."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: expected a JSON object with a 'weight_map' ({exc!r})") from exc
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> file name")
        files = set()
        for name, shard in weight_map.items():
            file = (path / shard).resolve() if isinstance(shard, str) else None
            if file is None or file.parent != path.resolve():
                raise CheckpointError(f"{index}: tensor {name} maps to {shard!r}; expected a file name in {path}")
            if not file.is_file():
                raise CheckpointError(f"{index}: lists shard {shard}, which does not exist")
            files.add(file)
        return sorted(files)
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json found")


def _read_headers(files: list[Path]) -> dict[str, _TensorHeader]:
    tensors: dict[str, _TensorHeader] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                    if name in tensors:
                        raise CheckpointError(f"{file}: tensor {name} also appears in {tensors[name].file.name}")
                    header = handle.get_slice(name)
                    tensors[name] = _TensorHeader(file, tuple(header.get_shape()), header.get_dtype())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: unreadable safetensors file ({exc})") from exc
    return tensors


def _assign(name: str) -> _Assignment:
    """`name` is the model's name for the tensor (after the architecture's renames)."""
    match = _PER_EXPERT.match(name)
    if match:
        prefix, expert, kind = match.groups()
        part = _PART[kind]
        target = f"{prefix}.down_proj" if part == "down" else f"{prefix}.gate_up_proj"
        return _Assignment(target, int(expert), part)
    return _Assignment(name, None, "all")


def _expected_piece_shape(assignment: _Assignment, param_shape: tuple[int, ...]) -> tuple[int, ...]:
    if assignment.expert is None:
        return param_shape
    if assignment.part == "down":
        return param_shape[1:]
    return (param_shape[1] // 2, param_shape[2])


def _plan(
    config: ModelConfig, tensors: dict[str, _TensorHeader], expected: dict[str, tuple[int, ...]]
) -> dict[str, _Assignment]:
    plan: dict[str, _Assignment] = {}
    covered: dict[str, set[tuple[int | None, str]]] = {}
    spec = ARCHITECTURES[config.model_type]
    for name, header in sorted(tensors.items()):
        file, shape = header.file, header.shape
        if _IGNORED.search(name):
            continue
        assignment = _assign(spec.model_tensor_name(name))
        if config.tie_word_embeddings and assignment.param == "lm_head.weight":
            continue
        if assignment.param not in expected:
            raise CheckpointError(
                f"{file}: unexpected tensor {name} (no such parameter in a {config.model_type} model)"
            )
        param_shape = expected[assignment.param]
        if assignment.expert is not None and assignment.expert >= param_shape[0]:
            raise CheckpointError(
                f"{file}: unexpected tensor {name}: expert {assignment.expert} but num_experts is {param_shape[0]}"
            )
        if header.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has dtype {header.dtype}, expected a floating-point dtype")
        want = _expected_piece_shape(assignment, param_shape)
        if shape != want:
            raise CheckpointError(f"{file}: tensor {name} has shape {list(shape)}, expected {list(want)}")
        pieces = covered.setdefault(assignment.param, set())
        key = (assignment.expert, assignment.part)
        if key in pieces or (None, "all") in pieces or (assignment.part == "all" and pieces):
            raise CheckpointError(f"{file}: tensor {name} duplicates weights already given for {assignment.param}")
        pieces.add(key)
        plan[name] = assignment
    for param, shape in expected.items():
        if config.tie_word_embeddings and param == "lm_head.weight":
            continue
        pieces = covered.get(param, set())
        if (None, "all") in pieces or _stacked_complete(param, shape, pieces):
            continue
        files = ", ".join(sorted({header.file.name for header in tensors.values()})) or "the checkpoint"
        raise CheckpointError(f"{files}: tensor {_missing_name(param, shape, pieces)} is missing")
    return plan


def _stacked_complete(param: str, shape: tuple[int, ...], pieces: set[tuple[int | None, str]]) -> bool:
    parts = ("down",) if param.endswith("experts.down_proj") else ("gate", "up")
    return param.endswith(("experts.down_proj", "experts.gate_up_proj")) and all(
        (e, p) in pieces for e in range(shape[0]) for p in parts
    )


def _missing_name(param: str, shape: tuple[int, ...], pieces: set[tuple[int | None, str]]) -> str:
    if not pieces or not param.endswith(("experts.down_proj", "experts.gate_up_proj")):
        return param
    prefix = param.rsplit(".", 1)[0]
    parts = ("down",) if param.endswith("down_proj") else ("gate", "up")
    expert, part = next((e, p) for e in range(shape[0]) for p in parts if (e, p) not in pieces)
    return f"{prefix}.{expert}.{part}_proj.weight"


def load_model(
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    config: ModelConfig | None = None,
    expert_shard: ExpertShard | None = None,
) -> MoEForCausalLM:
    """Build the model of a checkpoint directory on `device` in `dtype`; CheckpointError on any defect, NaN and
    infinite weights included (checked as each tensor is read).

    `config` skips re-reading config.json when the caller has already parsed it. With `expert_shard` the model
    is this rank's shard under expert parallelism (engine/expert_parallel.py): only the experts the placement
    gives this rank are allocated and read; the checkpoint is still validated whole.
    """
    path = Path(path)
    config = config or ModelConfig.from_dir(path)
    tensors = _read_headers(weight_files(path))
    with torch.device("meta"):
        meta_model = MoEForCausalLM(config)
    expected = {name: tuple(p.shape) for name, p in meta_model.named_parameters()}
    if config.tie_word_embeddings:
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    plan = _plan(config, tensors, expected)
    if expert_shard is not None:
        expert_shard.check(config)
        for block in meta_model.moe_blocks():  # shapes only: nothing is allocated yet
            block.release_experts(expert_shard.owners(block.layer_idx) == expert_shard.rank)

    model = meta_model.to(dtype).to_empty(device=device)
    model.expert_load.reset()
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    defect = None
    try:
        _read_weights(model, plan, tensors)
    except CheckpointError as error:
        if expert_shard is None:
            raise
        defect = error
    if expert_shard is not None:
        expert_shard.raise_if_any_rank_failed(defect, device)
        for block in model.moe_blocks():
            block.join_expert_parallel(
                expert_shard.owners(block.layer_idx), expert_shard.rank, expert_shard.process_group
            )
    return model


@torch.no_grad()
def _read_weights(model: MoEForCausalLM, plan: dict[str, _Assignment], tensors: dict[str, _TensorHeader]) -> None:
    """Copy every planned tensor into its parameter (only the held experts' rows of a shard's blocks)."""
    params = dict(model.named_parameters())
    held = _held_experts(model)
    by_file: dict[Path, list[str]] = {}
    for name in plan:
        by_file.setdefault(tensors[name].file, []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in names:
                assignment = plan[name]
                rows = held.get(assignment.param)
                if rows is not None and assignment.expert is not None:
                    if assignment.expert not in rows:
                        continue  # another rank's expert
                    assignment = replace(assignment, expert=rows.index(assignment.expert))
                tensor = handle.get_tensor(name)
                if not bool(torch.isfinite(tensor).all()):
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise CheckpointError(
                        f"{file}: tensor {name} holds {bad} NaN or infinite values of {tensor.numel()}; "
                        "refusing to serve it"
                    )
                if rows is not None and assignment.expert is None:
                    tensor = tensor[rows]  # fused experts: this rank's rows
                _copy_into(params[assignment.param], assignment, tensor)


def _held_experts(model: MoEForCausalLM) -> dict[str, list[int]]:
    """Stacked expert parameter name -> the expert ids its rows hold, for blocks holding only some."""
    held = {}
    for block in model.moe_blocks():
        if block.held_experts is not None:
            prefix = f"model.layers.{block.layer_idx}.mlp.experts"
            for name in ("gate_up_proj", "down_proj"):
                held[f"{prefix}.{name}"] = block.held_experts.tolist()
    return held


def _copy_into(param: torch.Tensor, assignment: _Assignment, tensor: torch.Tensor) -> None:
    if assignment.expert is None:
        param.copy_(tensor)
        return
    target = param[assignment.expert]
    if assignment.part != "down":
        half = target.shape[0] // 2
        target = target[:half] if assignment.part == "gate" else target[half:]
    target.copy_(tensor)


def checkpoint_state_dict(model: MoEForCausalLM, fused: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights under checkpoint names: per-expert hub names, or fused transformers-5 names."""
    names: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if fused or not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            names[name] = tensor
            continue
        prefix = name.rsplit(".", 1)[0]
        for expert, weight in enumerate(tensor):
            if name.endswith("down_proj"):
                names[f"{prefix}.{expert}.down_proj.weight"] = weight
            else:
                gate, up = weight.chunk(2, dim=0)
                names[f"{prefix}.{expert}.gate_proj.weight"] = gate
                names[f"{prefix}.{expert}.up_proj.weight"] = up
    return {name: tensor.detach().contiguous().cpu() for name, tensor in names.items()}


def save_checkpoint(model: MoEForCausalLM, path: str | Path, fused: bool = False) -> None:
    """Write config.json and model.safetensors (tokenizer files are the caller's)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_state_dict(model, fused)
    dtype = next(iter(tensors.values())).dtype
    raw = dict(model.config.raw)
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def read_expert_rows(
    path: str | Path, config: ModelConfig, layer: int, experts: list[int], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Some experts' weights of one MoE layer, read again from the checkpoint (safetensors maps the file, so
    only those rows are read): gate+up [n, 2I, H] and down [n, H, I] in `experts` order. What live pruning
    reloads after releasing them; CheckpointError if the files changed or those rows hold NaN."""
    path = Path(path)
    spec = ARCHITECTURES[config.model_type]
    prefix = f"model.layers.{layer}.mlp.experts"
    width, hidden = config.moe_intermediate_size, config.hidden_size
    stacked = {
        f"{prefix}.gate_up_proj": torch.empty(len(experts), 2 * width, hidden, dtype=dtype, device=device),
        f"{prefix}.down_proj": torch.empty(len(experts), hidden, width, dtype=dtype, device=device),
    }
    position = {expert: i for i, expert in enumerate(experts)}
    filled: dict[int, set[str]] = {expert: set() for expert in experts}
    handles: dict[Path, Any] = {}
    with ExitStack() as opened:
        for name, header in _read_headers(weight_files(path)).items():
            assignment = _assign(spec.model_tensor_name(name))
            target = stacked.get(assignment.param)
            if target is None or (assignment.expert is not None and assignment.expert not in position):
                continue
            handle = handles.get(header.file)
            if handle is None:  # each file opened once per call (an open costs ~0.35 ms; a tensor read far less)
                handle = handles[header.file] = opened.enter_context(safe_open(str(header.file), "pt", device="cpu"))
            if assignment.expert is None:  # fused [E, ...]: only the wanted rows are read
                rows, want = handle.get_slice(name)[experts], tuple(target.shape)
            else:
                rows, want = handle.get_tensor(name), _expected_piece_shape(assignment, tuple(target.shape))
            if tuple(rows.shape) != want:
                raise CheckpointError(
                    f"{header.file}: tensor {name} has shape {list(rows.shape)}, expected {list(want)}"
                )
            if not bool(torch.isfinite(rows).all()):
                raise CheckpointError(
                    f"{header.file}: tensor {name} holds NaN or infinite values; refusing to reload it"
                )
            if assignment.expert is None:
                target.copy_(rows)
                parts = {"down"} if assignment.param.endswith("down_proj") else {"gate", "up"}
                for expert in experts:
                    filled[expert] |= parts
            else:
                _copy_into(target, replace(assignment, expert=position[assignment.expert]), rows)
                filled[assignment.expert].add(assignment.part)
    missing = [expert for expert, parts in filled.items() if parts != {"gate", "up", "down"}]
    if missing:
        raise CheckpointError(
            f"{path}: the weights of layer {layer}'s experts {missing} are no longer in the checkpoint"
        )
    return stacked[f"{prefix}.gate_up_proj"], stacked[f"{prefix}.down_proj"]
