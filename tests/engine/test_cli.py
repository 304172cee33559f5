"""The moe-generate and moe-random-checkpoint commands, run as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], check=False, capture_output=True, text=True, timeout=300)


def test_random_checkpoint_then_generate(tmp_path: Path) -> None:
    made = run(
        "engine.random_checkpoint",
        str(tmp_path / "m"),
        "--arch",
        "olmoe",
        "--layers",
        "2",
        "--hidden",
        "64",
        "--experts",
        "4",
        "--expert-width",
        "32",
    )
    assert made.returncode == 0, made.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "m").iterdir()}
    generated = run("engine.cli", str(tmp_path / "m"), "--prompt", "Hello", "--max-tokens", "5")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("Hello") and "[5 tokens, finish_reason=length]" in generated.stdout


def test_generate_reports_a_bad_model_clearly(tmp_path: Path) -> None:
    result = run("engine.cli", str(tmp_path / "absent"), "--prompt", "x")
    assert result.returncode == 2
    assert "moe-generate: error:" in result.stderr and "model directory does not exist" in result.stderr
