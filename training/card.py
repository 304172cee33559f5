"""The model card (README.md) of a trained model directory, from its training record and test evaluation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from corpus.splits import DEFAULT_CORPUS_DIR
from training.trainer import TrainConfig


def train_command(model_dir: Path, config: dict[str, Any], threads: int) -> str:
    """The `moe-train train` command that reproduces a run: the settings that differ from the defaults."""
    defaults = dataclasses.asdict(TrainConfig())
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in config.items() if k != "method" and defaults.get(k) != v]
    return " ".join(["moe-train train", str(model_dir), "--method", config["method"], *flags, f"--threads {threads}"])


def _join(values: list[float], spec: str) -> str:
    return ", ".join(format(v, spec) for v in values)


def write_model_card(model_dir: Path, corpus_dir: Path = DEFAULT_CORPUS_DIR) -> None:
    """Write README.md: configuration, data, steps, wall time, and the test-split evaluation."""
    trained = json.loads((model_dir / "train_config.json").read_text())
    c = trained["config"]
    r = json.loads((model_dir / "eval_test.json").read_text())
    model = json.loads((model_dir / "config.json").read_text())
    manifest_file = corpus_dir / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {"sources": [], "splits": {}}
    sources = "\n".join(
        f"- {s['name']}: `{s.get('package', '')}` ({s.get('registry', '')}); {s.get('license', '')}"
        for s in manifest["sources"]
    )
    train_mb = manifest["splits"].get("train", {}).get("bytes", 0) / 1e6
    tokens = c["steps"] * c["batch_size"] * c["seq_len"]
    card = f"""# {model_dir.name}

A small Mixture-of-Experts language model trained by moe-serve's `moe-train` with the **{c["method"]}** router
balancing loss. It exists to be served, pruned and measured by this project; it is not a general-purpose model.

## Configuration
- Architecture: `{model["model_type"]}` layout, {c["layers"]} layers, hidden {c["hidden"]}, {c["heads"]} heads,
  {c["experts"]} routed experts per layer of width {c["expert_width"]}, top-{c["top_k"]}, no shared experts,
  vocabulary {model["vocab_size"]}, context {c["seq_len"]}; {r["parameters"]:,} parameters,
  {r["active_parameters_per_token"]:,} active per token.
- Balancing: `router_balancing` = `{json.dumps(model["router_balancing"])}`; router initialization {c["router_init"]}.
- Optimization: AdamW (betas 0.9/0.95, weight decay {c["weight_decay"]} on matrices), peak LR {c["lr"]},
  {c["warmup_steps"]} warmup steps from 10% of peak, cosine to {c["min_lr_ratio"]:.0%}, gradient clipping
  {c["grad_clip"]}, seed {c["seed"]}.
- Steps: {c["steps"]} x {c["batch_size"]} sequences x {c["seq_len"]} tokens = {tokens:,} training tokens;
  wall time {trained["train_wall_s"] / 60:.1f} min on {trained["device"]} with {trained["threads"]} torch thread(s).
  Weights saved in {c["save_dtype"]}.

## Data
moe-serve's corpus ({train_mb:.1f} MB of training text), split by document into train / validation / test
(`moe-train corpus`; see data/README.md):
{sources}

## Evaluation on the test split
- Perplexity: **{r["ppl"]:.2f}** ({r["tokens"]:,} tokens in windows of {r["seq_len"]}); {r["bits_per_byte"]:.3f} bits
  per byte.
- Unigram baseline (add-one smoothed, fit on the train split): perplexity {r["unigram_ppl"]:.1f}.
- Experts receiving tokens per layer: {r["experts_in_use"]}; load imbalance (max/mean): {_join(r["imbalance"], ".2f")}.
- Router orthogonality (mean squared deviation of W W^T from I): {_join(r["router_orthogonality"], ".2e")}.
- PES per layer: {_join(r["pes"], ".4f")}; min PES {r["min_pes"]:.4f}.
- Correlation over experts between load and the router logit of the mean layer input:
  {_join(r["load_vs_mean_input_logit"], "+.2f")} (near 1: load follows the input's mean direction, which
  carries {_join(r["mean_input_energy"], ".0%")} of the inputs' energy).

## Reproduce
```bash
moe-train corpus && moe-train tokenizer
{train_command(model_dir, c, trained["threads"])}
moe-train eval {model_dir} --split test --write-card
```

`metrics.jsonl` is the training log: one JSON object per logged step and per validation evaluation.
"""
    (model_dir / "README.md").write_text(card)
