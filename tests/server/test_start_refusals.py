"""moe-serve refuses what its flags and the model's config.json cannot serve, and a port in use, before it starts
anything: at once (torch never imported), exit status 1, the reason on stderr, nothing bound."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.launch import free_port

# Runs moe-serve's main in a fresh interpreter and fails it if anything imported torch before it returned.
REFUSE = (
    "import sys, server.cli; code = server.cli.main(sys.argv[1:]); assert 'torch' not in sys.modules; sys.exit(code)"
)


def refused(*args: str) -> str:
    """moe-serve's stderr for args, which it must refuse before starting anything."""
    done = subprocess.run(
        [sys.executable, "-c", REFUSE, *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1, done.stderr
    return done.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prune-level", "0.9"], "leaving fewer than top_k"),
        (["--prune-plan", "/nonexistent/plan.json"], "plan file does not exist"),
        (["--prune-level", "0.25", "--prune-plan", "x.json"], "not both"),
        (["--route-threshold", "1.5"], "threshold must be in [0, 1)"),
        (["--prune-level", "1.5"], "level must be in [0, 1)"),
        (["--prune-level", "0.25", "--calibration-files", "/nonexistent/traffic.txt"], "calibration files not found"),
        (["--top-k", "99"], "at most the model's"),
    ],
)
def test_impossible_pruning_is_refused_before_anything_starts(tiny_model: Path, flags: list[str], message: str) -> None:
    port = free_port()
    stderr = refused("--model", str(tiny_model), "--port", str(port), *flags)
    assert "moe-serve: error: " in stderr and message in stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health")


def test_a_bad_model_config_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    stderr = refused("--model", str(tmp_path), "--port", str(free_port()))
    assert str(tmp_path / "config.json") in stderr and "not valid JSON" in stderr


def test_a_port_in_use_is_refused(tiny_model: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stderr = refused("--model", str(tiny_model), "--port", str(port))
    assert f"cannot listen on 127.0.0.1:{port}" in stderr
