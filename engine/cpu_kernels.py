"""The CPU kernels of cpu_kernels.c, built on first use and called through ctypes.

The library is compiled with the system's C compiler (-O3 -march=native -fopenmp) into
$MOE_SERVE_CACHE/kernels/<hash>/, keyed by the source, the compiler and this CPU's flags, so later starts load
it at once. Without a compiler (or when the build fails, or with MOE_SERVE_CPU_KERNELS=0) `kernels()` is None
and callers use torch's ops, the reference the kernels are tested against.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import torch

from engine.paths import cache_root

logger = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_I64, _F32, _INT, _PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
# Up to how many rows the bf16 linears kernel beats torch's bf16 linear on a model's projections and LM head; above
# it torch's blocked GEMM wins. Measured on 8 layers' q/k/v and o of hidden 512, two threads (docs/performance.md):
# with vdpbf16ps alone up to 64 rows on the AMD machine (up to 8 on the Intel VM, which has AMX); on AMX tiles up to
# 512 (0.65 ms against torch's 1.74 at 32 rows, 6.5 against 8.6 at 512).
LINEAR_ROWS = 64
LINEAR_ROWS_AMX = 512
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


class CpuKernels:
    """The loaded library, with typed entry points taking torch tensors."""

    def __init__(self, library: Path) -> None:
        self.lib = ctypes.CDLL(str(library))
        for dtype in SUFFIX.values():
            expert = getattr(self.lib, f"expert_mlp_{dtype}")
            expert.argtypes = [_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _INT]
            expert.restype = None
            attention = getattr(self.lib, f"paged_decode_attention_{dtype}")
            attention.argtypes = [_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR] + [_I64] * 6 + [_F32, _PTR, _INT]
            attention.restype = None
        self.lib.linears_bf16.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _INT, _INT]
        self.lib.linears_bf16.restype = _INT
        self.lib.argmax_rows_f32.argtypes = [_PTR, _I64, _I64, _PTR, _INT]
        self.lib.argmax_rows_f32.restype = None
        self.lib.amx_enabled.argtypes = [_INT]
        self.lib.amx_enabled.restype = _INT
        self._amx = bool(self.lib.amx_enabled(-1))

    def use_amx(self, on: bool | None = None) -> bool:
        """Whether the bf16 expert kernel runs on the CPU's AMX tiles (where the CPU has them and the OS grants
        their state; MOE_SERVE_AMX=0 starts with them off); `on` switches them, for side-by-side measurements and
        tests of both paths. The answer is kept here (asked on every projection and LM-head call), so switch
        through this method only."""
        if on is not None:
            self._amx = bool(self.lib.amx_enabled(int(on)))
        return self._amx

    def linear_rows(self) -> int:
        """Up to how many rows `linear` and `linears` serve a projection or LM head here (callers use torch's
        linear above)."""
        return LINEAR_ROWS_AMX if self.use_amx() else LINEAR_ROWS

    def expert_mlp(
        self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
    ) -> torch.Tensor:
        """sum over slots of weights[t, s] * expert[expert_ids[t, s]](x[t]), [T, H] float32. x [T, H] in the
        experts' dtype (f32 or bf16); expert_ids int64 and weights float32 [T, k], contiguous (ids outside the
        E rows of w13 [E, 2I, H] and w2 [E, H, I] are dropped slots)."""
        tokens, hidden_size = x.shape
        out = torch.zeros(tokens, hidden_size, dtype=torch.float32)
        fn = self.lib.expert_mlp_bf16 if w13.dtype == torch.bfloat16 else self.lib.expert_mlp_f32
        fn(x.data_ptr(), expert_ids.data_ptr(), weights.data_ptr(), tokens, expert_ids.shape[1], w13.shape[0],
           hidden_size, w2.shape[2], w13.data_ptr(), w2.data_ptr(), out.data_ptr(), torch.get_num_threads())  # fmt: skip
        return out

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """x [T, K] @ weight [N, K].T for bf16 x and weight (contiguous): fp32 holding bf16-rounded values, as
        torch's bf16 linear then .float() gives; None where the kernel does not fit (another dtype, this CPU,
        these shapes), for the caller's torch fallback."""
        return self._linears(x, (weight,), torch.float32)

    def linears(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """x @ [w.T for w in weights] side by side, [T, sum of N] in bf16 (as torch's bf16 linear rounds), one
        call for all of them: x [T, K] and each w [N, K] bf16 and contiguous; None where the kernel does not
        fit (a weight that is not contiguous included)."""
        return self._linears(x, weights, torch.bfloat16)

    def _linears(
        self, x: torch.Tensor, weights: tuple[torch.Tensor, ...], out_dtype: torch.dtype
    ) -> torch.Tensor | None:
        if x.dtype != torch.bfloat16 or any(w.dtype != torch.bfloat16 or not w.is_contiguous() for w in weights):
            return None
        pointers, widths, width = self._weight_arrays(tuple((w.data_ptr(), w.shape[0]) for w in weights))
        out = torch.empty(x.shape[0], width, dtype=out_dtype)
        done = self.lib.linears_bf16(x.data_ptr(), x.shape[0], x.shape[1], len(weights), pointers, widths,
                                     out.data_ptr(), out_dtype == torch.bfloat16, torch.get_num_threads())  # fmt: skip
        return out if done else None

    @staticmethod
    @lru_cache(maxsize=1024)
    def _weight_arrays(weights: tuple[tuple[int, int], ...]) -> tuple[Any, Any, int]:
        """The C arrays of weight addresses and widths, made once per set of weights (a layer's serve every
        step; the arrays hold only the key's own values, so a reused address cannot make one stale)."""
        pointers = (_PTR * len(weights))(*(pointer for pointer, _ in weights))
        widths = (_I64 * len(weights))(*(width for _, width in weights))
        return pointers, widths, sum(width for _, width in weights)

    def argmax(self, x: torch.Tensor) -> torch.Tensor | None:
        """x.argmax(dim=-1) of fp32 rows x [B, V] (contiguous, V >= 1), the same indices (the first of equals, the
        first NaN); None for anything else."""
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] == 0 or not x.is_contiguous():
            return None
        out = torch.empty(x.shape[0], dtype=torch.int64)
        self.lib.argmax_rows_f32(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads())
        return out

    def paged_decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
        new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """q [B, Hq, D] against caches [blocks, block_size, Hkv, D], all contiguous in the cache's dtype; block
        tables [B, W] and seq_lens [B] int64. With new_kv = (k, v, slots), the new keys and values are
        written into their slots first (one call for the decode-only step). Returns [B, Hq, D]."""
        batch, heads, dim = q.shape
        if block_tables.shape[0] < batch or seq_lens.shape[0] < batch or not block_tables.is_contiguous():
            raise ValueError(f"{batch} queries need as many block-table rows and lengths (contiguous)")
        out = torch.empty_like(q)
        k, v, slots = (t.data_ptr() for t in new_kv) if new_kv is not None else (None, None, None)
        fn = (
            self.lib.paged_decode_attention_bf16
            if k_cache.dtype == torch.bfloat16
            else self.lib.paged_decode_attention_f32
        )
        fn(q.data_ptr(), k, v, k_cache.data_ptr(), v_cache.data_ptr(), slots, block_tables.data_ptr(),
           seq_lens.data_ptr(), batch, block_tables.shape[1], k_cache.shape[1], heads, k_cache.shape[2], dim,
           scale, out.data_ptr(), torch.get_num_threads())  # fmt: skip
        return out


_lock = threading.Lock()


def build_library(compiler: str, source: Path, flags: list[str], key: str = "") -> Path:
    """source compiled by compiler with flags into a shared library under $MOE_SERVE_CACHE/kernels/<hash>/, the
    hash over the source, the flags, the compiler's version, this CPU's flags and `key`; built once, then found.
    Threads and processes building the same library wait for the first (a file lock beside it), so the server
    can start a build early (engine/prebuild.py) that its engine process then finds. Raises OSError or
    CalledProcessError (with the compiler's stderr) when the build fails."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256("\n".join([source.read_text(), " ".join(flags), version, _cpu_flags(), key]).encode())
    library = cache_root() / "kernels" / digest.hexdigest()[:16] / source.with_suffix(".so").name
    library.parent.mkdir(parents=True, exist_ok=True)
    with _lock, open(library.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or with the process
        if not library.is_file():
            with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
                built = Path(scratch) / library.name
                subprocess.run([compiler, str(source), "-o", str(built), *flags], check=True, capture_output=True,
                               text=True)  # fmt: skip
                built.replace(library)  # atomic: a reader sees all of it or none
    return library


def build_kernels() -> Path | None:
    """The kernels' library, built if needed (the half of kernels() that compiles); None where they are off (no
    C compiler, MOE_SERVE_CPU_KERNELS=0). Raises as build_library does."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if os.environ.get("MOE_SERVE_CPU_KERNELS", "1") == "0" or compiler is None:
        return None
    return build_library(compiler, SOURCE, [*FLAGS, "-lm"])


@cache
def kernels() -> CpuKernels | None:
    """The CPU kernels, built if needed; None (logged once) when they cannot be built here."""
    try:
        library = build_kernels()
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else exc
        logger.warning("the CPU kernels could not be built (%s): torch's ops are used instead", detail)
        return None
    if library is None:
        if os.environ.get("MOE_SERVE_CPU_KERNELS", "1") != "0":
            logger.warning("no C compiler found: the CPU kernels are off, torch's ops are used instead")
        return None
    return CpuKernels(library)
