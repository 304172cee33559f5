"""A non-editable install: the wheel, installed into a fresh virtual environment and run from a directory outside
the checkout, finds its bundled model and corpus splits (engine/paths.py) and serves a completion."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import httpx
import pytest

from engine.paths import SOURCE_ROOT
from server.launch import free_port, stop, wait_ready

pytestmark = pytest.mark.slow


def test_the_wheel_serves_its_bundled_model_from_anywhere(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
         str(SOURCE_ROOT)],
        check=True, timeout=600,
    )  # fmt: skip
    (wheel,) = wheels.glob("moe_serve-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # The new environment borrows this one's dependencies (torch and the rest; nothing is downloaded), not its
    # editable moe-serve: a directory a .pth file adds is not searched for further .pth files.
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    borrowed = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    (Path(purelib) / "borrowed.pth").write_text("\n".join(borrowed) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = "import engine, corpus.splits as s, engine.config as c; "
    probe += "print(engine.__file__, c.DEFAULT_MODEL_DIR, len(s.read_split('validation')))"
    where = subprocess.run(
        [str(python), "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert not where[0].startswith(str(SOURCE_ROOT))  # the installed package, not the checkout
    assert where[1] == str(venv / "share" / "moe-serve" / "models" / "tiny-simbal") and int(where[2]) > 0
    port = free_port()
    server = subprocess.Popen(
        [str(venv / "bin" / "moe-serve"), "--port", str(port), "--threads", "1", "--enforce-eager"],
        cwd=elsewhere, env=env,
    )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}", 300, server)
        body = {"prompt": "And the king said", "max_tokens": 4, "ignore_eos": True}
        response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
    finally:
        stop(server, 60)
