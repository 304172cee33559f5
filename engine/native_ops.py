"""The serving ops on the CPU, served from C++: `moe_serve::cpu_paged_attention`, `moe_serve::cpu_layer_experts`,
`moe_serve::cpu_dense_linears` and `moe_serve::cpu_count_routes`.

A compiled batch-1 decode step of the bundled model spent about a third of its time in the Python interpreter, most
of it in the two Python ops every layer calls (engine/attention.py, engine/moe.py): the graph's C++ crossed into
Python for each call, and so did a many-token step's projections (engine/projections.py). engine/native_ops.cpp
registers C++ kernels for CPU twins of those ops on torch's dispatcher (through torch's stable C ABI, so it builds
in about two seconds with the system's g++, cached like the C kernels). They read the step's paged metadata and
each layer's caches and experts from two plain structs this module fills when a step enters its forward context
(`StepContext`, `ExpertContext`), run the C kernels of engine/cpu_kernels.c, and hand what they do not serve
(prefill chunks, other dtypes, other MoE backends, more rows than the linears kernel takes) to the Python ops, the
reference. Without g++, the C kernels or with MOE_SERVE_NATIVE_OPS=0, `native_ops()` is None and the layers call
the Python ops, as before.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.cpu_kernels import LINEAR_ROWS, LINEAR_ROWS_AMX, SUFFIX, CpuKernels, build_library, kernels
from engine.op_library import define_native_op, returns_nothing

if TYPE_CHECKING:
    from engine.attention import PagedStep
    from engine.moe import SparseMoE

logger = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("native_ops.cpp")
_TORCH = Path(torch.__file__).parent
FLAGS = ["-O2", "-std=c++17", "-fPIC", "-shared", f"-I{_TORCH / 'include'}", f"-L{_TORCH / 'lib'}", "-ltorch_cpu",
         "-lc10", f"-Wl,-rpath,{_TORCH / 'lib'}"]  # fmt: skip
DTYPES = {dtype: code for code, dtype in enumerate(SUFFIX)}  # float32 0, bfloat16 1, as native_ops.cpp reads them
_I64, _I32, _PTR = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p


class StepContext(ctypes.Structure):
    """A step's paged metadata and caches as cpu_paged_attention reads them (native_ops.cpp: StepContext)."""

    _fields_ = [
        ("num_decodes", _I64),
        ("table_width", _I64),
        ("block_size", _I64),
        ("kv_heads", _I64),
        ("head_dim", _I64),
        ("num_layers", _I64),
        ("dtype", _I32),
        ("threads", _I32),
        ("slots", _PTR),
        ("block_tables", _PTR),
        ("seq_lens", _PTR),
        ("k_caches", ctypes.POINTER(_PTR)),
        ("v_caches", ctypes.POINTER(_PTR)),
    ]


class LayerExperts(ctypes.Structure):
    """One layer's expert weights as cpu_layer_experts reads them (native_ops.cpp: LayerExperts)."""

    _fields_ = [
        ("w13", _PTR),
        ("w2", _PTR),
        ("rows", _PTR),
        ("num_ids", _I64),
        ("num_rows", _I64),
        ("hidden", _I64),
        ("intermediate", _I64),
        ("dtype", _I32),
    ]


class ExpertContext(ctypes.Structure):
    _fields_ = [("num_layers", _I64), ("layers", ctypes.POINTER(LayerExperts))]


def _experts_of(block: SparseMoE | None) -> LayerExperts:
    """The layer's experts where the C++ op can serve them (the "auto" backend over contiguous CPU weights in a
    kernel dtype), else an empty entry that sends its calls to the reference."""
    if block is None or block.backend != "auto":
        return LayerExperts()
    w13, w2, rows = block.experts.gate_up_proj, block.experts.down_proj, block.expert_rows
    if (
        w13.device.type != "cpu"
        or w13.dtype not in DTYPES
        or w2.dtype != w13.dtype
        or not (w13.is_contiguous() and w2.is_contiguous())
        or (rows is not None and (rows.device.type != "cpu" or not rows.is_contiguous()))
    ):
        return LayerExperts()
    return LayerExperts(
        w13.data_ptr(), w2.data_ptr(), None if rows is None else rows.data_ptr(), 0 if rows is None else len(rows),
        w13.shape[0], w13.shape[2], w2.shape[2], DTYPES[w13.dtype],
    )  # fmt: skip


class NativeOps:
    """The loaded library: sets the forward context the C++ ops read, and counts what they served."""

    def __init__(self, library: Path, cpu: CpuKernels) -> None:
        self.lib = ctypes.CDLL(str(library))
        address = ctypes.cast
        kernel_table = [address(getattr(cpu.lib, name), _PTR) for name in (
            "paged_decode_attention_f32", "paged_decode_attention_bf16", "expert_mlp_f32", "expert_mlp_bf16",
            "linears_bf16", "amx_enabled")]  # fmt: skip
        self.lib.moe_serve_native_init.argtypes = [_PTR] * len(kernel_table) + [_I64, _I64]
        if self.lib.moe_serve_native_init(*kernel_table, LINEAR_ROWS, LINEAR_ROWS_AMX) != 0:
            raise OSError("registering the C++ serving ops failed")
        self.lib.moe_serve_set_step_context.argtypes = [_PTR]
        self.lib.moe_serve_set_expert_context.argtypes = [_PTR]
        self._caches: tuple[list[torch.Tensor], Any, Any] | None = None
        self._experts: tuple[Sequence[SparseMoE | None], int, ExpertContext, Any] | None = None

    def served(self) -> dict[str, int]:
        """Calls served in C++ and handed to the reference, per op, since the process started."""
        counts = (_I64 * 8)()
        self.lib.moe_serve_served(counts)
        names = ("attention", "attention_reference", "experts", "experts_reference", "dense_linears",
                 "dense_linears_reference", "count_routes", "count_routes_reference")  # fmt: skip
        return dict(zip(names, counts))

    def clock_kernels(self, on: bool) -> None:
        """Time the kernels the C++ ops call (engine/breakdown.py reads kernel_seconds around each forward)."""
        self.lib.moe_serve_clock_kernels(int(on))

    def kernel_seconds(self) -> tuple[float, float]:
        """Seconds in the attention and the expert kernel while clocked, since the process started."""
        seconds = (ctypes.c_double * 2)()
        self.lib.moe_serve_kernel_seconds(seconds)
        return seconds[0], seconds[1]

    def step_context(self, step: PagedStep) -> StepContext:
        """What cpu_paged_attention reads of a step (decode rows; -1 when the step has prefill chunks, which
        the reference serves). It holds the arrays it points at; the caller keeps it alive while it is set."""
        caches = step.kv_caches
        if self._caches is None or self._caches[0] is not caches:  # one list per model runner, made once
            keys = (_PTR * len(caches))(*(c[0].data_ptr() for c in caches))
            values = (_PTR * len(caches))(*(c[1].data_ptr() for c in caches))
            self._caches = (caches, keys, values)
        _, keys, values = self._caches
        cache = caches[0]
        tables, lens = step.decode_block_tables, step.decode_seq_lens
        decode_only = (
            not step.prefills
            and tables is not None
            and lens is not None
            and cache.device.type == "cpu"
            and cache.dtype in DTYPES
            and tables.is_contiguous()
        )
        if not decode_only or tables is None or lens is None:
            return StepContext(num_decodes=-1, threads=torch.get_num_threads())  # the experts' kernel reads threads
        return StepContext(
            step.num_decodes, tables.shape[1], cache.shape[2], cache.shape[3], cache.shape[4], len(caches),
            DTYPES[cache.dtype], torch.get_num_threads(), step.slot_mapping.data_ptr(), tables.data_ptr(),
            lens.data_ptr(), keys, values,
        )  # fmt: skip

    def set_step_context(self, context: StepContext | None) -> None:
        self.lib.moe_serve_set_step_context(None if context is None else ctypes.addressof(context))

    def expert_context(self, blocks: Sequence[SparseMoE | None], generation: int) -> ExpertContext:
        """What cpu_layer_experts reads of each layer, made again for other blocks or when a layer's weights, row
        map or backend was assigned since (`generation`, engine/moe.py counts the assignments; the entry holds
        the blocks, so an identity seen here is never a freed object's). The context holds its array of layers;
        the caller keeps it alive while it is set."""
        if self._experts is None or self._experts[0] is not blocks or self._experts[1] != generation:
            layers = (LayerExperts * len(blocks))(*(_experts_of(block) for block in blocks))
            self._experts = (blocks, generation, ExpertContext(len(blocks), layers), layers)
        return self._experts[2]

    def set_expert_context(self, context: ExpertContext | None) -> None:
        self.lib.moe_serve_set_expert_context(None if context is None else ctypes.addressof(context))


def _cpu_paged_attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float) -> Any:
    return torch.empty_like(q)


def _cpu_layer_experts_shape(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, layer: int) -> Any:
    return x.new_empty(x.shape, dtype=torch.float32)


def dense_linears_shape(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """What either dense_linears op returns, for tracing: [T, sum of N_i] in x's dtype."""
    return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))


_loaded = False
_defined = False


def native_ops_loaded() -> bool:
    """Whether the C++ ops are registered: what the layers ask while torch.compile traces them (which cannot
    trace the build in native_ops(); the model runner loads them before its first forward)."""
    return _loaded


def build_native_ops() -> Path | None:
    """The C++ ops' library, built if needed (the half of native_ops() that compiles); None where they are off
    (no C++ compiler, MOE_SERVE_NATIVE_OPS=0). Raises as build_library does."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if os.environ.get("MOE_SERVE_NATIVE_OPS", "1") == "0" or compiler is None:
        return None
    return build_library(compiler, SOURCE, FLAGS, key=torch.__version__)


@cache
def native_ops() -> NativeOps | None:
    """The C++ serving ops, built and registered on first use; None (logged once) where they cannot be."""
    global _loaded, _defined
    _loaded = False
    cpu = kernels()
    if cpu is None:
        return None
    try:
        library = build_native_ops()
        if library is None:
            return None
        if not _defined:  # once per process, though a test may load the ops again (native_ops.cache_clear)
            define_native_op(
                "cpu_paged_attention(Tensor q, Tensor k, Tensor v, int layer, float scale) -> Tensor",
                _cpu_paged_attention_shape,
            )
            define_native_op(
                "cpu_layer_experts(Tensor x, Tensor expert_ids, Tensor weights, int layer) -> Tensor",
                _cpu_layer_experts_shape,
            )
            define_native_op("cpu_dense_linears(Tensor x, Tensor[] weights) -> Tensor", dense_linears_shape)
            define_native_op(
                "cpu_count_routes(Tensor(a!) counts, Tensor expert_ids, Tensor token_mask, int layer) -> ()",
                returns_nothing,
            )
            _defined = True
        ops = NativeOps(library, cpu)
        _loaded = True
        return ops
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else exc
        logger.warning("the C++ serving ops could not be built (%s): the Python ops serve every step", detail)
        return None
