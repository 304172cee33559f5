"""`moe-loadtest` (or `python -m loadtests.sweep`): throughput against perplexity per pruning setting.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from engine.checkpoint import load_model
from engine.config import DEFAULT_MODEL_DIR, CheckpointError, ModelConfig
from engine.llm_engine import resolve_device, resolve_dtype
from loadtests.locust_run import LoadResult, Workload, run_locust
from loadtests.perplexity import served_perplexity
from loadtests.report import throughput_plot, write_tables
from loadtests.workload import SPEC_FORMS
from pruning.cache import DEFAULT_CACHE_DIR, CalibrationSpec, cached_plan
from pruning.data import split_windows
from pruning.methods import METHODS
from server.launch import launched

BUNDLED_MODELS = [DEFAULT_MODEL_DIR, DEFAULT_MODEL_DIR.with_name("tiny-lbl")]
MIB = 2**20


@dataclass(frozen=True)
class Setting:
    """One server configuration: unpruned ("none"), a pruning method at a level, or a routing threshold."""

    method: str
    level: float = 0.0
    route_threshold: float = 0.0

    @property
    def name(self) -> str:
        if self.method == "threshold":
            return f"tau{self.route_threshold:g}"
        return "none" if self.method == "none" else f"{self.method}-{self.level:g}"


def settings_grid(methods: list[str], levels: list[float], thresholds: list[float]) -> list[Setting]:
    """The unpruned baseline first, then every method at every nonzero level, then every nonzero threshold."""
    for value in [*levels, *thresholds]:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"pruning levels and routing thresholds must be in [0, 1), got {value}")
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown pruning method {method!r}; expected one of {', '.join(METHODS)}")
    grid = [Setting("none")]
    grid += [Setting(method, level) for method in methods for level in levels if level > 0]
    grid += [Setting("threshold", route_threshold=tau) for tau in thresholds if tau > 0]
    return grid


@dataclass(frozen=True)
class ServerOptions:
    """How every moe-serve of the sweep runs."""

    device: str = "auto"
    dtype: str = "auto"
    threads: int = max(1, (os.cpu_count() or 2) - 1)  # leave a core to locust
    max_num_seqs: int = 64
    ready_timeout_s: float = 600.0
    api_key: str | None = None  # given to every server and sent by every client of the sweep

    def args(self, model_dir: Path) -> list[str]:
        return [
            "--model", str(model_dir), "--device", self.device, "--dtype", self.dtype, "--threads", str(self.threads),
            "--max-num-seqs", str(self.max_num_seqs), "--max-queue", "4096", "--log-level", "warning",
            "--api-key", self.api_key or "",
        ]  # fmt: skip


def make_plans(
    model_dir: Path, settings: list[Setting], spec: CalibrationSpec, options: ServerOptions, out: Path, cache_dir: Path
) -> dict[Setting, Path]:
    """Plan files for the pruned settings, made here (calibrating once per model, with progress) or read from
    the cache, so that each server starts without calibrating."""
    pruned = [s for s in settings if s.method not in ("none", "threshold")]
    if not pruned:
        return {}
    device = resolve_device(options.device)
    with torch.no_grad():
        model = load_model(model_dir, resolve_dtype(options.dtype, device), device).eval()
        files = {}
        for setting in pruned:
            plan = cached_plan(model_dir, model, setting.method, setting.level, spec=spec, cache_dir=cache_dir)
            files[setting] = out / "plans" / f"{model_dir.resolve().name}-{setting.name}.json"
            files[setting].parent.mkdir(parents=True, exist_ok=True)
            plan.save(files[setting])
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the servers need this memory
    return files


def scrape(url: str) -> dict[str, float]:
    """The server's model-wide samples (those labelled by model_name alone), by name."""
    response = httpx.get(f"{url}/metrics", timeout=30)
    response.raise_for_status()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if set(sample.labels) <= {"model_name"}
    }


def warm_up(url: str, model: str, requests: int, api_key: str | None = None) -> None:
    """Short completions, four at a time: first-use costs of batch shapes are paid before anything is timed."""
    body = {"model": model, "prompt": "The first words of a warm-up request", "max_tokens": 8, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client, ThreadPoolExecutor(4) as pool:
        for response in pool.map(lambda _: client.post("/v1/completions", json=body), range(requests)):
            response.raise_for_status()


def measure_setting(
    model_dir: Path,
    setting: Setting,
    plan: Path | None,
    users: list[int],
    workload: Workload,
    options: ServerOptions,
    windows: torch.Tensor,
    out: Path,
    progress: tqdm,
) -> list[dict[str, Any]]:
    """Serve one setting and measure it: a row per user count, all with the setting's perplexity."""
    name = model_dir.resolve().name
    trained = ModelConfig.from_dir(model_dir).router_balancing
    balancing = trained.method if trained else "unknown"
    run_dir = out / "runs" / f"{name}-{setting.name}"
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
            rows.append(_row(name, balancing, setting, result, metrics))
            progress.update()
            progress.write(
                f"{name} {setting.name} u={count}: {result.requests_per_s:.2f} req/s, "
                f"{result.output_tokens_per_s:.1f} tok/s, TTFT p50 {result.ttft_ms[50]:.0f} ms, "
                f"ITL p50 {result.itl_ms[50]:.1f} ms, {result.failures} failed"
            )
        progress.set_description(f"{name} {setting.name} perplexity")
        ppl = served_perplexity(server.url, name, windows, api_key=options.api_key)
    progress.write(f"{name} {setting.name}: perplexity {ppl.ppl:.3f} on {ppl.tokens} test tokens")
    for row in rows:
        row |= {"perplexity": ppl.ppl, "ppl_tokens": ppl.tokens}
    return rows


def _row(model: str, balancing: str, setting: Setting, result: LoadResult, metrics: dict[str, float]) -> dict[str, Any]:
    return {
        "model": model,
        "balancing": balancing,
        "method": setting.method,
        "level": setting.level,
        "route_threshold": setting.route_threshold,
        "users": result.users,
        "requests": result.requests,
        "failures": result.failures,
        "duration_s": result.duration_s,
        "requests_per_s": result.requests_per_s,
        "input_tokens_per_s": result.input_tokens_per_s,
        "output_tokens_per_s": result.output_tokens_per_s,
        "ttft_p50_ms": result.ttft_ms[50],
        "ttft_p99_ms": result.ttft_ms[99],
        "itl_p50_ms": result.itl_ms[50],
        "itl_p99_ms": result.itl_ms[99],
        "tpot_p50_ms": result.tpot_ms[50],
        "tpot_p99_ms": result.tpot_ms[99],
        "e2e_p50_ms": result.e2e_ms[50],
        "e2e_p99_ms": result.e2e_ms[99],
        "peak_memory_mib": _metric(metrics, "moe_serve_engine_peak_memory_bytes") / MIB,
        "weight_mib": _metric(metrics, "moe_serve_model_weight_bytes") / MIB,
    }


def _metric(metrics: dict[str, float], name: str) -> float:
    if name not in metrics:
        raise RuntimeError(f"the server's /metrics has no {name}")
    return metrics[name]


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
) -> list[dict[str, Any]]:
    """Every model x setting x user count; returns the rows and writes the tables and the plot to out."""
    for model_dir in models:
        ModelConfig.from_dir(model_dir)  # a bad path fails here, before any run
    spec = spec or CalibrationSpec()
    options_record = {**asdict(options), "api_key": "set" if options.api_key else None}
    record = _jsonable(
        {"users": users, "workload": asdict(workload), "server": options_record, "calibration": asdict(spec)}
    )
    rows: list[dict[str, Any]] = []
    files: list[Path] = []
    with tqdm(total=len(models) * len(settings) * len(users), unit="run") as progress:
        for model_dir in models:
            plans = make_plans(model_dir, settings, spec, options, out, cache_dir)
            max_len = ModelConfig.from_dir(model_dir).max_position_embeddings
            windows = split_windows(model_dir, "test", min(512, max_len - 1), ppl_tokens)  # a prompt must fit
            for setting in settings:
                rows += measure_setting(
                    model_dir, setting, plans.get(setting), users, workload, options, windows, out, progress
                )
                files = write_tables(rows, record, out)  # after every setting: a late failure loses nothing
    files.append(throughput_plot(rows, out / "throughput_vs_perplexity.png"))
    print("wrote", ", ".join(str(f) for f in files))
    return rows


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _number_list(kind: type[float | int]) -> Any:
    """An argparse type: comma-separated numbers, so that a bad one is named in the usage error."""

    def parse(text: str) -> list[float] | list[int]:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}s") from None

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="moe-loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", type=Path, nargs="*", default=BUNDLED_MODELS, help="default: both bundled models")
    parser.add_argument("--methods", default="pes", help="comma-separated pruning methods")
    parser.add_argument("--levels", type=_number_list(float), default=[0.0, 0.25, 0.5], help="e.g. 0,0.25,0.5")
    parser.add_argument("--thresholds", type=_number_list(float), default=[], help="routing thresholds tau")
    parser.add_argument("--users", type=_number_list(int), default=[1, 8], help="concurrent users, a run each")
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
    parser.add_argument("--server-threads", type=int, default=ServerOptions.threads, help="torch threads of moe-serve")
    parser.add_argument("--max-num-seqs", type=int, default=ServerOptions.max_num_seqs)
    parser.add_argument("--api-key", default=os.environ.get("MOE_SERVE_API_KEY"), help="servers require it")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--seed", type=int, default=0, help="seeds the workload")
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/loadtest"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if not args.users or min(args.users) < 1:
            raise ValueError(f"--users needs positive user counts, got {args.users}")
        settings = settings_grid(args.methods.split(","), args.levels, args.thresholds)
        workload = Workload(
            args.prompt_tokens, args.output_tokens, args.chat_share, args.temperature, args.duration,
            args.max_requests, args.seed,
        )  # fmt: skip
        options = ServerOptions(
            args.device, args.dtype, args.server_threads, args.max_num_seqs, api_key=args.api_key or None
        )
        spec = CalibrationSpec(max_tokens=args.calibration_tokens, sample_tokens=args.sample_tokens)
        sweep(args.models, settings, args.users, workload, options, args.out, args.ppl_tokens, spec, args.cache_dir)
    except (CheckpointError, ValueError, RuntimeError, FileNotFoundError, httpx.HTTPError) as exc:
        print(f"moe-loadtest: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
