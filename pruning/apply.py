"""Write a plan as a smaller Hugging Face checkpoint: removed experts' weights and router rows are gone and
config.json counts the survivors, so our engine and transformers both load it.

Only plans a Hugging Face config can express are written: the same number of experts kept in every MoE layer
(configs carry one num_experts), tokens of removed experts re-picking among survivors (no config field
redirects a router slot to another expert). Other plans run from the original checkpoint with
`moe-serve --prune-plan`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from engine.checkpoint import load_model, save_checkpoint
from engine.config import ModelConfig
from engine.model import MoEForCausalLM
from pruning.plan import PlanError, PruningPlan

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def check_expressible(plan: PruningPlan, moe_layers: list[int]) -> int:
    """The experts per layer of the pruned checkpoint; PlanError naming what a HF config cannot express."""
    if plan.redirect:
        raise PlanError(
            "a plan that redirects removed experts' slots cannot be written as a Hugging Face checkpoint (no config "
            "field maps a router slot to another expert); serve it with `moe-serve --prune-plan`"
        )
    counts = {len(plan.kept.get(layer, range(plan.num_experts))) for layer in moe_layers}
    if len(counts) != 1:
        raise PlanError(
            f"the plan keeps {sorted(counts)} experts in different layers, but a Hugging Face config has one "
            "num_experts for all layers; use a uniform budget, or serve it with `moe-serve --prune-plan`"
        )
    return counts.pop()


def apply_plan(model_dir: Path, plan: PruningPlan, out: Path) -> Path:
    """Write the pruned checkpoint to `out` (which must not exist); nothing is left there if anything fails."""
    plan.check_model(model_dir)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose a new output directory")
    config = ModelConfig.from_dir(model_dir)
    moe_layers = config.moe_layers
    kept_count = check_expressible(plan, moe_layers)
    dtype = getattr(torch, str(config.raw.get("torch_dtype") or config.raw.get("dtype") or "float32"))
    model = load_model(model_dir, dtype, torch.device("cpu"), config)
    raw = dict(config.raw)
    raw["num_local_experts" if "num_local_experts" in raw else "num_experts"] = kept_count
    raw["pruning"] = {
        "source_model": plan.model_name,
        "source_sha256": plan.model_sha256,
        "method": plan.method,
        "level": plan.level,
        "source_num_experts": plan.num_experts,
        "kept_experts": {str(layer): plan.kept.get(layer, list(range(plan.num_experts))) for layer in moe_layers},
    }
    pruned = _pruned_model(model, ModelConfig.from_dict(raw), plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_checkpoint(pruned, staging, fused=False)
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, staging / name)
        plan.save(staging / "pruning_plan.json")
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


@torch.no_grad()
def _pruned_model(model: MoEForCausalLM, config: ModelConfig, plan: PruningPlan) -> MoEForCausalLM:
    state = model.state_dict()
    for block in model.moe_blocks():
        kept = torch.tensor(plan.kept.get(block.layer_idx, list(range(plan.num_experts))))
        prefix = f"model.layers.{block.layer_idx}.mlp."
        for name in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):
            state[prefix + name] = state[prefix + name][kept]
    with torch.device("meta"):
        pruned = MoEForCausalLM(config)
    pruned.load_state_dict(state, assign=True)
    return pruned
