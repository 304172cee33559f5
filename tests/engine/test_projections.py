"""project: a layer's projections sharing an input, through the dense_linears op (its C++ twin where the C++
ops are built) where the CPU kernel serves them (bf16, no gradients, one row or more), equal to the layers applied one by one within bf16 rounding, on
both sides of the op's kernel/torch switch; and untouched layers elsewhere."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.cpu_kernels import kernels
from engine.native_ops import native_ops
from engine.projections import kernel_rows, project


def layers(bias: bool) -> tuple[nn.Linear, ...]:
    torch.manual_seed(0)
    return tuple(nn.Linear(64, n, bias=bias).bfloat16() for n in (64, 32, 32))


@pytest.mark.skipif(kernels() is None, reason="no C compiler: the CPU kernels cannot be built")
@pytest.mark.parametrize("rows", [1, 3, kernel_rows() + 5])
@pytest.mark.parametrize("bias", [False, True])
def test_projections_equal_the_layers_one_by_one(rows: int, bias: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    qkv = layers(bias)
    x = torch.randn(rows, 64).bfloat16()
    cpu, calls, native = kernels(), [], native_ops()
    linears = cpu.linears
    monkeypatch.setattr(cpu, "linears", lambda *args: calls.append(args) or linears(*args))
    before = native.served()["dense_linears"] if native is not None else 0
    with torch.inference_mode():
        got = project(x, qkv)
        expected = tuple(layer(x) for layer in qkv)
    in_cpp = native.served()["dense_linears"] - before if native is not None else 0
    assert len(calls) + in_cpp == (1 if rows <= kernel_rows() else 0)  # above kernel_rows(): torch's linear
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape and a.dtype == torch.bfloat16
        assert torch.allclose(a.float(), b.float(), atol=0.05, rtol=2e-2)


def test_training_and_fp32_run_the_layers_themselves() -> None:
    qkv = layers(bias=True)
    x = torch.randn(4, 64).bfloat16()
    trained = project(x, qkv)  # gradients on: autograd through the layers
    assert all(t.requires_grad and torch.equal(t, layer(x)) for t, layer in zip(trained, qkv))
    fp32 = tuple(layer.float() for layer in qkv)
    with torch.inference_mode():
        for rows in (x[:1], x):
            assert all(torch.equal(a, layer(rows.float())) for a, layer in zip(project(rows.float(), fp32), fp32))


@pytest.mark.parametrize("biases", [(False, False, False), (True, True, True), (True, False, True)])
def test_a_traced_one_row_step_runs_the_weights_side_by_side_as_one_gemm(biases: tuple[bool, ...]) -> None:
    """What a CPU graph traces for one row (freezing folds the concatenated weights into one constant): the
    layers' outputs, with or without biases; mixed biases go layer by layer."""
    torch.manual_seed(1)
    qkv = tuple(nn.Linear(64, n, bias=bias) for n, bias in zip((64, 32, 32), biases, strict=True))
    x = torch.randn(1, 64)
    linears: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[object]) -> Callable[..., object]:
        linears.append(sum(node.target is F.linear for node in gm.graph.nodes))
        return gm.forward

    traced = torch.compile(lambda x: project(x, qkv), backend=backend, fullgraph=True)
    with torch.inference_mode():
        got, expected = traced(x), tuple(layer(x) for layer in qkv)
    assert linears == [1 if len(set(biases)) == 1 else 3]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
