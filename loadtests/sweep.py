"""`moe-loadtest` (or `python -m loadtests.sweep`): throughput against perplexity per pruning setting.

With --live, every model's settings run on one server, switched through its admin API in interleaved rounds
(loadtests/live_sweep.py); without, each setting gets its own server as follows.

For each model and setting (unpruned, each method at each level, each routing threshold) it starts moe-serve on
a free loopback port, waits for /ready, warms up, runs locust headless at each user count for a fixed time (and
at most a fixed number of requests), reads /metrics, measures perplexity on the test split through the server's
echo+logprobs API, stops the server and moves on. Plans are made (or read from the cache) before any server
starts, with a progress bar, and saved beside the results so every row can be served again.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import torch
from tqdm import tqdm

from engine.command_line import command_parser
from engine.config import DEFAULT_MODEL_DIR, CheckpointError, ModelConfig
from loadtests.live_sweep import live_sweep
from loadtests.locust_run import Workload, run_locust
from loadtests.perplexity import served_perplexity
from loadtests.report import throughput_plot, write_tables
from loadtests.settings import (
    ServerOptions,
    Setting,
    make_plans,
    result_row,
    scrape,
    settings_grid,
    sweep_record,
    warm_up,
)
from loadtests.workload import SPEC_FORMS
from pruning.cache import DEFAULT_CACHE_DIR
from pruning.data import split_windows
from pruning.spec import CalibrationSpec
from server.launch import launched

BUNDLED_MODELS = [DEFAULT_MODEL_DIR, DEFAULT_MODEL_DIR.with_name("tiny-lbl")]


def measure_setting(
    model_dir: Path,
    setting: Setting,
    plan: Path | None,
    users: list[int],
    workload: Workload,
    options: ServerOptions,
    windows: torch.Tensor | None,
    out: Path,
    progress: tqdm,
    round_: int = 0,
) -> list[dict[str, Any]]:
    """Serve one setting and measure it: a row per user count, all with the setting's perplexity (scored when
    windows are given: once per setting, in the first round)."""
    name = model_dir.resolve().name
    trained = ModelConfig.from_dir(model_dir).router_balancing
    balancing = trained.method if trained else "unknown"
    run_dir = out / "runs" / f"{name}-{setting.name}" / f"round{round_ + 1}"
    run_dir.mkdir(parents=True, exist_ok=True)
    args = options.args(model_dir)
    if plan is not None:
        args += ["--prune-plan", str(plan)]
    if setting.route_threshold:
        args += ["--route-threshold", str(setting.route_threshold)]
    rows = []
    with (
        open(run_dir / "server.log", "w") as log,
        launched(args, options.ready_timeout_s, stdout=log, stderr=subprocess.STDOUT) as server,
    ):
        warm_up(server.url, name, 8, options.api_key)
        for count in users:
            progress.set_description(f"{name} {setting.name} {count} users")
            result = run_locust(server.url, count, workload, run_dir, options.api_key, model_dir / "tokenizer.json")
            metrics = scrape(server.url)
            rows.append(result_row(name, balancing, setting, result, metrics, round_))
            progress.update()
            progress.write(
                f"{name} {setting.name} u={count}: {result.requests_per_s:.2f} req/s, "
                f"{result.output_tokens_per_s:.1f} tok/s, TTFT p50 {result.ttft_ms[50]:.0f} ms, "
                f"ITL p50 {result.itl_ms[50]:.1f} ms, {result.failures} failed"
            )
        if windows is None:
            return rows
        progress.set_description(f"{name} {setting.name} perplexity")
        ppl = served_perplexity(server.url, name, windows, api_key=options.api_key)
    progress.write(f"{name} {setting.name}: perplexity {ppl.ppl:.3f} on {ppl.tokens} test tokens")
    for row in rows:
        row |= {"perplexity": ppl.ppl, "ppl_tokens": ppl.tokens}
    return rows


def sweep(
    models: list[Path],
    settings: list[Setting],
    users: list[int],
    workload: Workload,
    options: ServerOptions,
    out: Path,
    ppl_tokens: int | None = None,
    spec: CalibrationSpec | None = None,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    rounds: int = 1,
) -> list[dict[str, Any]]:
    """Every model x setting x user count, in `rounds` interleaved rounds (A B C, A B C: a server start per
    setting per round); returns the rows and writes the tables and the plot to out."""
    for model_dir in models:
        ModelConfig.from_dir(model_dir)  # a bad path fails here, before any run
    spec = spec or CalibrationSpec()
    record = sweep_record(users, rounds, workload, options, spec)
    rows: list[dict[str, Any]] = []
    files: list[Path] = []
    with tqdm(total=len(models) * rounds * len(settings) * len(users), unit="run") as progress:
        for model_dir in models:
            plans = make_plans(model_dir, settings, spec, options, out, cache_dir)
            max_len = ModelConfig.from_dir(model_dir).max_position_embeddings
            windows = split_windows(model_dir, "test", min(512, max_len - 1), ppl_tokens)  # a prompt must fit
            scored: dict[str, dict[str, Any]] = {}
            for round_ in range(rounds):
                for setting in settings:
                    measured = measure_setting(
                        model_dir, setting, plans.get(setting), users, workload, options,
                        None if round_ else windows, out, progress, round_,
                    )  # fmt: skip
                    if round_ == 0:
                        scored[setting.name] = {k: measured[0][k] for k in ("perplexity", "ppl_tokens")}
                    rows += [row | scored[setting.name] for row in measured]
                    files = write_tables(rows, record, out)  # after every setting: a late failure loses nothing
    files.append(throughput_plot(rows, out / "throughput_vs_perplexity.png"))
    print("wrote", ", ".join(str(f) for f in files))
    return rows


def _number_list(kind: type[float | int]) -> Any:
    """An argparse type: comma-separated numbers, so that a bad one is named in the usage error."""

    def parse(text: str) -> list[float] | list[int]:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}s") from None

    return parse


def _substitutions(text: str) -> list[tuple[int, float]]:
    """An argparse type: comma-separated KEEP_TOP:MIN_SIMILARITY pairs."""
    try:
        return [(int(k), float(rho)) for k, rho in (part.split(":") for part in text.split(",") if part.strip())]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of KEEP_TOP:MIN_SIMILARITY") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = command_parser("moe-loadtest", __doc__.split("\n\n")[0])
    parser.add_argument("models", type=Path, nargs="*", default=BUNDLED_MODELS, help="default: both bundled models")
    parser.add_argument(
        "--prune-methods", "--methods", dest="methods", default="pes", help="comma-separated pruning methods"
    )
    parser.add_argument(
        "--prune-levels", "--levels", dest="levels", type=_number_list(float), default=[0.0, 0.25, 0.5],
        help="pruning levels, e.g. 0,0.25,0.5",
    )  # fmt: skip
    parser.add_argument("--thresholds", type=_number_list(float), default=[], help="routing thresholds tau")
    parser.add_argument(
        "--substitutions",
        type=_substitutions,
        default=[],
        help="batch-aware substitutions KEEP_TOP:MIN_SIMILARITY, e.g. 2:0.1,1:0.15",
    )
    parser.add_argument("--users", type=_number_list(int), default=[1, 8], help="concurrent users, a run each")
    parser.add_argument(
        "--live", action="store_true", help="one server per model, settings switched through the admin API in rounds"
    )
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds over the settings (A B C, A B C; default 3 with --live, else 1)"
    )
    parser.add_argument("--ppl-windows", type=int, default=32, help="--live: test windows scored per setting")
    parser.add_argument("--duration", type=int, default=20, help="seconds of load per run")
    parser.add_argument("--max-requests", type=int, default=2000, help="requests per run at most")
    parser.add_argument("--prompt-tokens", default="32-256", help=SPEC_FORMS)
    parser.add_argument("--output-tokens", default="32-128", help=SPEC_FORMS)
    parser.add_argument("--chat-share", type=float, default=0.25, help="share of requests sent as chat")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--ppl-tokens", type=int, help="test tokens scored per setting (default: the whole split)")
    parser.add_argument("--calibration-tokens", type=int, default=CalibrationSpec.max_tokens)
    parser.add_argument("--sample-tokens", type=int, default=CalibrationSpec.sample_tokens)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--threads", "--server-threads", dest="server_threads", type=int, default=ServerOptions.threads,
        help="torch threads of each moe-serve (as moe-serve --threads; --server-threads is the old spelling)",
    )  # fmt: skip
    parser.add_argument("--max-num-seqs", type=int, default=ServerOptions.max_num_seqs)
    parser.add_argument("--api-key", help="servers require it (or set $MOE_SERVE_API_KEY; never shown here)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--seed", type=int, default=0, help="seeds the workload")
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/loadtest"))
    args = parser.parse_args(argv)
    args.api_key = args.api_key or os.environ.get("MOE_SERVE_API_KEY")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if not args.users or min(args.users) < 1:
            raise ValueError(f"--users needs positive user counts, got {args.users}")
        settings = settings_grid(args.methods.split(","), args.levels, args.thresholds, args.substitutions)
        if any(s.keep_top is not None for s in settings) and not args.live:
            raise ValueError("substitution settings need --live (its similarity maps are loaded by the one server)")
        args.rounds = args.rounds if args.rounds is not None else (3 if args.live else 1)
        if args.rounds < 1:
            raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
        workload = Workload(
            args.prompt_tokens, args.output_tokens, args.chat_share, args.temperature, args.duration,
            args.max_requests, args.seed,
        )  # fmt: skip
        options = ServerOptions(
            args.device, args.dtype, args.server_threads, args.max_num_seqs, api_key=args.api_key or None
        )
        spec = CalibrationSpec(max_tokens=args.calibration_tokens, sample_tokens=args.sample_tokens)
        if args.live:
            live_sweep(args.models, settings, args.users, args.rounds, workload, options, args.out, args.ppl_windows,
                       spec, args.cache_dir)  # fmt: skip
        else:
            sweep(args.models, settings, args.users, workload, options, args.out, args.ppl_tokens, spec, args.cache_dir,
                  args.rounds)  # fmt: skip
    except (CheckpointError, ValueError, RuntimeError, FileNotFoundError, httpx.HTTPError) as exc:
        print(f"moe-loadtest: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
