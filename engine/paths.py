"""Where moe-serve keeps what it builds or computes once: $MOE_SERVE_CACHE, default ~/.cache/moe-serve.

Calibrations and plans (pruning), the built CPU kernels and inductor's compiled artifacts live under it, so a
restart reuses them. Light on purpose: the engine package sets inductor's cache directory from it on import,
before torch's compiler is first imported.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("MOE_SERVE_CACHE", Path.home() / ".cache" / "moe-serve"))


def use_inductor_cache() -> None:
    """Point inductor's cache at cache_root()/inductor unless the user chose one (it reads the variable once)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
