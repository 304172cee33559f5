"""What static pruning buys at serving time: resident weights, process memory and decode throughput per level.

`python -m pruning.bench MODEL [--levels 0,0.25,0.5] [--method random] [--batch-sizes 1,8,32,64] [--repeats 10]`

Each level's engine runs in a process of its own, loaded with the level's routing policies so the removed
experts' weights are released before anything else is allocated; it reports the weights' bytes and the
process's resident memory (after load; on CUDA the allocator's figures). Then, at each batch size, every level
decodes the same prompts, and the levels take turns: --repeats blocks of --steps decode steps each, in the order
A B C, C B A, ... . This machine's speed drifts 10-30% within minutes, and a level measured a minute after
another measured the drift (a level-per-process run in turn once showed a batch-1 ratio of 0.79x, where pruning
changes nothing); blocks of a few milliseconds each put every level in the same stretch. A level's ratio to
level 0 is the median of the per-block ratios. Also per level: the experts a step touches per layer, and the
step's memory floor (the bytes it must read, at the copy bandwidth measured once). Static pruning leaves the
work per token unchanged (k experts), so it pays off once a batch's tokens touch most of the experts: the floor
ratio says how much it can buy, the step ratio how much it did.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from engine.allocator import run_again_with_tcmalloc
from engine.bench import DecodeRun, floor_row, make_prompts, memory_bandwidth, progress
from engine.checkpoint import load_model
from engine.device import resolve_device
from engine.llm import LLM


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def load_level(model_dir: Path, level: float, method: str, args: dict[str, Any]) -> tuple[LLM, dict[str, Any]]:
    """The level's engine, loaded in the calling process, and what it holds; a pruned level's plan is read from
    the plan cache (make_plans)."""
    from pruning.cache import plan_file
    from pruning.plan import PruningPlan
    from pruning.spec import PlanSpec

    torch.set_num_threads(args["threads"])
    device = resolve_device(args["device"])
    policies = {}
    if level > 0:
        policies = PruningPlan.load(plan_file(model_dir, PlanSpec(method, level))).routing_policies()
    rss_before = _resident_bytes()
    llm = LLM(
        model_dir,
        dtype=args["dtype"],
        device=args["device"],
        routing_policies=policies,
        max_num_seqs=max(args["batch_sizes"]),
        kv_cache_memory_bytes=args["kv_bytes"],
        gpu_memory_utilization=args["gpu_memory_utilization"],
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
    return llm, row


class _Decoding:
    """One batch decoding in a level's engine (engine.bench.DecodeRun), and the bytes its step must read."""

    def __init__(self, llm: LLM, batch: int, args: dict[str, Any]) -> None:
        self.llm, self.batch = llm, batch
        prompts = make_prompts(batch, args["prompt_len"], llm.engine.model.config.vocab_size, seed=batch)
        self.run = DecodeRun(llm, prompts, args["repeats"] * args["steps"], llm.engine.device)

    def steps(self, count: int) -> float:
        return self.run.steps(count)

    def finish(self) -> dict[str, float]:
        """The batch's medians and the bytes its step must read; its requests aborted."""
        decode = self.run.finish()
        floor = floor_row(self.llm, self.batch, decode, 1.0, expert_gemms=False)
        return {"step_s": decode["step_s"], "experts": decode["measured_experts"], "bytes": floor["bytes"]}


def make_plans(model_dir: Path, levels: list[float], method: str) -> None:
    """Every pruned level's plan made, or found, in the plan cache by this process, so that a level's process reads
    its plan without loading the model: loaded and freed there, the model's memory stayed with the allocator, the
    engine reused it, and the level's resident memory at load read 67 MiB for 308 MiB of weights."""
    from pruning.cache import cached_plan
    from pruning.spec import PlanSpec

    pruned = [level for level in levels if level > 0]
    if pruned:
        model = load_model(model_dir, torch.float32, torch.device("cpu")).eval()
        for level in pruned:
            cached_plan(model_dir, model, PlanSpec(method, level), progress=False)


def serve_level(conn: Connection, model_dir: Path, level: float, method: str, args: dict[str, Any]) -> None:
    """A level's process: load, report, then run what the parent asks ("start" a batch, "steps" of it,
    "finish" it, "stop") until it stops."""
    llm, row = load_level(model_dir, level, method, args)
    conn.send(row)
    decoding: _Decoding | None = None
    while True:
        command, value = conn.recv()
        if command == "start":
            decoding = _Decoding(llm, value, args)
            conn.send(None)
        elif command == "steps" and decoding is not None:
            conn.send(decoding.steps(value))
        elif command == "finish" and decoding is not None:
            conn.send(decoding.finish())
            decoding = None
        else:
            conn.send(None)
            return


class LevelProcess:
    """The parent's handle on one level's process."""

    def __init__(self, context: Any, model_dir: Path, level: float, method: str, args: dict[str, Any]) -> None:
        self.level = level
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve_level, args=(child, model_dir, level, method, args))
        self.process.start()
        child.close()
        self.row: dict[str, Any] = self._answer()

    def ask(self, command: str, value: int = 0) -> Any:
        self.conn.send((command, value))
        return self._answer()

    def _answer(self) -> Any:
        try:
            return self.conn.recv()
        except EOFError:
            self.process.join()
            raise RuntimeError(
                f"level {self.level:g}: its process ended (exit code {self.process.exitcode}); its error is above"
            ) from None

    def stop(self) -> None:
        if self.process.is_alive():
            self.ask("stop")
        self.process.join()


def measure(model_dir: Path, levels: list[float], method: str, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Every level loaded in its own process, then each batch size decoded by all of them in alternating blocks
    (see the module docstring): one row per level."""
    make_plans(model_dir, levels, method)
    context = multiprocessing.get_context("spawn")
    processes: list[LevelProcess] = []
    try:
        for level in levels:
            progress(f"loading level {level:g}")
            processes.append(LevelProcess(context, model_dir, level, method, args))
        bandwidth = memory_bandwidth(resolve_device(args["device"]))
        rows = [dict(p.row) for p in processes]
        for batch in args["batch_sizes"]:
            progress(f"batch {batch}: {args['repeats']} blocks of {args['steps']} steps per level")
            for p in processes:
                p.ask("start", batch)
            blocks: list[list[float]] = [[] for _ in processes]
            for block in range(args["repeats"]):
                order = range(len(processes)) if block % 2 == 0 else reversed(range(len(processes)))
                for i in order:
                    blocks[i].append(processes[i].ask("steps", args["steps"]))
            for row, p, seconds in zip(rows, processes, blocks, strict=True):
                done = p.ask("finish")
                row[f"decode_step_ms_b{batch}"] = 1e3 * done["step_s"]
                row[f"speedup_b{batch}"] = statistics.median(a / b for a, b in zip(blocks[0], seconds, strict=True))
                row[f"experts_touched_b{batch}"] = done["experts"]
                row[f"floor_ms_b{batch}"] = 1e3 * done["bytes"] / bandwidth
        return rows
    finally:
        for p in processes:
            p.stop()


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
            floor_speedup = base[f"floor_ms_b{b}"] / floor
            cells.append(f"{1e3 * b / ms:.0f}, {row[f'speedup_b{b}']:.2f}x, {floor_speedup:.2f}x, {touched:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pruning.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--levels", default="0,0.25,0.5")
    parser.add_argument("--method", default="random", help="any moe-prune method (random: no quality concern here)")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="decode steps per block")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-bytes", type=int, default=256 << 20, help="KV cache bytes on CPU")
    parser.add_argument("--repeats", type=int, default=10, help="blocks of --steps per level and batch size")
    parser.add_argument("--enforce-eager", action="store_true", help="the eager forward, not the compiled one")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    levels = [float(x) for x in args.levels.split(",")]
    settings = {
        "batch_sizes": [int(b) for b in args.batch_sizes.split(",")],
        "prompt_len": args.prompt_len,
        "steps": args.steps,
        "repeats": args.repeats,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "kv_bytes": args.kv_bytes,
        "gpu_memory_utilization": 0.9 / len(levels),  # the levels' processes share one GPU
        "enforce_eager": args.enforce_eager,
    }
    rows = measure(args.model, levels, args.method, settings)
    print(markdown(rows, settings["batch_sizes"]))
    if args.json:
        args.json.write_text(
            json.dumps({"model": str(args.model), "settings": settings, "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    run_again_with_tcmalloc()  # measure what the server's engine process runs on
    main()
