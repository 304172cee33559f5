"""What static pruning buys at serving time: resident weights, process memory and decode throughput per level.

`python -m pruning.bench MODEL [--levels 0,0.25,0.5] [--method random] [--batch-sizes 1,8,32,64] [--repeats 3]`

Each measurement loads the model in a fresh process with the level's routing policies, so the removed
experts' weights are released before anything else is allocated, and reports the weights' bytes, the
process's resident memory (after load; on CUDA the allocator's figures), and at each batch size the median
decode step, the experts a step touches per layer, and the step's memory floor (the bytes it must read at
the copy bandwidth measured in the same process). Levels alternate within each of --repeats rounds and the
medians are reported, so this machine's drift falls on every level alike. Static pruning leaves the work
per token unchanged (k experts), so it pays off once a batch's tokens touch most of the experts: the floor
ratio says how much it can buy, the step ratio how much it did.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
from pathlib import Path
from typing import Any

import torch

from engine.bench import decode_step, floor_row, make_prompts, memory_bandwidth, progress
from engine.checkpoint import load_model
from engine.device import resolve_device
from engine.llm import LLM


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def measure_level(model_dir: Path, level: float, method: str, args: dict[str, Any]) -> dict[str, Any]:
    """One level, measured in the calling process (run it in a fresh one)."""
    from pruning.cache import cached_plan
    from pruning.spec import PlanSpec

    torch.set_num_threads(args["threads"])
    device = resolve_device(args["device"])
    policies = {}
    if level > 0:
        model = load_model(model_dir, torch.float32, torch.device("cpu")).eval()
        policies = cached_plan(model_dir, model, PlanSpec(method, level), progress=False).routing_policies()
        del model
    rss_before = _resident_bytes()
    llm = LLM(
        model_dir,
        dtype=args["dtype"],
        device=args["device"],
        routing_policies=policies,
        max_num_seqs=max(args["batch_sizes"]),
        kv_cache_memory_bytes=args["kv_bytes"],
        enforce_eager=args["enforce_eager"],
    )
    row: dict[str, Any] = {
        "level": level,
        "method": method if level > 0 else "none",
        "kept_experts": min(int(b.present_experts().sum()) for b in llm.engine.model.moe_blocks()),
        "weight_bytes": llm.engine.weight_bytes,
        "released_expert_bytes": llm.engine.released_expert_bytes,
        "rss_load_delta_bytes": _resident_bytes() - rss_before,
    }
    if device.type == "cuda":
        row["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
    vocab = llm.engine.model.config.vocab_size
    bandwidth = memory_bandwidth(device)
    for batch in args["batch_sizes"]:
        decode = decode_step(llm, make_prompts(batch, args["prompt_len"], vocab, seed=batch), args["steps"], device)
        row[f"decode_step_ms_b{batch}"] = 1e3 * decode["step_s"]
        row[f"experts_touched_b{batch}"] = decode["measured_experts"]
        row[f"floor_ms_b{batch}"] = floor_row(llm, batch, decode, bandwidth, expert_gemms=False)["floor_ms"]
    return row


def median_rows(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every number over repeated measurements of one level."""
    merged = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = statistics.median(run[key] for run in runs)
    return merged


def markdown(rows: list[dict[str, Any]], batch_sizes: list[int]) -> str:
    """Memory per level, then per batch size: decode tok/s, its ratio to level 0, the floor's ratio, experts."""
    base = rows[0]
    head = ["level", "kept/layer", "weights MiB", "released MiB", "RSS at load MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{row['level']:g}", str(row["kept_experts"]), f"{row['weight_bytes'] / 2**20:.1f}"]
        cells += [f"{row['released_expert_bytes'] / 2**20:.1f}", f"{row['rss_load_delta_bytes'] / 2**20:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    head = ["level", *(f"b={b}: tok/s, vs 0, floor vs 0, experts" for b in batch_sizes)]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{row['level']:g}"]
        for b in batch_sizes:
            ms, floor, touched = row[f"decode_step_ms_b{b}"], row[f"floor_ms_b{b}"], row[f"experts_touched_b{b}"]
            speedup, floor_speedup = base[f"decode_step_ms_b{b}"] / ms, base[f"floor_ms_b{b}"] / floor
            cells.append(f"{1e3 * b / ms:.0f}, {speedup:.2f}x, {floor_speedup:.2f}x, {touched:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pruning.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--levels", default="0,0.25,0.5")
    parser.add_argument("--method", default="random", help="any moe-prune method (random: no quality concern here)")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per batch size (median)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-bytes", type=int, default=256 << 20, help="KV cache bytes on CPU")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the levels, medians reported")
    parser.add_argument("--enforce-eager", action="store_true", help="the eager forward, not the compiled one")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    settings = {
        "batch_sizes": [int(b) for b in args.batch_sizes.split(",")],
        "prompt_len": args.prompt_len,
        "steps": args.steps,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "kv_bytes": args.kv_bytes,
        "enforce_eager": args.enforce_eager,
    }
    levels = [float(x) for x in args.levels.split(",")]
    runs: dict[float, list[dict[str, Any]]] = {level: [] for level in levels}
    context = multiprocessing.get_context("spawn")
    for round_ in range(args.repeats):
        for level in levels:
            progress(f"round {round_ + 1}/{args.repeats}, level {level:g}")
            with context.Pool(1) as pool:
                runs[level].append(pool.apply(measure_level, (args.model, level, args.method, settings)))
                pool.close()  # the worker exits on its own (terminated, it leaked its semaphores)
                pool.join()
    rows = [median_rows(runs[level]) for level in levels]
    print(markdown(rows, settings["batch_sizes"]))
    if args.json:
        args.json.write_text(
            json.dumps({"model": str(args.model), "settings": settings, "rows": rows, "runs": runs}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
