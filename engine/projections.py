"""Dense projections that share an input (a layer's q, k and v; an MLP's gate and up), as one op.

Serving a bf16 model on a CPU with bf16 dot products, a decode step's projections are few-row, narrow GEMMs:
inductor's C++ GEMM template ran them at 20-50 GFLOP/s here and torch's bf16 linear not much faster, where the
CPU kernel (engine/cpu_kernels.c, linears_bf16) reaches 100-150 and reads the shared input once for all of
them (docs/performance.md). The `moe_serve::dense_linears` op picks per call: the kernel up to kernel_rows()
rows, torch's linear above (prefill, where torch's blocked GEMM is faster), so one compiled graph serves both;
where the C++ ops are built its twin `moe_serve::cpu_dense_linears` (engine/native_ops.cpp) is called instead, so
the graph's calls do not cross into Python. Batch-1 steps and the routers' gates go through the op too: a bf16 graph
then holds no GEMM of inductor's, so freezing prepacks no weight into an mkldnn tensor, which inductor's FX graph
cache cannot store, and a restart loads both compiled graphs from the cache instead of compiling them again
(docs/performance.md, time to ready). Elsewhere (training, other dtypes, CUDA, no kernels) the layers run as they
are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.cpu_kernels import LINEAR_ROWS, kernels
from engine.native_ops import dense_linears_shape, native_ops_loaded
from engine.op_library import define_op


def kernel_rows() -> int:
    """Up to how many rows the dense_linears ops (and the LM head) use the CPU kernel here."""
    cpu = kernels()
    return cpu.linear_rows() if cpu is not None else LINEAR_ROWS


def dense_linears(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """x [T, K] times every weight [N_i, K] (transposed), side by side: [T, sum of N_i] in x's dtype."""
    cpu = kernels() if x.device.type == "cpu" and x.shape[0] <= kernel_rows() else None
    out = cpu.linears(x.contiguous(), tuple(weights)) if cpu is not None else None
    if out is not None:
        return out
    return torch.cat([F.linear(x, w) for w in weights], dim=-1)


define_op("dense_linears(Tensor x, Tensor[] weights) -> Tensor", dense_linears, dense_linears_shape)


def _one_row_traced(x: torch.Tensor, layers: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    """A batch-1 step's projections as the CPU graph traces them where the kernel's op does not serve them (fp32):
    one GEMM over the weights side by side, which
    freezing (engine/compiled.py) folds into one constant when the graph compiles, so a step runs one small GEMM
    instead of three (batch-1 steps 1.03x in bf16, 1.02x in fp32 here); a CPU compile without freezing would
    concatenate them on every call (the same values, slower). Layers with and without bias mixed, or gradients on,
    trace layer by layer."""
    biases = [layer.bias for layer in layers]
    if len(layers) == 1 or torch.is_grad_enabled() or len({b is None for b in biases}) > 1:
        return tuple(layer(x) for layer in layers)
    weight = torch.cat([layer.weight for layer in layers])
    out = F.linear(x, weight, None if biases[0] is None else torch.cat(biases))  # type: ignore[arg-type]
    return tuple(out.split([layer.weight.shape[0] for layer in layers], dim=-1))


def project(x: torch.Tensor, layers: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    """Each layer applied to x [T, K]: through the dense_linears op where the CPU kernel may serve it (bf16
    weights on a CPU, no gradients; the op falls back to torch where the kernel is missing), else layer by
    layer (a compiled batch-1 step's as one GEMM, _one_row_traced)."""
    weights = [layer.weight for layer in layers]
    if (
        x.device.type != "cpu"
        or x.dtype != torch.bfloat16
        or torch.is_grad_enabled()
        or any(w.dtype != torch.bfloat16 or not w.is_contiguous() for w in weights)
    ):
        if x.shape[0] == 1 and x.device.type == "cpu" and torch.compiler.is_compiling():
            return _one_row_traced(x, layers)
        return tuple(layer(x) for layer in layers)
    ops = torch.ops.moe_serve
    out = (ops.cpu_dense_linears if native_ops_loaded() else ops.dense_linears)(x, weights)
    parts = out.split([w.shape[0] for w in weights], dim=-1)
    return tuple(part if layer.bias is None else part + layer.bias for part, layer in zip(parts, layers))
