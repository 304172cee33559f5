"""Offline throughput against transformers, and decode step time against the memory-bandwidth floor.

`python -m engine.bench MODEL_DIR [--batch-sizes 1,8,32] [--prompt-len 64] [--output-len 128] [--no-hf]`
`python -m engine.bench --make-model DIR` first writes a random qwen3_moe checkpoint of the issue's shape.
`python -m engine.bench MODEL_DIR --breakdown [--enforce-eager]` splits a decode step into its parts instead
(engine/breakdown.py).
Prints markdown tables (paste into docs/performance.md); `--json PATH` also saves the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine import breakdown
from engine.allocator import run_again_with_tcmalloc
from engine.choices import BACKENDS
from engine.decoding import start_decoding
from engine.device import DTYPES, resolve_device
from engine.llm import LLM
from engine.model import MoEForCausalLM
from engine.moe import dispatch
from engine.random_checkpoint import add_shape_arguments, shape_from_args, write_random_checkpoint
from engine.routing import Routing
from engine.sampling_params import RequestOutputKind, SamplingParams

COPY_BYTES = 512 << 20
DELTA = RequestOutputKind.DELTA
BENCH_SHAPE = {
    "layers": 8,
    "hidden": 512,
    "heads": 8,
    "kv-heads": 4,
    "experts": 32,
    "expert-width": 512,
    "top-k": 4,
    "vocab": 4096,
}


def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock timers cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def make_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Equal-length random token-id prompts, identical for both engines."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator).tolist()


def _best_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The fastest of `repeats` timed calls of fn, after one untimed."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def memory_bandwidth(device: torch.device, repeats: int = 5) -> float:
    """Best-of-N copy bandwidth of a 512 MiB fp32 tensor, STREAM convention: bytes read + bytes written per second.

    A decode step streams weights in; a copy moves twice its size, so read+write is the rate memory sustains.
    """
    src = torch.ones(COPY_BYTES // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / _best_seconds(lambda: dst.copy_(src), device, repeats)


def read_bandwidth(device: torch.device, repeats: int = 5) -> float:
    """Best-of-N bytes per second of summing a 512 MiB fp32 tensor: reads alone, one vector add per 64 bytes.

    What the cores reach when they only read, as a decode step does. On this 2-core VM it drifts apart from the
    copy bandwidth either way (two threads' plain read loops read 28-34 GB/s while copies moved 35-42, this sum
    50-55 while copies moved 31-36; one thread reads a sixth to a third faster than it copies: docs/performance.md,
    stop 36), so engine.bench reports both.
    """
    src = torch.ones(COPY_BYTES // 4, dtype=torch.float32, device=device)
    return COPY_BYTES / _best_seconds(src.sum, device, repeats)


def ours_throughput(llm: LLM, prompts: list[list[int]], output_len: int, device: torch.device) -> float:
    """Output tokens/s of one whole `generate` call (prefill + decode), exactly output_len tokens per prompt."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    sync(device)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    sync(device)
    return len(prompts) * output_len / (time.perf_counter() - start)


def hf_throughput(model: Any, prompts: list[list[int]], output_len: int, device: torch.device) -> float:
    """transformers' batched greedy `generate`, forced to exactly output_len new tokens, in output tokens/s."""
    input_ids = torch.tensor(prompts, device=device)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            pad_token_id=0,
        )
    sync(device)
    return len(prompts) * output_len / (time.perf_counter() - start)


def load_hf(model_dir: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """transformers' own implementation of the checkpoint, with its loading noise silenced."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device=device).eval()  # type: ignore[call-arg]  # transformers' wrapped .to() confuses mypy


def expected_experts(num_experts: int, top_k: int, batch: int) -> float:
    """U(B) = E(1 - (1 - k/E)^B): distinct experts B tokens touch per layer under independent uniform routing."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def dense_bytes(model: MoEForCausalLM) -> int:
    """Weights every decode step reads in full: attention, norms, routers, shared/dense MLPs and the LM head."""
    experts = {id(p) for block in model.moe_blocks() for p in block.experts.parameters()}
    params = [*model.model.layers.parameters(), *model.model.norm.parameters(), model.lm_head.weight]
    return sum(p.numel() * p.element_size() for p in params if id(p) not in experts)


def expert_bytes(model: MoEForCausalLM) -> int:
    """One routed expert's gate, up and down projections: 3 * hidden * expert_width elements."""
    experts = model.moe_blocks()[0].experts
    return (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * experts.down_proj.element_size()


class DecodeRun:
    """B sequences brought to pure decode in an engine (every step adds one token to each, its outputs as the
    server asks for them), then timed steps in as many calls as the caller likes, with the measured union of routed
    experts per MoE layer of each step (from expert_load() differences taken between the timed steps)."""

    WARMUP = 2

    def __init__(self, llm: LLM, prompts: list[list[int]], steps: int, device: torch.device) -> None:
        self.engine, self.device = llm.engine, device
        params = SamplingParams(temperature=0, max_tokens=steps + self.WARMUP + 2, ignore_eos=True, output_kind=DELTA)
        self.ids = start_decoding(self.engine, "decode", prompts, [params] * len(prompts))
        self.seqs = [seq for request_id in self.ids for seq in self.engine.requests[request_id].seqs]
        for _ in range(self.WARMUP):
            self.engine.step()
        self.times: list[float] = []
        self.unions: list[float] = []

    def steps(self, count: int) -> float:
        """Run count timed decode steps (at most the `steps` given at the start, in all); their median seconds."""
        engine, moe_layers = self.engine, self.engine.model.config.moe_layers
        times = []
        for _ in range(count):
            before = engine.expert_load()
            sync(self.device)
            start = time.perf_counter()
            engine.step()
            sync(self.device)
            times.append(time.perf_counter() - start)
            self.unions.append(float(((engine.expert_load() - before)[moe_layers] > 0).sum(axis=1).mean()))
        self.times += times
        return statistics.median(times)

    def finish(self) -> dict[str, float]:
        """The median step over every timed step, the mean expert union, the mean attended tokens of all
        sequences; the requests aborted."""
        context = sum(s.num_tokens for s in self.seqs) - len(self.seqs) * len(self.times) / 2
        for request_id in self.ids:
            self.engine.abort_request(request_id)
        return {"step_s": statistics.median(self.times), "measured_experts": statistics.mean(self.unions),
                "context_tokens": context}  # fmt: skip


def decode_step(llm: LLM, prompts: list[list[int]], steps: int, device: torch.device) -> dict[str, float]:
    """Median seconds of a pure decode `engine.step()` over `steps` steps, and the measured expert union
    (DecodeRun)."""
    run = DecodeRun(llm, prompts, steps, device)
    run.steps(steps)
    return run.finish()


def expert_gemm_seconds(model: MoEForCausalLM, batch: int, repeats: int, device: torch.device) -> float:
    """Median seconds of the expert dispatch alone (grouped GEMMs and combine) over every MoE layer, for B tokens
    routed to random distinct top-k experts: the part of a decode step that torch's GEMM kernels bound."""
    config = model.config
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, config.hidden_size, generator=generator).to(device, model.lm_head.weight.dtype)
    blocks = model.moe_blocks()
    routings = [
        Routing(
            torch.stack(
                [torch.randperm(config.num_experts, generator=generator)[: config.top_k] for _ in range(batch)]
            ).to(device),
            torch.full((batch, config.top_k), 1.0 / config.top_k, device=device),
        )
        for _ in blocks
    ]
    with torch.inference_mode():
        for block, routing in zip(blocks, routings):
            dispatch(x, routing, block.experts, block.backend)
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            for block, routing in zip(blocks, routings):
                dispatch(x, routing, block.experts, block.backend)
            sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def floor_row(
    llm: LLM, batch: int, decode: dict[str, float], bandwidth: float, expert_gemms: bool = True
) -> dict[str, float]:
    """Bytes a decode step at this batch must read (measured expert union, dense weights, embedding rows,
    KV cache), and the time that takes at the measured bandwidth; with expert_gemms, also the expert dispatch
    timed alone."""
    model = llm.engine.model
    config = model.config
    element = model.lm_head.weight.element_size()
    kv = 2 * config.num_layers * config.num_kv_heads * config.head_dim * element * decode["context_tokens"]
    experts = len(model.moe_blocks()) * decode["measured_experts"] * expert_bytes(model)
    total = experts + dense_bytes(model) + batch * config.hidden_size * element + kv
    floor = total / bandwidth
    return {
        "batch": batch,
        "step_ms": 1e3 * decode["step_s"],
        "floor_ms": 1e3 * floor,
        "fraction_of_floor": floor / decode["step_s"],
        "expert_gemm_ms": 1e3 * expert_gemm_seconds(model, batch, 10, model.lm_head.weight.device)
        if expert_gemms
        else 0.0,
        "bytes": total,
        "kv_bytes": kv,
        "expected_experts": expected_experts(config.num_experts, config.top_k, batch),
        "measured_experts": decode["measured_experts"],
    }


def floor_beside_its_bandwidth(llm: LLM, batch: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """floor_row for this batch's decode steps, at the better of two copy bandwidths measured just before and just
    after them, and the step's fraction of the floor at the better of two read bandwidths (read_bandwidth) measured
    with them: this VM's memory bandwidth drifts by a third and more (one thread's copies measured 21.9 and, within
    the hour, 16-18 GB/s; two threads' 34 and, 90 minutes later, 53 GB/s), so a bandwidth measured minutes away,
    before the throughput rounds, put a floor under steps it was not measured beside."""
    before, read_before = memory_bandwidth(device), read_bandwidth(device)
    prompts = make_prompts(batch, args.prompt_len, llm.engine.model.config.vocab_size)
    decode = decode_step(llm, prompts, args.decode_steps, device)
    bandwidth = max(before, memory_bandwidth(device))
    read = max(read_before, read_bandwidth(device))
    row = floor_row(llm, batch, decode, bandwidth)
    return {
        **row,
        "copy_bandwidth_bytes_s": bandwidth,
        "read_bandwidth_bytes_s": read,
        "fraction_of_read_floor": row["bytes"] / read / decode["step_s"],
    }


def run(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """Every measurement. Both models stay loaded and each batch size alternates ours / transformers for
    --repeats rounds (best of each kept), so drift in this machine's speed cannot favour either side."""
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    longest = args.prompt_len + max(args.output_len, args.decode_steps + 4)
    llm = LLM(
        model_dir,
        dtype=args.dtype,
        device=str(device),
        max_model_len=longest,
        max_num_seqs=max(args.batch_sizes),
        moe_backend=args.moe_backend,
        enable_prefix_caching=False,  # repeated rounds reuse prompts: both sides must prefill every time
        enforce_eager=args.enforce_eager,
    )
    config = llm.engine.model.config
    hf_model = None if args.no_hf else load_hf(model_dir, dtype, device)
    warmup = make_prompts(1, 4, config.vocab_size)
    ours_throughput(llm, warmup, 2, device)
    if hf_model is not None:
        hf_throughput(hf_model, warmup, 2, device)
    throughput = []
    for batch in args.batch_sizes:
        prompts = make_prompts(batch, args.prompt_len, config.vocab_size)
        ours, hf = 0.0, 0.0
        for round_ in range(args.repeats):
            progress(f"batch {batch}, round {round_ + 1}/{args.repeats}")
            ours = max(ours, ours_throughput(llm, prompts, args.output_len, device))
            if hf_model is not None:
                hf = max(hf, hf_throughput(hf_model, prompts, args.output_len, device))
        throughput.append({"batch": batch, "ours_tok_s": ours, "hf_tok_s": hf if hf_model is not None else None})
    progress("decode steps against the memory floor")
    floors = [floor_beside_its_bandwidth(llm, b, args, device) for b in args.batch_sizes]
    shape = {
        k: getattr(config, k)
        for k in (
            "num_layers",
            "hidden_size",
            "num_experts",
            "moe_intermediate_size",
            "top_k",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_size",
        )
    }
    return {
        "model": str(model_dir),
        "device": str(device),
        "dtype": args.dtype,
        "mode": "eager" if args.enforce_eager else "compiled",
        "threads": args.threads,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "repeats": args.repeats,
        "shape": shape,
        "copy_bandwidth_bytes_s": max(row["copy_bandwidth_bytes_s"] for row in floors),
        "read_bandwidth_bytes_s": max(row["read_bandwidth_bytes_s"] for row in floors),
        "throughput": throughput,
        "decode": floors,
    }


def markdown(result: dict[str, Any]) -> str:
    """Header and two markdown tables: throughput side by side, decode step against its floor."""
    bw = result["copy_bandwidth_bytes_s"] / 1e9
    shape = ", ".join(f"{k} {v}" for k, v in result["shape"].items())
    lines = [
        f"model {result['model']}: {shape}",
        (
            f"device {result['device']}, dtype {result['dtype']}, {result['mode']}, threads {result['threads']}, "
            f"prompt {result['prompt_len']} tokens, output {result['output_len']} tokens, "
            f"best of {result['repeats']} alternating rounds"
        ),
        (
            f"memory-copy bandwidth (512 MiB, read + write), the best beside the decode steps: {bw:.1f} GB/s; "
            f"reads alone: {result['read_bandwidth_bytes_s'] / 1e9:.1f} GB/s"
        ),
        "",
        "| batch | ours tok/s | transformers tok/s | ours/transformers |",
        "|---:|---:|---:|---:|",
    ]
    for row in result["throughput"]:
        hf = row["hf_tok_s"]
        ratio = "-" if hf is None else f"{row['ours_tok_s'] / hf:.2f}x"
        lines.append(f"| {row['batch']} | {row['ours_tok_s']:.1f} | {'-' if hf is None else f'{hf:.1f}'} | {ratio} |")
    lines += [
        "",
        (
            "| batch | decode step ms | experts/layer U(B) formula | measured | MiB read | copy GB/s | floor ms "
            "| fraction of floor | read GB/s | of the read floor | expert GEMMs alone ms |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["decode"]:
        lines.append(
            f"| {row['batch']} | {row['step_ms']:.2f} | {row['expected_experts']:.1f} | "
            f"{row['measured_experts']:.1f} | {row['bytes'] / 2**20:.1f} | {row['copy_bandwidth_bytes_s'] / 1e9:.1f} | "
            f"{row['floor_ms']:.2f} | "
            f"{row['fraction_of_floor']:.0%} | {row['read_bandwidth_bytes_s'] / 1e9:.1f} | "
            f"{row['fraction_of_read_floor']:.0%} | {row['expert_gemm_ms']:.2f} |"
        )
    lines.append(
        "\nFloor: bytes of the measured expert union + dense weights + KV cache, at the better of the copy bandwidths "
        "measured just before and after that batch's steps; the read floor at the better of two read bandwidths "
        "(a sum over 512 MiB: reads alone, as a step's) measured with them. "
        "Expert GEMMs alone: the MoE dispatch of every layer for B randomly routed tokens, nothing else."
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Path]:
    """The options, and the model directory to benchmark (written first when --make-model is given)."""
    parser = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, metavar="MODEL_DIR", help="Hugging Face model directory")
    parser.add_argument("--make-model", type=Path, metavar="DIR", help="write a random qwen3_moe model here, use it")
    parser.add_argument("--batch-sizes", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds per batch size, best kept")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--moe-backend", default="auto", choices=BACKENDS)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--breakdown", action="store_true", help="time a decode step's parts instead")
    parser.add_argument("--enforce-eager", action="store_true", help="the eager forward, not the compiled one")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    shape = parser.add_argument_group("--make-model shape (default: the issue's realistic CPU shape)")
    add_shape_arguments(shape, BENCH_SHAPE)
    args = parser.parse_args(argv)
    if (args.model is None) == (args.make_model is None):
        parser.error("give either MODEL_DIR or --make-model DIR")
    if args.make_model is None:
        return args, args.model
    return args, write_random_checkpoint(args.make_model, "qwen3_moe", shape=shape_from_args(args))


def run_breakdown(args: argparse.Namespace, model_dir: Path) -> list[breakdown.Breakdown]:
    """The decode-step breakdown at every batch size, on one engine."""
    torch.set_num_threads(args.threads)
    llm = LLM(
        model_dir,
        dtype=args.dtype,
        device=args.device,
        max_model_len=None,
        max_num_seqs=max(args.batch_sizes),
        moe_backend=args.moe_backend,
        enable_prefix_caching=False,
        enforce_eager=args.enforce_eager,
    )
    llm.engine.warm_up(progress)
    vocab = llm.engine.model.config.vocab_size
    rows = []
    for batch in args.batch_sizes:
        progress(f"breakdown at batch {batch}")
        rows.append(breakdown.measure(llm.engine, make_prompts(batch, args.prompt_len, vocab)))
    return rows


def main(argv: list[str] | None = None) -> None:
    args, model_dir = parse_args(argv)
    if args.breakdown:
        rows = run_breakdown(args, model_dir)
        print(breakdown.markdown(rows))
        if args.json:
            args.json.write_text(json.dumps([vars(r) for r in rows], indent=2) + "\n")
        return
    result = run(args, model_dir)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    run_again_with_tcmalloc()  # measure what the server's engine process runs on
    main()
