"""Where moe-serve finds what it ships (the bundled models and corpus splits) and keeps what it builds or
computes once: $MOE_SERVE_CACHE, default ~/.cache/moe-serve.

Calibrations and plans (pruning), the built CPU kernels and inductor's compiled artifacts live under it, so a
restart reuses them. Light on purpose: the engine package sets inductor's cache directory from it on import,
before torch's compiler is first imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1]  # a checkout (or an editable install)
INSTALLED_DATA = Path(sys.prefix) / "share" / "moe-serve"  # where a wheel puts the bundled files


def bundled(relative: str) -> Path:
    """A file or directory moe-serve ships (models/tiny-simbal, data/corpus): from the source checkout, else
    from where a wheel installs it; the checkout's path when neither has it (errors name that)."""
    for root in (SOURCE_ROOT, INSTALLED_DATA):
        if (root / relative).exists():
            return root / relative
    return SOURCE_ROOT / relative


def cache_root() -> Path:
    return Path(os.environ.get("MOE_SERVE_CACHE", Path.home() / ".cache" / "moe-serve"))


def use_inductor_cache() -> None:
    """Point inductor's cache at cache_root()/inductor unless the user chose one (it reads the variable once).
    Child processes inherit the variable, as they would without this: inductor writes it into os.environ itself
    when it first uses its cache, so a child meant to have a cache of its own must drop it."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
