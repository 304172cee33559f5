"""Start-up builds (engine/prebuild.py): a library two processes build at once is compiled once, the prebuild
leaves the engine's libraries where the engine then finds them, and inductor's compiler probe runs once."""

from __future__ import annotations

import ctypes
import json
import os
import platform
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


ASK = """
import json, sys
from torch._inductor import config, cpu_vec_isa
from engine.prebuild import ask_compiler
ask_compiler()
flags = cpu_vec_isa.x86_isa_checker()
best = [str(i) for i in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(i).split())][:1]
print(json.dumps({"ok": config.cpp.vec_isa_ok, "picked": str(cpu_vec_isa.pick_vec_isa()), "best": best}))
"""


def _ask_in_a_fresh_process(cache: Path, **env: str) -> dict[str, object]:
    run = subprocess.run(
        [sys.executable, "-c", ASK], env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), **env},
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="inductor probes x86 instruction sets only")
def test_the_compiler_is_asked_once_for_the_best_instruction_set(tmp_path: Path) -> None:
    """Inductor compiles its heavy test file (ATen's vector headers) once per instruction set the CPU has;
    ask_compiler builds it for the best one only and picks the same set inductor would."""
    answer = _ask_in_a_fresh_process(tmp_path)
    heavy = [path for path in tmp_path.rglob("*.cpp") if "__avx_chk_kernel" in path.read_text()]
    assert answer["ok"] is True
    assert [answer["picked"]] == answer["best"]
    assert len(heavy) == 1


def test_a_users_vec_isa_setting_is_kept(tmp_path: Path) -> None:
    answer = _ask_in_a_fresh_process(tmp_path, TORCHINDUCTOR_VEC_ISA_OK="0")
    assert answer["ok"] is False
    assert answer["picked"] == "INVALID_VEC_ISA"
    assert not list(tmp_path.rglob("*.cpp"))
