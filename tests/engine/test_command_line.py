"""Every command line: --version, defaults shown in --help, moe-serve's help without importing torch, distinct
and consistent flag names with the old spellings kept, and bad values refused naming the flag."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.command_line import version

COMMANDS = {
    "moe-generate": "engine.cli",
    "moe-random-checkpoint": "engine.random_checkpoint",
    "moe-train": "training.cli",
    "moe-serve": "server.cli",
    "moe-prune": "pruning.cli",
    "moe-loadtest": "loadtests.sweep",
}


def run(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_answers_version_and_shows_defaults(name: str) -> None:
    done = run(COMMANDS[name], "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"{name} {version()}"
    subcommand = {"moe-train": ["train"], "moe-prune": ["plan"]}.get(name, [])  # their options live there
    assert "(default:" in run(COMMANDS[name], *subcommand, "--help").stdout


def test_serve_help_is_quick_and_shows_the_defaults_but_never_the_api_key() -> None:
    probe = (
        "import sys; from server.cli import parse_args\n"
        "try:\n    parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip().endswith("False")  # --help answered without importing torch
    help_text = run("server.cli", "--help", env={**os.environ, "MOE_SERVE_API_KEY": "s3cret"}).stdout
    assert "TCP port to bind (default: 8000)" in help_text and "in bytes" in help_text
    assert "s3cret" not in help_text


def test_serve_flags_are_distinct_consistent_and_checked() -> None:
    from server.cli import parse_args

    assert parse_args(["--experts-per-token", "2"]).top_k == 2
    assert parse_args(["--top-k", "3"]).top_k == 3  # the old spelling still works
    assert str(parse_args(["models/tiny-lbl"]).model) == "models/tiny-lbl"  # as vllm serve MODEL
    for flags, message in (
        (["--experts-per-token", "0"], "must be at least 1, got 0"),
        (["--top-k", "two"], "'two' is not a whole number"),
        (["models/a", "--model", "models/b"], "two models given"),
        (["--live-pruning-releases-experts"], "needs --enable-admin-api"),
    ):
        done = run("server.cli", *flags)
        assert done.returncode == 2 and message in done.stderr


def test_prune_and_loadtest_take_the_servers_flag_names() -> None:
    from loadtests.sweep import parse_args as loadtest_args
    from pruning.cli import build_parser

    plan = build_parser().parse_args(["plan", "m", "--prune-level", "0.25", "--prune-method", "reap", "-o", "p.json"])
    old = build_parser().parse_args(["plan", "m", "--level", "0.25", "--method", "reap", "-o", "p.json"])
    assert (plan.level, plan.method) == (old.level, old.method) == (0.25, "reap")
    new = loadtest_args(["--threads", "3", "--prune-levels", "0,0.5", "--prune-methods", "reap"])
    legacy = loadtest_args(["--server-threads", "3", "--levels", "0,0.5", "--methods", "reap"])
    assert (new.server_threads, new.levels, new.methods) == (legacy.server_threads, legacy.levels, legacy.methods)
