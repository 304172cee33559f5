"""Decode throughput side by side with llama.cpp, the CPU anchor, in one run, alternating the two engines.

`python -m engine.anchor MODEL_DIR --llama-cpp WORKDIR [--gguf NAME-bf16.gguf,...] [--batch-sizes 1,8,32]`
`[--threads 2] [--rounds 3] [--json PATH] [--plot PNG]`; `--plot PNG --from-json PATH` redraws a run's plot.

WORKDIR is what ../shared/anchors/llama-cpp/setup.sh built (build/bin/llama-bench, llama-batched-bench, and
the model converted to gguf/). Each round measures, per batch size, this engine and every GGUF given (this
engine first in even rounds, last in odd ones, so neither side always follows the other):
at batch 1 llama.cpp's `llama-bench -n 128` (tg128), at larger batches `llama-batched-bench` with 64-token
prompts and 128 generated tokens (its S_TG); this engine the same way: B sequences of 64-token prompts,
prefilled, then 128 decode steps timed (B x 128 / seconds), after one untimed pass per batch size. Medians over
rounds; the ratio is against the best llama.cpp file at each batch size (each engine in its best dtype). Same
thread count on both sides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from engine.allocator import run_again_with_tcmalloc
from engine.bench import make_prompts, progress
from engine.decoding import start_decoding
from engine.llm import LLM
from engine.sampling_params import RequestOutputKind, SamplingParams

PROMPT, GENERATED = 64, 128
FINAL_ONLY = RequestOutputKind.FINAL_ONLY  # as LLM.generate asks: llama.cpp's benches build no text


def ours(llm: LLM, batch: int) -> float:
    """Decode tokens/s of `batch` sequences, counted as llama-batched-bench counts them."""
    engine = llm.engine
    prompts = make_prompts(batch, PROMPT, engine.model.config.vocab_size, seed=batch)
    params = SamplingParams(temperature=0.0, max_tokens=GENERATED + 1, ignore_eos=True, output_kind=FINAL_ONLY)
    start_decoding(engine, "anchor", prompts, [params] * batch)
    start = time.perf_counter()
    for _ in range(GENERATED):
        engine.step()
    seconds = time.perf_counter() - start
    while engine.has_unfinished_requests():
        engine.step()
    return batch * GENERATED / seconds


def llama_cpp(workdir: Path, gguf: str, batch: int, threads: int) -> float:
    """llama.cpp's decode tokens/s on the same workload."""
    model = str(workdir / "gguf" / gguf)
    if batch == 1:
        run = subprocess.run(
            [str(workdir / "build/bin/llama-bench"), "-m", model, "-p", "0", "-n", str(GENERATED), "-t", str(threads),
             "-r", "3", "-o", "json"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return float(json.loads(run.stdout)[0]["avg_ts"])
    for _ in range(3):  # now and then it exits 0 with its table's header only (3 of ~40 runs here): asked again
        run = subprocess.run(
            [str(workdir / "build/bin/llama-batched-bench"), "-m", model, "-c", "8192", "-b", "2048", "-ub", "512",
             "-npp", str(PROMPT), "-ntg", str(GENERATED), "-npl", str(batch), "-t", str(threads)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        lines = run.stdout.splitlines()
        row = next((line for line in lines if line.startswith("|") and line.split("|")[3].strip() == str(batch)), None)
        if row is not None:
            return float(row.split("|")[8])  # S_TG t/s
    raise RuntimeError(
        f"llama-batched-bench printed no row for batch {batch} ({gguf}) three times:\n{run.stdout[-2000:]}\n"
        f"{run.stderr[-2000:]}"
    )


def plot(samples: dict[str, dict[int, list[float]]], title: str, path: Path) -> None:
    """Grouped bars per batch size: each engine's median decode tokens/s, whiskers from its slowest to its
    fastest round (this machine drifts, so the spread is part of the result)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(samples)
    batches = sorted({b for rows in samples.values() for b in rows}, key=int)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(names):  # an engine without rounds at a batch size (a file it cannot run) has no bar
        at = [j for j, b in enumerate(batches) if samples[name].get(b)]
        rows = [samples[name][batches[j]] for j in at]
        medians = [statistics.median(r) for r in rows]
        spread = [[m - min(r) for m, r in zip(medians, rows)], [max(r) - m for m, r in zip(medians, rows)]]
        positions = [j + (i - (len(names) - 1) / 2) * width for j in at]
        ax.bar(positions, medians, width, yerr=spread, capsize=3, label=name.removesuffix(".gguf"))
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.anchor", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("--llama-cpp", type=Path, help="the workdir setup.sh built")
    parser.add_argument("--gguf", help="comma-separated files in WORKDIR/gguf (default: every NAME-*.gguf there)")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="also draw the medians and spread as a PNG")
    parser.add_argument("--from-json", type=Path, help="draw --plot from an earlier run's --json; run nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        if not args.plot:
            parser.error("--from-json needs --plot")
        run = json.loads(args.from_json.read_text())
        plot(run["samples"], f"{run['threads']} threads, moe-serve in {run['dtype']}", args.plot)
        return
    if args.model is None or args.llama_cpp is None:
        parser.error("MODEL_DIR and --llama-cpp are required (unless --from-json)")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    ggufs = (
        args.gguf.split(",")
        if args.gguf
        else sorted(p.name for p in (args.llama_cpp / "gguf").glob(f"{args.model.name}-*.gguf"))
    )
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=max(batches), enable_prefix_caching=False)
    samples: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in ["moe-serve", *ggufs]}
    for batch in batches:  # untimed, as llama-bench warms up: the one-token graph's wrapper may still be building
        progress(f"warm-up, batch {batch}")
        ours(llm, batch)
    for round_ in range(args.rounds):
        for batch in batches:
            progress(f"round {round_ + 1}/{args.rounds}, batch {batch}")
            order = ["moe-serve", *ggufs] if round_ % 2 == 0 else [*reversed(ggufs), "moe-serve"]  # A B, B A
            for name in order:
                rate = ours(llm, batch) if name == "moe-serve" else llama_cpp(args.llama_cpp, name, batch, args.threads)
                samples[name][batch].append(rate)
    medians = {name: {b: statistics.median(v) for b, v in rows.items()} for name, rows in samples.items()}
    dtype = str(llm.engine.dtype).removeprefix("torch.")
    print(f"decode tokens/s, {args.threads} threads, median of {args.rounds} alternating rounds; moe-serve in {dtype}")
    print("\n| batch | moe-serve | " + " | ".join(f"llama.cpp {g}" for g in ggufs) + " | moe-serve / best llama.cpp |")
    print("|---:|---:|" + "---:|" * len(ggufs) + "---:|")
    for b in batches:
        best = max(medians[g][b] for g in ggufs)
        cells = [f"{medians['moe-serve'][b]:.0f}", *(f"{medians[g][b]:.0f}" for g in ggufs)]
        print(f"| {b} | " + " | ".join(cells) + f" | {medians['moe-serve'][b] / best:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "dtype": dtype, "samples": samples}, indent=2) + "\n")
    if args.plot:
        plot(samples, f"{args.threads} threads, moe-serve in {dtype}", args.plot)


if __name__ == "__main__":
    run_again_with_tcmalloc()  # measure what the server's engine process runs on
    main()
