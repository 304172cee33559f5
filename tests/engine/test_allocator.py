"""tcmalloc preloaded into the processes that run the engine (engine/allocator.py), where it is installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import allocator

INSTALLED = allocator.tcmalloc_path() is not None
needs_tcmalloc = pytest.mark.skipif(not INSTALLED, reason="tcmalloc is not installed (Debian: libtcmalloc-minimal4)")
PROBE = "from engine.allocator import loaded, run_again_with_tcmalloc\n{}print(loaded())"


def _probe(env: dict[str, str], run_again: bool = False) -> str:
    code = PROBE.format("run_again_with_tcmalloc()\n" if run_again else "")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


def test_the_environment_preloads_it_first_once_and_not_when_turned_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    library = tmp_path / "libtcmalloc_minimal.so.4"
    library.write_bytes(b"")
    monkeypatch.setattr(allocator, "DIRECTORIES", (str(tmp_path),))
    env = allocator.with_tcmalloc({"LD_PRELOAD": "/opt/other.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == f"{library} /opt/other.so" and env["PATH"] == "/bin"
    assert env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == str(1 << 50)
    assert allocator.with_tcmalloc(env) == env  # already there: nothing added twice
    monkeypatch.setenv("MOE_SERVE_TCMALLOC", "0")
    assert allocator.with_tcmalloc({"PATH": "/bin"}) == {"PATH": "/bin"}
    monkeypatch.setattr(allocator, "DIRECTORIES", (str(tmp_path / "none"),))
    monkeypatch.delenv("MOE_SERVE_TCMALLOC")
    assert allocator.with_tcmalloc({"PATH": "/bin"}) == {"PATH": "/bin"}  # not installed


@needs_tcmalloc
def test_a_process_started_with_that_environment_runs_on_it() -> None:
    plain = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    assert _probe(plain) == "False"
    assert _probe(allocator.with_tcmalloc(plain)) == "True"


@needs_tcmalloc
def test_a_benchmark_runs_itself_again_on_it_once() -> None:
    plain = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    assert _probe(plain, run_again=True) == "True"
    assert _probe({**plain, "MOE_SERVE_TCMALLOC": "0"}, run_again=True) == "False"
