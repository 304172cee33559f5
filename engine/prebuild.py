"""What a cold start compiles with the system's compilers besides the forward's own graphs, started early in a
background thread so that it runs beside the start-up's Python work instead of on its critical path.

Each is built once and then found: the C kernels (engine/cpu_kernels.py) and the C++ serving ops
(engine/native_ops.py) under $MOE_SERVE_CACHE; inductor's compiler probe (`ask_compiler`); and inductor's two
precompiled headers (~150 MB each, under the system's temp directory, whatever the cache). On this project's
2-core machine these cost a cold start 10 s (the libraries), 10-18 s (inductor's own probes) and 13 s (the headers)
on its critical path (docs/performance.md, time to ready). The server starts all of it in its own process as soon
as its flags are parsed (its engine process then finds them built, or waits on their file locks); every CPU engine
starts the libraries and the probe at its construction, and its first compile asks `ask_compiler` again (the
answer lives in the process).
"""

from __future__ import annotations

import functools
import logging
import platform
import subprocess
import threading
from typing import Any

logger = logging.getLogger(__name__)


@functools.cache
def start_prebuild(device: str, probe_compiler: bool, precompile_headers: bool = False) -> threading.Thread:
    """Build the C kernels and the C++ ops; with probe_compiler (the forward will be compiled) ask inductor's
    compiler probes; with precompile_headers also build inductor's precompiled headers, which compiles in this
    process (the server's, not an engine's: the engine's own compile would wait for it). In a daemon thread, once
    per process; nothing where the device resolves to a GPU. Returns the thread (joined by tests only: whoever
    needs a result builds or asks for it again, and waits on its lock)."""
    thread = threading.Thread(
        target=_prebuild, args=(device, probe_compiler, precompile_headers), name="moe-serve-prebuild", daemon=True
    )
    thread.start()
    return thread


def _prebuild(device: str, probe_compiler: bool, precompile_headers: bool) -> None:
    import torch

    from engine.cpu_kernels import build_kernels
    from engine.native_ops import build_native_ops

    if device not in ("auto", "cpu") or (device == "auto" and torch.cuda.is_available()):
        return
    try:  # first and one at a time: the engine loads them before tracing, and the start-up's Python needs a core
        build_kernels()
        build_native_ops()
    except (OSError, subprocess.CalledProcessError) as exc:  # reported where the libraries are loaded
        logger.debug("prebuilding the CPU kernels failed: %s", exc)
    if probe_compiler:
        ask_compiler()
    if probe_compiler and precompile_headers:
        try:
            _precompile_headers()
        except Exception as exc:  # noqa: BLE001 - only a head start: the engine's compile builds what is missing
            logger.debug("prebuilding inductor's precompiled headers failed: %s", exc)


def _scale_and_shift(x: Any) -> Any:
    return x * 2.0 + 1.0


def _precompile_headers() -> None:
    """Inductor's precompiled headers for its C++ wrapper and for its kernels (keyed by the compiler's flags,
    which the vector instruction set sets), built by compiling a one-line function both ways straight through
    inductor (no dynamo: nothing of it stays in this process's frames); the wrapper's first, as the engine's
    first graph has one."""
    import torch
    import torch._inductor
    import torch._inductor.config
    import torch.fx

    x = torch.ones(64, dtype=torch.bfloat16)
    for cpp_wrapper in (True, False):
        with torch._inductor.config.patch(cpp_wrapper=cpp_wrapper):
            torch._inductor.compile(torch.fx.symbolic_trace(_scale_and_shift), [x])


_asking = threading.Lock()


def ask_compiler() -> None:
    """Ask the C++ compiler once which vector instruction set it builds inductor's kernels for, here and for this
    process: the best the CPU has (a test file with ATen's vector headers, compiled and loaded as inductor does);
    if it builds, inductor is told its vector code works (`cpp.vec_isa_ok`) instead of compiling that heavy test
    file once more for every lesser set, whose flags are a subset (7 s of a core with an empty cache, 1 s
    without: docs/performance.md, time to ready); its small checks of single instructions still run. Nothing
    off x86, where the user set TORCHINDUCTOR_VEC_ISA_OK, or where this torch lacks the probe; a set that fails
    leaves inductor to probe them all. Once per process; a second caller waits for the first's answer."""
    with _asking:
        try:
            _ask_compiler_once()
        except Exception as exc:  # noqa: BLE001 - only a shortcut: inductor asks on its own as before
            logger.debug("asking the compiler once failed: %s", exc)


@functools.cache
def _ask_compiler_once() -> None:
    if platform.machine() not in ("x86_64", "AMD64"):
        return
    from torch._inductor import config, cpu_vec_isa

    check = getattr(cpu_vec_isa.VecISA, "check_build", None)
    test_file = getattr(cpu_vec_isa.VecISA, "_avx_code", None)
    if config.cpp.vec_isa_ok is not None or check is None or test_file is None:
        return
    cpu_flags = cpu_vec_isa.x86_isa_checker()
    wanted = [isa for isa in cpu_vec_isa.supported_vec_isa_list if all(f in cpu_flags for f in str(isa).split())]
    if wanted and check(wanted[0], test_file):
        config.cpp.vec_isa_ok = True
    cpu_vec_isa.valid_vec_isa_list()  # the small checks; the answer stays in the process
