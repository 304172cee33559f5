"""A graph dynamo traced, called without dynamo: its inputs taken from the forward's inputs (tensors and their
symbolic sizes), refused for inputs unlike those it was traced for, and not offered when the graph reads
anything else. The graphs here run as dynamo's FX modules (no inductor, so the test is quick), but one: a C++
wrapper built in the background, which the call that compiled it does not wait for. The engine's compiled graphs
are checked against eager in tests/engine/test_compiled.py."""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch._inductor.config
from torch._inductor.codecache import CppWrapperCodeCache

from engine.direct_graph import DirectGraph, GraphCatcher, InnerCall, direct_graph


def caught(forward: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], dynamic: bool) -> DirectGraph | None:
    """What direct_graph makes of the graph dynamo traces from forward(None, *inputs)."""
    graphs: list[DirectGraph | None] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[object]) -> Callable[..., object]:
        graphs.append(direct_graph(gm, gm.forward, inputs))
        return gm.forward

    fresh = types.FunctionType(forward.__code__.replace(), forward.__globals__)  # a code object dynamo has not seen
    torch.compile(fresh, backend=backend, dynamic=dynamic, fullgraph=True)(None, *inputs)
    assert len(graphs) == 1
    return graphs[0]


def gather_scaled(model: object, *inputs: torch.Tensor) -> torch.Tensor:
    ids, table = inputs
    return table[ids].sum(-1) * ids.shape[0]


def test_a_dynamic_graph_takes_tensors_and_their_sizes_from_the_inputs() -> None:
    table = torch.arange(40.0).reshape(10, 4)
    graph = caught(gather_scaled, (torch.tensor([1, 2, 3]), table), dynamic=True)
    assert graph is not None
    assert any(dim >= 0 for _, dim in graph.slots)  # the token count is a graph input of its own
    for ids in (torch.tensor([4, 0, 9, 9, 2, 7]), torch.tensor([5, 6])):
        assert graph.accepts((ids, table))
        assert torch.equal(graph((ids, table)), gather_scaled(None, ids, table))
    assert not graph.accepts((torch.tensor([1.0, 2.0]), table))  # another dtype
    assert not graph.accepts((torch.tensor([[1, 2]]), table))  # another rank
    assert not graph.accepts((torch.tensor([1, 2]),))  # an input missing


def test_a_static_graph_refuses_other_sizes() -> None:
    table = torch.arange(40.0).reshape(10, 4)
    graph = caught(gather_scaled, (torch.tensor([1, 2, 3]), table), dynamic=False)
    assert graph is not None
    assert all(dim < 0 for _, dim in graph.slots)
    ids = torch.tensor([7, 8, 9])
    assert graph.accepts((ids, table)) and torch.equal(graph((ids, table)), gather_scaled(None, ids, table))
    assert not graph.accepts((torch.tensor([1, 2]), table))
    assert not graph.accepts((ids, table[:5]))


WEIGHT = torch.ones(4, 2)


def reads_a_global(model: object, *inputs: torch.Tensor) -> torch.Tensor:
    return inputs[0] @ WEIGHT


def two_outputs(model: object, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return inputs[0] + 1, inputs[0] * 2


def test_no_direct_call_for_a_graph_reading_more_than_its_inputs_or_returning_more() -> None:
    x = torch.ones(3, 4)
    assert caught(reads_a_global, (x,), dynamic=False) is None  # the weight is a graph input too
    assert caught(two_outputs, (x,), dynamic=False) is None  # type: ignore[arg-type]


@pytest.mark.slow  # inductor compiles a C++ wrapper (g++)
def test_a_wrapper_built_in_the_background_leaves_the_compiling_call_eager_until_it_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # nothing built before: the build must run
    catcher, gate = GraphCatcher(), threading.Event()
    fresh = types.FunctionType(gather_scaled.__code__.replace(), gather_scaled.__globals__)
    compiled = torch.compile(fresh, backend=catcher, dynamic=False, fullgraph=True)
    table, ids = torch.arange(40.0).reshape(10, 4), torch.tensor([1, 2, 3])
    with ThreadPoolExecutor(max_workers=1) as builds, torch._inductor.config.patch(cpp_wrapper=True):
        builds.submit(gate.wait, 300)  # the wrapper's build queues behind this until the gate opens
        catcher.builds, catcher.inputs = builds, (ids, table)
        try:
            first = compiled(None, ids, table)  # compiles; its own run is eager: the build has not started
            assert len(catcher.pending) == 1 and not catcher.pending[0].done()
            assert "load_pybinding" not in CppWrapperCodeCache.__dict__  # inductor's own loader is back
        finally:
            gate.set()
        catcher.pending[0].result()
    assert torch.equal(first, gather_scaled(None, ids, table))
    assert catcher.caught is not None
    other = torch.tensor([9, 0, 4])
    assert torch.equal(catcher.caught((other, table)), gather_scaled(None, other, table))  # the built wrapper
    assert torch.equal(compiled(None, other, table), gather_scaled(None, other, table))


def scaled_linear(model: torch.nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    return model(inputs[0]) * 2.0


@pytest.mark.slow  # inductor compiles a C++ wrapper (g++)
def test_a_second_graph_like_the_first_but_for_its_weights_reuses_the_built_wrapper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frozen weights are constants of the graph; inductor names each constant's tensor object in its C++
    wrapper's source, which would make every compile of the same graph a g++ build of its own."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x = torch.randn(3, 32)
    results, built = [], []
    options = {"cpp_wrapper": True, "freezing": True}
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = torch.nn.Linear(32, 16).eval()
        fresh = types.FunctionType(scaled_linear.__code__.replace(), scaled_linear.__globals__)
        with torch.no_grad(), torch._inductor.config.patch(options):
            compiled = torch.compile(fresh, backend=GraphCatcher(), dynamic=False, fullgraph=True)
            results.append((compiled(model, x), scaled_linear(model, x)))
            results.append((compiled(model, x + 1), scaled_linear(model, x + 1)))
        built.append(sorted(tmp_path.rglob("*.main.so")))
    assert len(built[0]) == 1 and built[1] == built[0]  # one wrapper, built once
    for got, expected in results:  # each graph computes with its own weights
        torch.testing.assert_close(got, expected)
    assert not torch.allclose(results[0][1], results[2][1])  # and they differ


class Counted(torch.nn.Module):
    """A frozen linear that counts its calls in a buffer, in place (as the engine's expert-load counters)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(32, 16)
        self.register_buffer("calls", torch.zeros(1, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.linear(x)


@pytest.mark.slow  # inductor compiles the graphs
@pytest.mark.parametrize("dynamic", [False, True])
def test_a_static_graph_is_called_beneath_aot_autograds_wrappers_once_watched(
    dynamic: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first two direct calls watch the wrappers call inductor's compiled graph; later calls skip them and
    pass the same arguments (the buffer the graph updates in place included). A dynamic graph, whose compiled
    call also takes a size, keeps calling through them."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = Counted().eval()
    catcher = GraphCatcher()
    fresh = types.FunctionType(scaled_linear.__code__.replace(), scaled_linear.__globals__)
    x = torch.randn(3, 32)
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        catcher.inputs = (x,)
        torch.compile(fresh, backend=catcher, dynamic=dynamic, fullgraph=True)(model, x)
        graph = catcher.caught
        assert graph is not None and graph.inner is not None and graph.inner.watching
        for step in range(4):
            y = torch.randn(3, 32)
            torch.testing.assert_close(graph((y,)), model.linear(y) * 2.0)
            trusted = not dynamic and step >= InnerCall.WATCHES - 1  # two watched calls agreed
            assert (graph.inner.plan is not None) == trusted and graph.inner.watching == (not dynamic and not trusted)
        assert model.calls.item() == 5  # the compiling call and four direct ones, each counted once
