"""tcmalloc for the processes that run the engine.

A decode step makes thousands of small allocations (inductor's buffers, the dispatcher's C++ objects, Python's
own), and glibc's malloc spent 6% of a batch-1 step's main thread on them; with tcmalloc preloaded the same steps
measured 1.14x faster at batch 1 and 1.23x at batch 32 (docs/performance.md, stop 33), as vLLM's CPU backend
advises. A library is preloaded only into a process about to start: the server starts its engine process with it
(server/engine_start.py), and the benchmarks run themselves again with it, so that they measure what serves.
Where tcmalloc is not installed (Debian: libtcmalloc-minimal4) everything runs on glibc's malloc as before;
MOE_SERVE_TCMALLOC=0 turns it off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
DIRECTORIES = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# tcmalloc reports every allocation above 1 GiB on stderr; a KV cache is one.
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 50)}
_RAN_AGAIN = "MOE_SERVE_TCMALLOC_RAN_AGAIN"


def tcmalloc_path() -> str | None:
    """The installed tcmalloc library to preload; None where there is none or MOE_SERVE_TCMALLOC=0."""
    if os.environ.get("MOE_SERVE_TCMALLOC", "1") == "0":
        return None
    return next((str(p) for d in DIRECTORIES for name in LIBRARIES if (p := Path(d, name)).is_file()), None)


def loaded(maps: Path = Path("/proc/self/maps")) -> bool:
    """Whether tcmalloc is mapped into the process whose memory map `maps` is (this one by default)."""
    try:
        return "libtcmalloc" in maps.read_text()
    except OSError:
        return False


def with_tcmalloc(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a process to start with tcmalloc preloaded (before anything else LD_PRELOAD names); `env` as it
    is where tcmalloc is not installed, turned off, or already preloaded there."""
    path = tcmalloc_path()
    preload = env.get("LD_PRELOAD", "")
    if path is None or path in preload.replace(":", " ").split():
        return dict(env)
    return {**QUIET, **env, "LD_PRELOAD": f"{path} {preload}".strip()}


@contextmanager
def preloading_tcmalloc() -> Iterator[None]:
    """Processes started inside this block preload tcmalloc (multiprocessing's spawn takes this process's
    environment); the environment is as it was afterwards."""
    changed = {name: value for name, value in with_tcmalloc(os.environ).items() if os.environ.get(name) != value}
    saved = {name: os.environ.get(name) for name in changed}
    os.environ.update(changed)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_again_with_tcmalloc() -> None:
    """Replace this program with itself started again with tcmalloc preloaded, where tcmalloc is installed and not
    loaded yet (a benchmark's entry point, before it measures anything); once only, whatever the loader did."""
    env = with_tcmalloc(os.environ)
    if loaded() or env.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD") or os.environ.get(_RAN_AGAIN):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**env, _RAN_AGAIN: "1"})
