"""Train one MoE model with a router balancing loss (simbal, lbl or none) and write a Hugging Face directory.

The trainer uses the engine's own model definition, so what it trains is exactly what the server runs. A run
is a pure function of its TrainConfig: batches depend only on (seed, step), the state is checkpointed
atomically every `checkpoint_every` steps, and rerunning the same command after a kill resumes from the last
checkpoint. On CPU the resumed run ends with exactly the weights of an uninterrupted one; on CUDA, kernels that
accumulate with atomics make it equal only up to float rounding.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from corpus.splits import DEFAULT_CORPUS_DIR
from corpus.tokens import eval_windows, split_tokens
from engine.attention import DenseCausal
from engine.checkpoint import save_checkpoint
from engine.config import ModelConfig
from engine.model import MoEForCausalLM
from engine.moe import SparseMoE
from engine.random_checkpoint import hf_config
from engine.routing import Routing
from engine.tokenizer import save_tokenizer_files
from training.data import train_batch
from training.evaluate import evaluate
from training.losses import lbl_loss, simbal_loss, z_loss

BALANCING_METHODS = ("simbal", "lbl", "none")  # the router-balancing losses a run trains with
DEFAULT_COEF = {"simbal": 0.1, "lbl": 0.01, "none": 0.0}
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (shape, data, optimization, balancing)."""

    method: str = "simbal"
    balance_coef: float | None = None  # None: the paper's (simbal 0.1, lbl 0.01)
    z_loss_coef: float = 1e-5
    layer_reduction: str = "mean"  # balancing loss over MoE layers: "mean" or "sum"
    lbl_scope: str = "sequence"  # LBL's f and P per "sequence" (then averaged) or over the whole "batch"
    lbl_prob: str = "softmax"  # LBL's P_i: mean of the full "softmax" (Switch, OLMoE) or of the sparse top-k "gates"
    router_init: str = "orthogonal"  # "orthogonal" (Saxe) or "normal" (std init_std)
    arch: str = "olmoe"
    layers: int = 4
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 8
    experts: int = 32
    expert_width: int = 64
    top_k: int = 4
    seq_len: int = 512
    batch_size: int = 8
    steps: int = 1000
    lr: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    init_std: float = 0.02
    embed_init_std: float = 1.0  # token embeddings start large so token identity, not a shared drift, routes
    seed: int = 0
    eval_every: int = 100
    eval_tokens: int = 65536
    pes_tokens: int = 1024
    checkpoint_every: int = 50
    log_every: int = 10
    autocast: str = "auto"  # "auto" (bf16 on CUDA, off on CPU where bf16 is slower), "bf16" or "off"
    save_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        checks = {
            "method": self.method in BALANCING_METHODS,
            "layer_reduction": self.layer_reduction in ("mean", "sum"),
            "lbl_scope": self.lbl_scope in ("sequence", "batch"),
            "router_init": self.router_init in ("orthogonal", "normal"),
            "autocast": self.autocast in ("auto", "bf16", "off"),
            "save_dtype": self.save_dtype in ("bfloat16", "float32"),
            "steps": self.steps > 0,
            "warmup_steps": 0 <= self.warmup_steps < self.steps,
            "top_k": 1 <= self.top_k <= self.experts,
            "min_lr_ratio": 0.0 <= self.min_lr_ratio <= 1.0,
            "pes_tokens": self.pes_tokens >= 1,
            "lbl_prob": self.lbl_prob in ("softmax", "gates"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid training settings: {', '.join(f'{b}={getattr(self, b)!r}' for b in bad)}")

    @property
    def coef(self) -> float:
        return DEFAULT_COEF[self.method] if self.balance_coef is None else self.balance_coef

    def lr_at(self, step: int) -> float:
        """Linear warmup from 10% of peak, then cosine decay to min_lr_ratio of peak (the paper's schedule)."""
        if step < self.warmup_steps:
            return self.lr * (0.1 + 0.9 * step / self.warmup_steps)
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def router_balancing(self) -> dict[str, Any]:
        """What config.json records about the balancing, for the engine, the server and pruning."""
        record: dict[str, Any] = {"method": self.method, "coef": self.coef, "z_loss_coef": self.z_loss_coef}
        if self.method != "none":
            record["layer_reduction"] = self.layer_reduction
        if self.method == "lbl":
            record["lbl_scope"] = self.lbl_scope
            record["lbl_prob"] = self.lbl_prob
        if self.method == "simbal":
            record["router_init"] = self.router_init
        return record


class _RouterCapture:
    """Routing observer that keeps each MoE layer's router logits and chosen experts for the balancing loss."""

    def __init__(self) -> None:
        self.records: list[tuple[SparseMoE, torch.Tensor, torch.Tensor]] = []

    def __call__(self, block: SparseMoE, x: torch.Tensor, logits: torch.Tensor, routing: Routing) -> None:
        self.records.append((block, logits, routing.expert_ids))


def balancing_loss(config: TrainConfig, capture: _RouterCapture) -> torch.Tensor:
    """The configured balancing loss (without its coefficient), reduced over the captured MoE layers."""
    losses = []
    for block, logits, expert_ids in capture.records:
        if config.method == "simbal":
            losses.append(simbal_loss(block.gate.weight))
        elif config.method == "lbl":
            rows = config.batch_size if config.lbl_scope == "sequence" else 1
            losses.append(
                lbl_loss(
                    config.lbl_prob,
                    logits.view(rows, -1, logits.shape[-1]),
                    expert_ids.view(rows, -1, expert_ids.shape[-1]),
                    logits.shape[-1],
                )
            )
    if not losses:
        return torch.zeros(())
    total = torch.stack(losses).sum()
    return total / len(losses) if config.layer_reduction == "mean" else total


def build_model(config: TrainConfig, vocab_size: int, eos_token_id: int) -> MoEForCausalLM:
    """A freshly initialized model of the configured shape (routers orthogonal if so configured)."""
    raw = hf_config(
        config.arch,
        vocab_size=vocab_size,
        hidden_size=config.hidden,
        num_layers=config.layers,
        num_heads=config.heads,
        num_kv_heads=config.kv_heads,
        num_experts=config.experts,
        top_k=config.top_k,
        expert_width=config.expert_width,
        max_position_embeddings=config.seq_len,
        eos_token_id=eos_token_id,
        router_balancing=config.router_balancing(),
    )
    raw["bos_token_id"] = eos_token_id
    model = MoEForCausalLM(ModelConfig.from_dict(raw))
    model.init_weights(std=config.init_std, seed=config.seed)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(config.embed_init_std / config.init_std)
    if config.router_init == "orthogonal":
        generator = torch.Generator().manual_seed(config.seed + 1)
        with torch.no_grad():
            for block in model.moe_blocks():
                torch.nn.init.orthogonal_(block.gate.weight, generator=generator)
    return model


def _optimizer(model: MoEForCausalLM, config: TrainConfig) -> torch.optim.AdamW:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


class Trainer:
    """One run into an output directory: the model directory, metrics.jsonl and (while running) trainer state."""

    def __init__(
        self,
        config: TrainConfig,
        out: Path,
        tokenizer_dir: Path,
        corpus_dir: Path = DEFAULT_CORPUS_DIR,
        device: str = "cpu",
    ) -> None:
        self.config, self.out, self.corpus_dir, self.device = config, out, corpus_dir, torch.device(device)
        file = tokenizer_dir / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer; train one with `moe-train tokenizer`")
        self.tokenizer = Tokenizer.from_file(str(file))

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        mode = self.config.autocast
        if mode == "bf16" or (mode == "auto" and self.device.type == "cuda"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _identity(self) -> dict[str, Any]:
        """What a resumed run must share with the killed one besides its settings: tokenizer and data."""
        manifest = self.corpus_dir / "manifest.json"
        return {
            "config": dataclasses.asdict(self.config),
            "tokenizer_sha256": hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest(),
            "corpus_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None,
        }

    def _resume(self, model: MoEForCausalLM, optimizer: torch.optim.Optimizer) -> tuple[int, float]:
        state_file = self.out / STATE_FILE
        if not state_file.is_file():
            (self.out / METRICS_FILE).unlink(missing_ok=True)
            return 0, 0.0
        state = torch.load(state_file, map_location=self.device, weights_only=True)
        saved, now = state["identity"], self._identity()
        differs: dict[str, object] = {
            k: (saved["config"].get(k), v) for k, v in now["config"].items() if saved["config"].get(k) != v
        }
        differs |= {k: "changed" for k in ("tokenizer_sha256", "corpus_manifest_sha256") if saved[k] != now[k]}
        if differs:
            raise ValueError(f"{state_file}: cannot resume with different settings or data (saved, now): {differs}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        # Drop what the killed run logged after its last checkpoint (those steps run again), including a line
        # the kill cut short.
        metrics = self.out / METRICS_FILE
        if metrics.is_file():
            kept = []
            for line in metrics.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", 0) <= step:
                    kept.append(line)
            tmp = metrics.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, metrics)
        return step, float(state["elapsed_s"])

    def _checkpoint(self, model: MoEForCausalLM, optimizer: torch.optim.Optimizer, step: int, elapsed: float) -> None:
        state = {
            "identity": self._identity(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "elapsed_s": elapsed,
        }
        tmp = self.out / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.out / STATE_FILE)

    def run(self, keep_state: bool = False) -> MoEForCausalLM:
        """Train (or resume) to config.steps, save the model directory, and return the trained model."""
        config = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        eos = save_tokenizer_files(self.tokenizer, self.out)
        torch.manual_seed(config.seed)
        model = build_model(config, self.tokenizer.get_vocab_size(), eos).to(self.device)
        optimizer = _optimizer(model, config)
        start, elapsed_before = self._resume(model, optimizer)
        session_start = time.perf_counter()

        def elapsed() -> float:
            return elapsed_before + time.perf_counter() - session_start

        train_tokens = split_tokens(self.tokenizer, "train", self.corpus_dir)
        val_windows = eval_windows(
            split_tokens(self.tokenizer, "validation", self.corpus_dir),
            config.seq_len,
            config.eval_tokens,
            "validation",
        )
        if start == 0:
            self._log({"step": 0, "config": dataclasses.asdict(config), "train_tokens": len(train_tokens)})
        capture = _RouterCapture()
        positions = torch.arange(config.seq_len, device=self.device).repeat(config.batch_size)
        meta = DenseCausal(config.batch_size, config.seq_len)
        bar = tqdm(total=config.steps, initial=start, desc=f"train {config.method}", unit="step", dynamic_ncols=True)
        window_start, window_tokens = time.perf_counter(), 0
        for step in range(start, config.steps):
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = train_batch(train_tokens, config.batch_size, config.seq_len, config.seed, step).to(self.device)
            inputs, targets = batch[:, :-1].reshape(-1), batch[:, 1:].reshape(-1)
            capture.records.clear()
            model.set_routing_observer(capture)
            try:
                with self._autocast():
                    logits = model.compute_logits(model(inputs, positions, meta))
            finally:
                model.set_routing_observer(None)
            ce = F.cross_entropy(logits, targets)
            z = z_loss(logits)
            balance = balancing_loss(config, capture)
            loss = ce + config.coef * balance + config.z_loss_coef * z
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            capture.records.clear()
            window_tokens += inputs.numel()
            done = step + 1
            bar.update(1)
            if done % config.log_every == 0 or done == config.steps:
                rate = window_tokens / (time.perf_counter() - window_start)
                window_start, window_tokens = time.perf_counter(), 0
                record = {
                    "step": done,
                    "tokens": done * inputs.numel(),
                    "loss": loss.item(),
                    "ce": ce.item(),
                    "balance": balance.item(),
                    "z": z.item(),
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": rate,
                    "elapsed_s": elapsed(),
                }
                self._log(record)
                bar.set_postfix(ce=f"{record['ce']:.3f}", bal=f"{record['balance']:.3g}", tok_s=f"{rate:.0f}")
            if done % config.eval_every == 0 or done == config.steps:
                result = evaluate(model, val_windows, config.batch_size, config.pes_tokens)
                self._log({"step": done, "tokens": done * inputs.numel(), "elapsed_s": elapsed(), "eval": result})
                bar.write(
                    f"step {done}: val loss {result['loss']:.4f} ppl {result['ppl']:.2f}  experts in use "
                    f"{result['experts_in_use']}  min PES {result['min_pes']:.4f}"
                )
            if (done % config.checkpoint_every == 0 and done < config.steps) or (done == config.steps and keep_state):
                self._checkpoint(model, optimizer, done, elapsed())
        bar.close()
        self.save(model, elapsed())
        if not keep_state:
            (self.out / STATE_FILE).unlink(missing_ok=True)
        return model

    def save(self, model: MoEForCausalLM, elapsed: float) -> None:
        """The Hugging Face model directory: config.json, model.safetensors, tokenizer files, train_config.json."""
        exported = copy.deepcopy(model).to("cpu", getattr(torch, self.config.save_dtype))
        save_checkpoint(exported, self.out)
        summary = {
            "config": dataclasses.asdict(self.config),
            "train_wall_s": elapsed,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
        }
        (self.out / "train_config.json").write_text(json.dumps(summary, indent=2) + "\n")
