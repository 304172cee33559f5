"""`moe-serve-torchrun`: one rank of an expert-parallel moe-serve launched by torchrun, on one or many machines.

torchrun runs this on every rank with the same moe-serve flags and sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. Rank 0 is the server: `moe-serve` with --expert-parallel WORLD_SIZE, whose engine
process joins torchrun's ranks instead of spawning its own. Every other rank builds the same engine config
from the same flags and follows rank 0 step by step (on cuda:LOCAL_RANK on CUDA). A rank that dies makes rank
0's next collective fail (gloo sees its connections close): rank 0 then stops with status 1 and names the cause.

Every rank but 0 ignores SIGTERM: torchrun sends it to all ranks at once on stop, and a worker that died first
would make rank 0's graceful drain a failure; rank 0 tells the workers to exit once it has drained.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from server.cli import parse_args, serve
from server.serving_config import resolve_serving

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def main(argv: list[str] | None = None, env: Mapping[str, str] = os.environ) -> int:
    """Run this process's rank: the server on rank 0, a worker elsewhere; 0 on a clean stop, 1 on failure."""
    argv = sys.argv[1:] if argv is None else argv
    missing = [name for name in TORCHRUN_ENV if name not in env]
    if missing:
        parse_args(argv)  # --help and --version answer (moe-serve's), bad flags are refused
        print(f"moe-serve-torchrun: error: run it under torchrun ({', '.join(missing)} not set)", file=sys.stderr)
        return 2
    if any(arg == "--expert-parallel" or arg.startswith("--expert-parallel=") for arg in argv):
        print(
            "moe-serve-torchrun: error: the ranks are torchrun's (WORLD_SIZE): drop --expert-parallel", file=sys.stderr
        )
        return 2
    rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    args = parse_args([*argv, "--expert-parallel", str(world)])
    if rank == 0:
        return serve(args, ranks_from_launcher=True)
    return run_worker(args, rank, local_rank)


def run_worker(args: argparse.Namespace, rank: int, local_rank: int) -> int:
    """A worker rank: the same engine config as rank 0's, then follow it until it says Exit."""
    import torch

    from corpus.splits import CorpusError
    from engine.config import CheckpointError
    from engine.expert_parallel_group import ENV_INIT
    from server.engine_rank import follow_lead_rank

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log_format = f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s"
    logging.basicConfig(level=args.log_level.upper(), format=log_format)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = resolve_serving(args).config
    except (CheckpointError, ValueError, RuntimeError, CorpusError) as exc:
        print(f"moe-serve-torchrun: rank {rank}: error: {exc}", file=sys.stderr)
        return 1
    follow_lead_rank(Path(args.model), config, rank, ENV_INIT, warmup=True, local_rank=local_rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
