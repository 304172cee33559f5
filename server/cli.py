"""`moe-serve`: load a model and serve it over HTTP (the bundled SimBal model on 127.0.0.1:8000 by default).

The engine process loads the model, and the request workers dry-run the chat template, before the port is
bound, so a bad checkpoint or template exits with an error naming the file and nothing listening. SIGTERM or
Ctrl-C stops accepting, lets in-flight requests finish for --shutdown-grace seconds, aborts the rest and exits 0.
If the engine process dies, the server fails in-flight requests, stops and exits 1, so that a supervisor
(systemd's Restart=on-failure, Kubernetes, Docker's restart policy) starts it again.

This module is kept light to import: the engine process and the request workers are started with spawn, which
imports the parent's main module again in each child, and a request worker must not carry torch. The engine,
pruning and app are imported inside the functions that use them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from engine.command_line import command_parser, eager_by_default, positive_int
from engine.config import DEFAULT_MODEL_DIR, CheckpointError, ModelConfig
from engine.prebuild import start_prebuild
from server.engine_start import EngineProcess
from server.http_protocol import HEADER_TIMEOUT_S, bounded_protocol
from server.request_limits import RequestLimits, flag
from server.serving_config import pruning_settings, resolve_serving

if TYPE_CHECKING:
    from server.async_engine import AsyncEngine
    from server.settings import ServerSettings

API_KEY_ENV = "MOE_SERVE_API_KEY"
LIMIT_HELP = {
    "max_prompts_per_request": "prompts in one completions request",
    "max_prompt_tokens_per_request": "prompt tokens in one request, all prompts together",
    "max_sequences_per_request": "sequences one request asks for (prompts x n)",
    "max_stop_strings": "stop strings in one request",
    "max_stop_string_chars": "characters in one stop string",
    "max_logprobs": "top logprobs per token (logprobs, top_logprobs)",
    "chat_template_timeout": "seconds a chat template may take to render one request",
}
EXPERT_METRICS = {"auto": None, "per-expert": True, "per-layer": False}


class DrainingServer(uvicorn.Server):
    """uvicorn, with the engine drained as soon as shutdown begins (uvicorn alone would only cancel the
    streams still open when its own timeout ran out), and stopped when the engine dies."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], None]) -> None:
        super().__init__(config)
        self.drain = drain
        self.engine_died = False

    def stop_for_dead_engine(self, reason: str) -> None:
        """Called from the engine reader thread: stop serving (uvicorn polls should_exit) and exit non-zero."""
        logging.getLogger(__name__).error("the engine process died (%s); stopping so a supervisor can restart", reason)
        self.engine_died = True
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = asyncio.create_task(asyncio.to_thread(self.drain))
        await super().shutdown(sockets)
        await drain


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from engine.choices import BACKENDS
    from pruning.choices import BUDGETS, HANDLINGS
    from pruning.methods import METHODS

    parser = command_parser("moe-serve", __doc__.split("\n\n")[0])
    parser.add_argument(
        "model_path", type=Path, nargs="?", metavar="MODEL", help="Hugging Face model directory (as vllm serve MODEL)"
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="the same, as a flag")
    parser.add_argument("--served-model-name", help="name clients send as `model` (default: the directory name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to bind")
    parser.add_argument("--api-key", help=f"require this key (or set ${API_KEY_ENV}; never shown here)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16 on CUDA and on CPUs with native bf16, else fp32), float32, bfloat16, float16",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    parser.add_argument("--max-num-seqs", type=int, default=128, help="sequences in one batch")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens in one step")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    parser.add_argument(
        "--kv-cache-memory-bytes", type=int, default=1 << 30, help="KV cache size on CPU, in bytes (1073741824 = 1 GiB)"
    )
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="share of GPU memory to use")
    parser.add_argument(
        "--moe-backend", choices=BACKENDS, default="auto", help="auto: the CPU kernel on CPU, else grouped"
    )
    parser.add_argument(
        "--enforce-eager",
        action="store_const",
        const=True,
        help="run the model eagerly instead of compiling it at start-up (default: $MOE_SERVE_ENFORCE_EAGER, else off)",
    )
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--max-queue", type=int, default=256, help="sequences waiting beyond a full batch before 503")
    parser.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger bodies get 413")
    parser.add_argument(
        "--allowed-hosts",
        help="comma-separated Host header names the server answers to, '*' for any (default: localhost, 127.0.0.1 "
        "and ::1 when bound to loopback, any otherwise): refuses DNS-rebinding pages",
    )
    parser.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT_S, help="seconds for request headers")
    parser.add_argument("--body-timeout", type=float, default=30.0, help="seconds for a request body to arrive")
    parser.add_argument("--max-connections", type=int, default=1024, help="open connections before 503")
    parser.add_argument(
        "--request-workers", type=int, default=2, help="processes that parse, render and tokenize requests"
    )
    parser.add_argument(
        "--engine-health-timeout",
        type=float,
        default=10.0,
        help="seconds without a word from the engine before /health reports it unresponsive",
    )
    limits = parser.add_argument_group("per-request limits (each refusal is a 400 naming its flag)")
    for item in fields(RequestLimits):
        kind = float if isinstance(item.default, float) else int
        limits.add_argument(f"--{flag(item.name)}", type=kind, default=item.default, help=LIMIT_HELP[item.name])
    parser.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds in-flight requests get on stop")
    parser.add_argument(
        "--expert-metrics",
        choices=sorted(EXPERT_METRICS),
        default="auto",
        help="per-expert series, or per-layer aggregates only (auto: per-expert up to 4096 layer x expert pairs)",
    )
    parser.add_argument("--expert-load-window", type=float, default=60.0, help="seconds the balance gauges cover")
    pruning = parser.add_argument_group("pruning (docs/pruning.md)")
    pruning.add_argument(
        "--prune-level", type=float, default=0.0, help="fraction of routed experts to remove, e.g. 0.25"
    )
    pruning.add_argument("--prune-method", choices=METHODS, default="pes", help="how experts are chosen (default pes)")
    pruning.add_argument("--prune-budget", choices=BUDGETS, default="uniform", help="pes: adaptive = per-layer by cost")
    pruning.add_argument(
        "--prune-handling", choices=HANDLINGS, default="repick", help="where removed experts' tokens go"
    )
    pruning.add_argument("--prune-plan", type=Path, help="a plan file from `moe-prune plan` (instead of a level)")
    pruning.add_argument(
        "--calibration-files",
        type=Path,
        nargs="+",
        default=(),
        help="UTF-8 text like the served traffic to calibrate plans and similarity maps on (default: the corpus's "
        "validation split)",
    )
    pruning.add_argument(
        "--calibration-tokens", type=positive_int, default=262144, help="token budget of the calibration text"
    )
    pruning.add_argument(
        "--route-threshold", type=float, default=0.0, help="drop routed experts below this probability"
    )
    pruning.add_argument(
        "--experts-per-token",
        "--top-k",
        dest="top_k",
        metavar="N",
        type=positive_int,
        help="experts each token is routed to (the model's by default; --top-k is the old spelling)",
    )
    pruning.add_argument(
        "--substitution-keep-top",
        type=int,
        help="batch-aware substitution: each generated token keeps its first S experts, and its other slots move "
        "to the most similar expert the step already reads (default: off)",
    )
    pruning.add_argument(
        "--substitution-min-similarity",
        type=float,
        default=0.5,
        help="a slot moves only to an expert at least this similar (PES's cosine, -1..1)",
    )
    pruning.add_argument(
        "--substitution-drop-unmatched",
        action="store_true",
        help="drop a slot with no similar enough expert instead of keeping it (bounds the experts a step reads)",
    )
    pruning.add_argument(
        "--similarity-maps",
        action="store_true",
        help="load the experts' similarity maps without a default substitution, so requests may ask for one",
    )
    parser.add_argument(
        "--enable-admin-api",
        action="store_true",
        help="serve GET/POST /v1/routing: read and switch the routing budget and pruning live (behind the API key "
        "if set); pruning then keeps every expert's weights loaded so that any level can be switched to",
    )
    pruning.add_argument(
        "--live-pruning-releases-experts",
        action="store_true",
        help="with --enable-admin-api: each pruning frees the weights of the experts it removes and reads them back "
        "from the checkpoint when a later one needs them (memory follows the plan; such a switch recompiles the step)",
    )
    pruning.add_argument(
        "--allow-request-routing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="accept a request's `moe` field (its own route_threshold, experts_per_token, substitution)",
    )
    parallel = parser.add_argument_group("expert parallelism (docs/deploy.md)")
    parallel.add_argument(
        "--expert-parallel",
        type=positive_int,
        default=1,
        metavar="N",
        help="engine ranks (processes on this machine, one GPU each on CUDA) that split every MoE layer's routed "
        "experts; rank 0 schedules and the others follow it step by step (default 1: one engine process)",
    )
    parallel.add_argument(
        "--expert-placement",
        type=Path,
        metavar="FILE",
        help="which rank holds which expert: a JSON file written by engine/expert_placement.py's save_placement "
        "for N ranks (default: contiguous blocks of expert ids)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads of the engine (default: torch's choice)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level")
    parser.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log a line per request: client, method, route, status, latency, tokens",
    )
    args = parser.parse_args(argv)
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV)
    if args.model_path is not None:
        if args.model != DEFAULT_MODEL_DIR and args.model != args.model_path:
            parser.error(f"two models given: {args.model_path} and --model {args.model}")
        args.model = args.model_path
    if args.expert_placement is not None and args.expert_parallel == 1:
        parser.error("--expert-placement needs --expert-parallel N with N > 1")
    if args.live_pruning_releases_experts and not args.enable_admin_api:
        parser.error("--live-pruning-releases-experts needs --enable-admin-api (pruning is switched live through it)")
    return args


def main(argv: list[str] | None = None) -> int:
    return serve(parse_args(argv))  # before importing torch: --help, --version and bad flags answer at once


def serve(args: argparse.Namespace, ranks_from_launcher: bool = False) -> int:
    """Serve until stopped: 0 on a clean stop, 1 on a start-up error or a dead engine. ranks_from_launcher:
    the other expert-parallel ranks are started by torchrun and join through its environment (server/
    torchrun_rank.py) instead of being spawned here."""
    try:  # what the flags and the model's config.json can refuse, before anything starts (torch-free)
        pruning_settings(args).check(ModelConfig.from_dir(args.model))
    except (CheckpointError, ValueError) as exc:
        print(f"moe-serve: error: {exc}", file=sys.stderr)
        return 1
    try:
        listener = bind(args.host, args.port)  # a port in use is reported at once too
    except OSError as exc:
        print(f"moe-serve: error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    compiles = not (args.enforce_eager or eager_by_default())
    start_prebuild(args.device, probe_compiler=compiles, precompile_headers=compiles)  # engine/prebuild.py
    engine_process = EngineProcess()  # imports the engine while this process imports the server (its docstring)
    from corpus.splits import CorpusError
    from pruning.serving import LivePruning
    from server.app import build_app
    from server.async_engine import AsyncEngine
    from server.settings import ServerSettings

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = None
    try:
        resolved_serving = resolve_serving(args)
        config, pruning, plan = resolved_serving.config, resolved_serving.pruning, resolved_serving.plan
        placement = config.expert_shard.placement if config.expert_shard is not None else None
        limits = RequestLimits(**{item.name: getattr(args, item.name) for item in fields(RequestLimits)})
        engine = AsyncEngine(
            args.model,
            config,
            args.max_queue,
            threads=args.threads,
            heartbeat_timeout=args.engine_health_timeout,
            ranks_from_launcher=ranks_from_launcher,
            process=engine_process,
        )
        settings = ServerSettings(
            model_name=args.served_model_name or args.model.resolve().name,
            model_path=args.model,
            api_key=args.api_key or None,
            max_body_bytes=args.max_body_bytes,
            shutdown_grace_s=args.shutdown_grace,
            per_expert_series=EXPERT_METRICS[args.expert_metrics],
            expert_window_s=args.expert_load_window,
            pruning_labels=pruning.labels(plan),
            token_routing=pruning.token_routing(),
            allow_request_routing=args.allow_request_routing,
            substitution_available=pruning.wants_similarity,
            enable_admin_api=args.enable_admin_api,
            live_pruning=LivePruning(pruning, args.model, args.device, args.dtype) if args.enable_admin_api else None,
            limits=limits,
            request_workers=args.request_workers,
            allowed_hosts=allowed_hosts(args.allowed_hosts, args.host),
            body_timeout_s=args.body_timeout,
            access_log=args.access_log,
            expert_placement=placement,
        )
    except (CheckpointError, ValueError, RuntimeError, CorpusError) as exc:
        listener.close()
        if engine is None:  # never told to run (AsyncEngine stops a process that failed to load)
            engine_process.stop()
        print(f"moe-serve: error: {exc}", file=sys.stderr)
        return 1
    logging.getLogger("moe_serve").info(startup_summary(engine, settings, args))
    try:
        app = build_app(engine, settings)
    except (ValueError, RuntimeError) as exc:
        listener.close()
        engine.shutdown(timeout=30)
        print(f"moe-serve: error: {exc}", file=sys.stderr)
        return 1
    uvicorn_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=round(args.shutdown_grace) + 10,  # a backstop: drain() ends streams first
        access_log=False,  # the server logs its own line per request (server/middleware.py)
        http=bounded_protocol(args.header_timeout),
        limit_concurrency=args.max_connections,
    )
    # uvicorn handles SIGTERM/SIGINT itself (stop accepting, drain, lifespan shutdown) and then re-raises the
    # signal to the handler it found; a no-op one lets a clean shutdown end with exit status 0.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda *_: None)
    server = DrainingServer(uvicorn_config, app.state.drain)
    engine.on_death.append(server.stop_for_dead_engine)
    if engine.failed:  # it died while the app was being built
        server.stop_for_dead_engine(engine.error or "")
    server.run(sockets=[listener])
    return 1 if server.engine_died or engine.failed else 0


def startup_summary(engine: AsyncEngine, settings: ServerSettings, args: argparse.Namespace) -> str:
    """What is being served, and how, in a few lines (what moe-generate prints, plus the server's own settings)."""
    config, info = engine.model_config, engine.info
    balancing = config.router_balancing
    pruning = ", ".join(f"{k}={v}" for k, v in settings.pruning_labels.items() if v not in ("", "0")) or "none"
    return (
        f"serving {settings.model_name} from {settings.model_path}: {config.model_type}, {config.num_layers} layers, "
        f"{config.num_experts} experts top-{config.top_k}, router balanced with "
        f"{balancing.method if balancing else 'unknown'}\n"
        f"  {info.device}, {info.dtype}, weights {info.weight_bytes / 2**20:.1f} MiB resident "
        f"({info.released_expert_bytes / 2**20:.1f} MiB of pruned experts released), {info.num_kv_blocks} KV blocks "
        f"of {args.block_size} tokens, max_model_len {info.max_model_len}, up to {args.max_num_seqs} sequences\n"
        f"{expert_parallel_summary(info.expert_weight_bytes)}"
        f"  pruning: {pruning}; admin API {'on (live pruning)' if settings.enable_admin_api else 'off'}; "
        f"API key {'required' if settings.api_key else 'not required'}\n"
        f"  http://{args.host}:{args.port}/v1 (ready once warm-up has run; GET /ready)"
    )


def expert_parallel_summary(expert_bytes: tuple[int, ...]) -> str:
    """A line on the engine ranks and the expert bytes each holds ("" for one process)."""
    if len(expert_bytes) < 2:
        return ""
    held = ", ".join(f"{held / 2**20:.1f}" for held in expert_bytes)
    return f"  expert parallelism: {len(expert_bytes)} ranks holding {held} MiB of routed experts (weights above: rank 0)\n"


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port but not listening (connections are refused until uvicorn serves on it)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError:
        listener.close()
        raise
    listener.set_inheritable(True)
    return listener


def allowed_hosts(flag_value: str | None, bind_host: str) -> frozenset[str] | None:
    """The Host names to answer to: the flag's list ('*': any), else the loopback names for a loopback bind."""
    if flag_value is not None:
        names = frozenset(name.strip().lower() for name in flag_value.split(",") if name.strip())
        return None if "*" in names else names
    from server.middleware import LOOPBACK_HOSTS

    return LOOPBACK_HOSTS if bind_host in LOOPBACK_HOSTS else None


if __name__ == "__main__":
    sys.exit(main())
