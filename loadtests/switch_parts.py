"""What a live pruning switch that releases experts costs, in parts, on one engine without load.

`python -m loadtests.switch_parts [MODEL] [--fraction 0.25] [--repeats 7] [--threads 1] [--enforce-eager]`

With EngineConfig.live_pruning_releases_experts, switching to a plan frees the experts it removes and switching
back reads them from the checkpoint. This times both switches, the checkpoint row reads alone, and a batch-1
decode step, so "a switch costs the reload plus about one step" can be checked (loadtests.live_switch times
the same switches through the server under streaming load). The removed experts are a random --fraction of
each MoE layer's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from engine import RoutingPolicy, SamplingParams
from engine.checkpoint import read_expert_rows
from engine.llm_engine import EngineConfig, LLMEngine


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.switch_parts", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, nargs="?", default=Path("models/tiny-simbal"))
    parser.add_argument("--fraction", type=float, default=0.25, help="of each layer's experts, removed by the plan")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = EngineConfig(
        live_pruning=True, live_pruning_releases_experts=True, dtype=args.dtype, enforce_eager=args.enforce_eager
    )
    engine = LLMEngine(args.model, config)
    engine.warm_up()
    model_config = engine.model.config
    experts = model_config.num_experts
    generator = torch.Generator().manual_seed(0)
    removed = {
        layer: sorted(torch.randperm(experts, generator=generator)[: round(experts * args.fraction)].tolist())
        for layer in model_config.moe_layers
    }
    policies = {}
    for layer, ids in removed.items():
        kept = torch.ones(experts, dtype=torch.bool)
        kept[ids] = False
        policies[layer] = RoutingPolicy(kept_experts=kept)
    parts: dict[str, list[float]] = {"switch to the plan (frees)": [], "switch back (reads back)": [], "row reads": []}
    for repeat in range(args.repeats):
        start = time.perf_counter()
        engine.set_live_pruning(policies)
        parts["switch to the plan (frees)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        engine.set_live_pruning({})
        parts["switch back (reads back)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for layer, ids in removed.items():
            read_expert_rows(args.model, model_config, layer, ids, engine.dtype, engine.device)
        parts["row reads"].append(time.perf_counter() - start)
        print(f"[switch_parts] round {repeat + 1}/{args.repeats}", flush=True)
    engine.add_request("decode", "And the king said", SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    steps = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    parts["batch-1 step"] = steps[2:]  # past the prefill
    count = sum(map(len, removed.values()))
    print(f"\n{count} experts removed over {len(removed)} MoE layers, {args.repeats} repeats, {args.threads} thread(s)")
    print("| part | median ms | largest ms |\n|---|---:|---:|")
    for name, seconds in parts.items():
        print(f"| {name} | {statistics.median(seconds) * 1e3:.1f} | {max(seconds) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
