"""`moe-serve-torchrun` under torchrun: real servers whose engine ranks torchrun starts and joins.

Two ranks of one torchrun on one machine serve what one process generates and report rank 1's expert bytes;
a SIGTERM to rank 0 (the server) ends torchrun with status 0, one to torchrun stops every rank cleanly. Two torchruns of one node each (as on two machines, where
no launcher sees the other's ranks) show that rank 0 notices a rank killed on the other node by itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from server import torchrun_rank
from server.launch import free_port, stop, wait_ready
from tests.server.test_cli import children, stream_tokens
from tests.server.test_expert_parallel import SERVE_ARGS, completion
from tests.server.test_pruning import samples

PROMPT = "Split across torchrun ranks"


def torchrun(nodes: int, procs: int, node_rank: int, master_port: int, args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nodes),
        "--nproc-per-node",
        str(procs),
        "--node-rank",
        str(node_rank),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(master_port),
        "-m",
        "server.torchrun_rank",
        *args,
    ]


@contextmanager
def started(commands: list[list[str]], capture_first: bool = False) -> Iterator[list[subprocess.Popen[str]]]:
    """Start every command (MOE_SERVE_ENFORCE_EAGER set, as tests do), the first one's stderr piped if asked;
    stop the ones still running at the end."""
    env = {**os.environ, "MOE_SERVE_ENFORCE_EAGER": "1"}
    stderr = [subprocess.PIPE if capture_first else None] + [None] * (len(commands) - 1)
    processes = [subprocess.Popen(cmd, env=env, text=True, stderr=pipe) for cmd, pipe in zip(commands, stderr)]
    try:
        yield processes
    finally:
        for process in processes:
            stop(process, 60.0)


def rank_pids(torchrun_pid: int) -> dict[str, int]:
    """The rank processes torchrun started, by their RANK."""
    found = {}
    for pid in children(torchrun_pid):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((item[5:].decode() for item in environ if item.startswith(b"RANK=")), None)
        if rank is not None:
            found[rank] = pid
    return found


TORCHRUN_ENV = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


def test_outside_torchrun_or_with_its_own_rank_count_it_refuses_to_start(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert torchrun_rank.main(["--model", "m"], env={}) == 2
    assert (
        "run it under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set)"
        in capsys.readouterr().err
    )
    assert torchrun_rank.main(["--expert-parallel=2"], env=TORCHRUN_ENV) == 2
    assert "the ranks are torchrun's (WORLD_SIZE): drop --expert-parallel" in capsys.readouterr().err


@pytest.mark.slow
def test_two_torchrun_ranks_serve_what_one_process_generates(tiny_model: Path) -> None:
    offline = LLM(tiny_model, dtype="float32", enforce_eager=True)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    (wanted,) = offline.generate([PROMPT], params, use_tqdm=False)
    port = free_port()
    args = [*SERVE_ARGS, "--model", str(tiny_model), "--port", str(port)]
    with started([torchrun(1, 2, 0, free_port(), args)]) as (process,):
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 180.0, process)
        served = completion(url, PROMPT)
        metrics = samples(url)
        os.kill(rank_pids(process.pid)["0"], signal.SIGTERM)  # the server's stop, as without torchrun
        assert process.wait(60) == 0  # rank 0 drained and told rank 1 to exit; torchrun saw both succeed
    assert served["text"] == wanted.outputs[0].text
    held = {labels["rank"]: value for labels, value in metrics["moe_serve_expert_weight_bytes"]}
    assert set(held) == {"0", "1"} and held["1"] > 0


@pytest.mark.slow
def test_a_rank_killed_on_another_node_stops_rank_0_with_a_failure_status(tiny_model: Path) -> None:
    port, master_port = free_port(), free_port()
    args = [*SERVE_ARGS, "--model", str(tiny_model), "--port", str(port)]
    nodes = [torchrun(2, 1, node, master_port, args) for node in (0, 1)]
    with started(nodes, capture_first=True) as (node0, node1):
        wait_ready(f"http://127.0.0.1:{port}", 180.0, node0)
        (worker,) = rank_pids(node1.pid).values()
        streaming, result = threading.Event(), {}  # type: ignore[var-annotated]
        client = threading.Thread(target=stream_tokens, args=(port, 1800, streaming, result))
        client.start()
        assert streaming.wait(30)  # killed mid-stream: rank 0 is stepping, in the MoE layers' all-reduce
        killed = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        _, stderr = node0.communicate(timeout=60)
        took = time.monotonic() - killed
        client.join(30)
    assert node0.returncode != 0  # torchrun reports rank 0's failure
    assert took < 10.0, took
    assert "the engine stopped" in result["error"]["message"]  # type: ignore[index]
    gone = "the engine process died (an expert-parallel engine rank is gone (the connection to [127.0.0.1]:"
    assert gone in stderr


@pytest.mark.slow
def test_a_sigterm_to_torchrun_stops_every_rank_without_a_rank_failure(tiny_model: Path) -> None:
    port = free_port()
    args = [*SERVE_ARGS, "--model", str(tiny_model), "--port", str(port)]
    with started([torchrun(1, 2, 0, free_port(), args)], capture_first=True) as (process,):
        wait_ready(f"http://127.0.0.1:{port}", 180.0, process)
        ranks = rank_pids(process.pid)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks.values())
    # torchrun itself ends with status 1 on SIGTERM (its SignalException); its ranks stopped cleanly: rank 1
    # waited for rank 0's drain instead of dying under it.
    assert "got signal: 15" in stderr
    assert "engine rank is gone" not in stderr and "the engine process died" not in stderr
    assert "exitcode" not in stderr  # torchrun reports no rank that failed
