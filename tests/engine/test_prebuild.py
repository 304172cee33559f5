"""Start-up builds (engine/prebuild.py): a library two processes build at once is compiled once, and the
prebuild leaves the engine's libraries where the engine then finds them."""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from engine.prebuild import _prebuild

SOURCE = "int answer(void) { return 42; }\n"
BUILD = """
import sys
from pathlib import Path
from engine.cpu_kernels import build_library
print(build_library(sys.argv[1], Path(sys.argv[2]), ["-O1", "-shared", "-fPIC"]))
"""


def test_processes_building_one_library_at_once_compile_it_once(tmp_path: Path) -> None:
    """Two processes (the server's prebuild and its engine, or two servers) build the same library at once: the
    file lock makes the second wait and find the first one's, so the compiler runs once and both load it."""
    log = tmp_path / "compiler-runs"
    compiler = tmp_path / "cc"
    compiler.write_text(f'#!/bin/sh\n[ "$1" = --version ] || {{ echo run >> {log}; sleep 1; }}\nexec gcc "$@"\n')
    compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
    source = tmp_path / "answer.c"
    source.write_text(SOURCE)
    env = {**os.environ, "MOE_SERVE_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-c", BUILD, str(compiler), str(source)]
    builders = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    paths = {builder.communicate(timeout=120)[0].strip() for builder in builders}
    assert all(builder.returncode == 0 for builder in builders)
    assert log.read_text().count("run") == 1
    (library,) = paths
    assert Path(library).is_relative_to(tmp_path / "cache" / "kernels")
    assert ctypes.CDLL(library).answer() == 42


@pytest.mark.slow  # compiles both libraries from scratch (~10 s)
def test_the_prebuild_leaves_the_libraries_the_engine_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.cpu_kernels import build_kernels
    from engine.native_ops import build_native_ops

    monkeypatch.setenv("MOE_SERVE_CACHE", str(tmp_path))
    _prebuild("cpu", probe_compiler=False, precompile_headers=False)
    built = sorted(path.name for path in (tmp_path / "kernels").glob("*/*.so"))
    assert built == ["cpu_kernels.so", "native_ops.so"]
    assert {build_kernels(), build_native_ops()} == set((tmp_path / "kernels").glob("*/*.so"))  # found, not rebuilt
