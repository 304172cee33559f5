"""Serving overhead: output tokens/s through HTTP against the offline engine, same model and prompts, same run.

`python -m server.bench [--model DIR] [--concurrency 1,8,32] [--waves 4] [--output-len 128] [--threads 1]`

For each concurrency c, the offline baseline keeps c requests in flight in an LLMEngine in this process (a new
one as each finishes); the served run starts `moe-serve` as a separate process with the same engine settings
and drives it with c streaming httpx clients, each sending its next request as soon as the last one ends. Both
count generated tokens over wall time. Prompts are the opening tokens of test-split documents; generation
is greedy with ignore_eos, so both sides generate exactly the same tokens. Each level sends `--waves` x c
requests (at least 32). Offline and served runs alternate `--repeats` times; the ratio is taken within each
adjacent pair (this machine's speed drifts between minutes) and its median reported with its range. Prints a
markdown table (paste into docs/performance.md); `--json PATH` saves the raw numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from corpus.splits import read_split
from engine.allocator import run_again_with_tcmalloc
from engine.config import DEFAULT_MODEL_DIR
from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from engine.tokenizer import ModelTokenizer
from server.launch import launched


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def make_prompts(model: Path, count: int, length: int) -> list[list[int]]:
    """The first `length` tokens of `count` test-split documents (cycled if the split is short)."""
    tokenizer = ModelTokenizer(model)
    documents = [d for d in read_split("test") if len(d) > 8 * length]
    return [tokenizer.encode(documents[i % len(documents)])[:length] for i in range(count)]


def offline_run(engine: LLMEngine, prompts: list[list[int]], concurrency: int, output_len: int) -> dict[str, float]:
    """Closed loop in the engine itself: `concurrency` requests in flight until all prompts are done."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    pending = list(enumerate(prompts))
    in_flight, tokens = 0, 0
    start = time.perf_counter()
    while pending or in_flight:
        while pending and in_flight < concurrency:
            index, prompt = pending.pop(0)
            engine.add_request(f"offline-{concurrency}-{index}", prompt, params)
            in_flight += 1
        for output in engine.step():
            if output.finished:
                in_flight -= 1
                tokens += len(output.outputs[0].token_ids)
    elapsed = time.perf_counter() - start
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


async def served_run(url: str, prompts: list[list[int]], concurrency: int, output_len: int) -> dict[str, float]:
    """`concurrency` streaming clients, each sending its next request when its last one finishes."""
    queue = list(prompts)
    ttfts: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            prompt = queue.pop()
            body = {
                "prompt": prompt,
                "max_tokens": output_len,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            sent = time.perf_counter()
            first = True
            async with http.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if first and line.startswith("data: "):
                        ttfts.append(time.perf_counter() - sent)
                        first = False
                    if line.startswith('data: {"') and '"usage":{' in line:
                        tokens += json.loads(line[6:])["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {
        "tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "ttft_median_s": statistics.median(ttfts),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--waves", type=int, default=4, help="requests per level = waves x clients (at least 32)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both engines")
    parser.add_argument("--repeats", type=int, default=5, help="alternating offline / served runs per level")
    parser.add_argument("--json", type=Path, help="also save the raw numbers here")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    torch.set_num_threads(args.threads)
    per_level = {c: max(32, args.waves * c) for c in levels}
    prompts = make_prompts(args.model, max(per_level.values()), args.prompt_len)
    engine = LLMEngine(args.model, EngineConfig(max_num_seqs=max(levels)))
    offline_run(engine, prompts[:4], 4, 8)  # warm-up
    rows: list[dict[str, Any]] = []
    serve_args = ["--model", str(args.model), "--threads", str(args.threads), "--max-num-seqs", str(max(levels))]
    with launched([*serve_args, "--log-level", "warning"]) as server:
        url = server.url
        asyncio.run(served_run(url, prompts[:4], 4, 8))  # warm-up
        for c in levels:
            batch = prompts[: per_level[c]]
            offline, served = [], []
            for repeat in range(args.repeats):
                progress(f"concurrency {c}: offline run {repeat + 1}/{args.repeats}")
                offline.append(offline_run(engine, batch, c, args.output_len))
                progress(f"concurrency {c}: served run {repeat + 1}/{args.repeats}")
                served.append(asyncio.run(served_run(url, batch, c, args.output_len)))
            ratios = sorted(srv["tokens_per_s"] / off["tokens_per_s"] for off, srv in zip(offline, served))
            assert all(off["tokens"] == srv["tokens"] for off, srv in zip(offline, served)), "same tokens both sides"
            rows.append({"concurrency": c, "requests": len(batch), "offline": offline, "served": served,
                         "ratios": ratios})  # fmt: skip
    print(f"\nmodel {args.model.name}, {len(prompts[0])}-token prompts, {args.output_len} output tokens, "
          f"torch threads {args.threads}, {os.cpu_count()} CPUs, {args.repeats} alternating pairs per level\n")  # fmt: skip
    print(
        "| clients | requests | offline tok/s (median) | HTTP tok/s (median) | HTTP / offline, median of pairs | range "
        "| HTTP TTFT median |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        off = statistics.median(r["tokens_per_s"] for r in row["offline"])
        srv = statistics.median(r["tokens_per_s"] for r in row["served"])
        ratios = row["ratios"]
        ttft = statistics.median(r["ttft_median_s"] for r in row["served"])
        print(f"| {row['concurrency']} | {row['requests']} | {off:.0f} | {srv:.0f} | "
              f"{statistics.median(ratios):.1%} | {ratios[0]:.0%}-{ratios[-1]:.0%} | {ttft * 1000:.0f} ms |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    run_again_with_tcmalloc()  # measure what the server's engine process runs on
    sys.exit(main())
