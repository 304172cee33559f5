"""Decode step time of this checkout against another, side by side: each side runs in a fresh process with its
own checkout first on the import path, the sides alternate over --rounds (A B, B A, ...), and the median of the
per-round ratios is printed (this VM drifts 10-30% within minutes; alternating puts the drift on both sides).

`python -m engine.step_ab OTHER_CHECKOUT [--this CHECKOUT] [--model models/tiny-simbal] [--dtype bfloat16]`
`[--batch-sizes 1,8,32] [--rounds 3] [--threads 2] [--enforce-eager] [--this-config K=V] [--other-config K=V]`
`[--this-env NAME=VALUE] [--other-env NAME=VALUE]`
(--this defaults to this checkout; the config options set EngineConfig fields of one side, a JSON value each,
so `python -m engine.step_ab . --this-config live_pruning=true` times one checkout with and without a setting;
the env options set an environment variable for one side's process, e.g. `--other-env MOE_SERVE_NATIVE_OPS=0`)

OTHER_CHECKOUT is typically an earlier commit's worktree (`git worktree add /tmp/base REF`). The measuring code
uses only the engine API every checkout since the compiled path has (LLMEngine, EngineConfig, warm_up, step):
B requests of 64-token prompts, 6 steps to settle, then the median of 60 decode steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.allocator import run_again_with_tcmalloc
from engine.bench import progress

MEASURE = """
import json, statistics, sys, time
import torch
from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
config = EngineConfig(dtype=args["dtype"], max_num_seqs=max(args["batch_sizes"]), kv_cache_memory_bytes=256 << 20,
                      enable_prefix_caching=False, enforce_eager=args["enforce_eager"], **args["config"])
engine = LLMEngine(args["model"], config)
engine.warm_up()
result = {}
for batch in args["batch_sizes"]:
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"ab-{batch}-{i}", list(range(1 + i, 65 + i)), params)
    for _ in range(6):
        engine.step()
    times = []
    for _ in range(60):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    result[batch] = statistics.median(times) * 1e3
    for i in range(batch):
        engine.abort_request(f"ab-{batch}-{i}")
print(json.dumps(result))
"""


def measure(checkout: Path, settings: dict[str, object], variables: dict[str, str] | None = None) -> dict[int, float]:
    """Median decode step ms per batch size, measured by `checkout`'s engine in a fresh process (with these
    environment variables set)."""
    env = {**os.environ, **(variables or {}), "PYTHONPATH": str(checkout)}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(settings)],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"measuring {checkout} failed:\n{done.stderr[-2000:]}")
    return {int(batch): ms for batch, ms in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def assignments(items: list[str], form: str, parse: Callable[[str], Any] = str) -> dict[str, Any]:
    """NAME=VALUE items as a dict, each value through `parse` (SystemExit naming a malformed item and `form`)."""
    parsed = {}
    for item in items:
        name, equals, value = item.partition("=")
        try:
            if name and equals:
                parsed[name] = parse(value)
                continue
        except ValueError:  # json.JSONDecodeError is one
            pass
        raise SystemExit(f"engine.step_ab: {item!r} is not {form}")
    return parsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.step_ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the other checkout (a worktree of another commit)")
    parser.add_argument("--this", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--model", type=Path, default=Path("models/tiny-simbal"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--enforce-eager", action="store_true")
    for side in ("this", "other"):
        parser.add_argument(f"--{side}-config", action="append", default=[], metavar="FIELD=JSON")
        parser.add_argument(f"--{side}-env", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    settings = {"model": str(args.model.resolve()), "dtype": args.dtype, "batch_sizes": batches,
                "threads": args.threads, "enforce_eager": args.enforce_eager}  # fmt: skip
    sides = {"this": args.this.resolve(), "other": args.other.resolve()}
    config_form, env_form = "FIELD=JSON (e.g. live_pruning=true)", "NAME=VALUE (e.g. MOE_SERVE_NATIVE_OPS=0)"
    configs = {
        "this": assignments(args.this_config, config_form, json.loads),
        "other": assignments(args.other_config, config_form, json.loads),
    }
    variables = {"this": assignments(args.this_env, env_form), "other": assignments(args.other_env, env_form)}
    samples: dict[str, list[dict[int, float]]] = {name: [] for name in sides}
    for round_ in range(args.rounds):
        # A B, then B A: whichever side runs second in a pair measured faster here, so the order alternates too.
        for name, checkout in list(sides.items())[:: 1 if round_ % 2 == 0 else -1]:
            progress(
                f"round {round_ + 1}/{args.rounds}: {name} ({checkout}) {configs[name] or ''} {variables[name] or ''}"
            )
            samples[name].append(measure(checkout, {**settings, "config": configs[name]}, variables[name]))
    print(f"decode step ms, {args.dtype}, {args.threads} threads, {args.rounds} alternating rounds")
    print("\n| batch | this (median) | other (median) | other / this, median of rounds | range |")
    print("|---:|---:|---:|---:|---:|")
    for batch in batches:
        ratios = [o[batch] / t[batch] for t, o in zip(samples["this"], samples["other"], strict=True)]
        this = statistics.median(s[batch] for s in samples["this"])
        other = statistics.median(s[batch] for s in samples["other"])
        print(
            f"| {batch} | {this:.3f} | {other:.3f} | {statistics.median(ratios):.2f}x "
            f"| {min(ratios):.2f}-{max(ratios):.2f} |"
        )


if __name__ == "__main__":
    run_again_with_tcmalloc()  # measure what the server's engine process runs on
    main()
