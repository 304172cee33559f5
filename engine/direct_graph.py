"""Compiled graphs called without dynamo's frame machinery.

torch.compile runs a compiled function through dynamo's frame hook on every call: the hook, the cache lookup and
the bytecode that gathers the graph's inputs cost 0.1 ms of a 0.8 ms batch-1 decode step here, and a many-token
step 0.3 ms more (docs/performance.md). The serving forward is traced whole (fullgraph) and its graph reads
nothing but the forward's inputs, so once compiled it can be called as inductor returned it: `GraphCatcher` is
the torch.compile backend that compiles with inductor and keeps, beside the callable, where each of the graph's
inputs comes from (one of the forward's tensors, or one of their sizes). A call whose inputs do not look like
those the graph was compiled for (dtype, rank, a size the graph did not leave symbolic) goes through
torch.compile as before; the guards dynamo would check besides (strides, relations between symbolic sizes)
hold by construction of the step's inputs (engine/model_runner.py: contiguous rows, one token count).

Beneath the callable inductor returns lie AOT autograd's runtime wrappers (input and output fix-ups, grad mode,
metrics), which a graph like ours, with no output aliasing an input and its buffer updates done in place, does
not need: 35-45 us of a batch-1 step here. On the CPU, `InnerCall` watches two calls through them, learns what they
pass to inductor's compiled call (the forward's tensors, and constants such as the expert-load counters), and from
then on calls it directly; where a watched call shows any fix-up (an output replaced, an argument that is neither an
input nor a tensor of its own, such as a size), it keeps calling through them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any

import torch
from torch._inductor.codecache import CppWrapperCodeCache
from torch._inductor.compile_fx import compile_fx, compile_fx_inner

# How dynamo names a graph input taken from the forward's `*inputs`: the tensor, or one of its sizes.
_INPUT_SOURCE = re.compile(r"L\['inputs'\]\[(\d+)\](?:\.size\(\)\[(\d+)\])?")


class InnerCall:
    """Inductor's compiled call of one graph (the OutputCode compile_fx_inner returned), called without the
    wrappers above it once two watched calls have shown the same way of calling it (see the module docstring): a
    wrapper that passed a fresh copy of an input would show a different tensor the second time.

    ready: whether the compiled call is the one to watch (a C++ wrapper built in the background is not yet)."""

    WATCHES = 2

    def __init__(self, code: Any, ready: Callable[[], bool]) -> None:
        self.code = code
        self.ready = ready
        self.watching = True
        self._seen: list[list[int | torch.Tensor]] = []
        # Per argument of the compiled call: the index of the forward input passed there, or the tensor itself.
        self.plan: list[int | torch.Tensor] | None = None

    def watch(self, outer: Callable[[], Any], inputs: Sequence[torch.Tensor]) -> Any:
        """outer() (the call through the wrappers), learning how it calls the compiled graph; its result."""
        call = self.code.current_callable
        seen: list[Any] = []

        def watching(args: list[Any]) -> Any:
            seen.append(list(args))
            seen.append(call(args))
            return seen[-1]

        self.code.current_callable = watching
        try:
            result = outer()
        finally:
            self.code.current_callable = call
        plan = _call_plan(seen[0], inputs) if len(seen) == 2 and _passed_through(seen[1], result) else None
        if plan is None or (self._seen and not _same_plan(plan, self._seen[0])):
            self.watching = False  # called through the wrappers from now on
        else:
            self._seen.append(plan)
            if len(self._seen) == self.WATCHES:
                self.plan, self.watching = plan, False
        return result

    def __call__(self, inputs: Sequence[torch.Tensor]) -> Any:
        assert self.plan is not None
        return self.code.current_callable([inputs[a] if isinstance(a, int) else a for a in self.plan])


def _same_plan(a: list[int | torch.Tensor], b: list[int | torch.Tensor]) -> bool:
    """Whether two watched calls passed the same inputs in the same places and the very same other tensors."""
    return len(a) == len(b) and all(x is y if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def _passed_through(inner: Any, outer: Any) -> bool:
    """Whether the wrappers returned the compiled call's outputs themselves."""
    return (
        isinstance(inner, (list, tuple))
        and isinstance(outer, (list, tuple))
        and len(inner) == len(outer)
        and all(a is b for a, b in zip(inner, outer))
    )


def _call_plan(args: list[Any], inputs: Sequence[torch.Tensor]) -> list[int | torch.Tensor] | None:
    """Each argument as the index of the forward input passed as it, or a tensor of its own (a constant the
    wrappers hold, sharing no storage with an input); None if any argument is neither."""
    plan: list[int | torch.Tensor] = []
    storages = {x.untyped_storage().data_ptr() for x in inputs}
    for arg in args:
        index = next((i for i, x in enumerate(inputs) if arg is x), None)
        if index is not None:
            plan.append(index)
        elif isinstance(arg, torch.Tensor) and arg.untyped_storage().data_ptr() not in storages:
            plan.append(arg)
        else:
            return None
    return plan


@dataclass(frozen=True)
class DirectGraph:
    """An inductor-compiled graph and how to call it from the forward's inputs.

    slots: per graph input, (index into the forward's inputs, the size taken of it or -1 for the tensor).
    signature: per forward input, its dtype and shape, None where the graph left that size symbolic.
    """

    fn: Callable[..., Any]
    slots: tuple[tuple[int, int], ...]
    signature: tuple[tuple[torch.dtype, tuple[int | None, ...]], ...]
    inner: InnerCall | None = None  # inductor's call beneath fn's wrappers, where it can be called directly

    def accepts(self, inputs: Sequence[torch.Tensor]) -> bool:
        """Whether these inputs are like those the graph was compiled for."""
        if len(inputs) != len(self.signature):
            return False
        for x, (dtype, shape) in zip(inputs, self.signature):
            if x.dtype != dtype or len(x.shape) != len(shape):
                return False
            if any(fixed is not None and size != fixed for size, fixed in zip(x.shape, shape)):
                return False
        return True

    def __call__(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        inner = self.inner
        if inner is not None and inner.plan is not None:
            return inner(inputs)[0]

        def outer() -> Any:
            return self.fn(*[inputs[i] if dim < 0 else inputs[i].shape[dim] for i, dim in self.slots])

        if inner is not None and inner.watching and inner.ready():
            return inner.watch(outer, inputs)[0]
        return outer()[0]


def _slot(node: torch.fx.Node) -> tuple[int, int] | None:
    """Where a graph input comes from, if it is one of the forward's inputs or one of their sizes (read from the
    source dynamo records on each placeholder; a graph without that record is never called directly)."""
    graph_arg = node.meta.get("grapharg")
    source = getattr(graph_arg, "source", None)
    if source is None:
        return None
    name = source.name() if callable(source.name) else source.name
    match = _INPUT_SOURCE.fullmatch(str(name))
    if match is None:
        return None
    return int(match[1]), -1 if match[2] is None else int(match[2])


def direct_graph(
    gm: torch.fx.GraphModule, fn: Callable[..., Any], inputs: Sequence[torch.Tensor], inner: InnerCall | None = None
) -> DirectGraph | None:
    """How to call `fn`, compiled from `gm` while the forward ran on `inputs`; None if the graph takes anything
    else (a module attribute, a global) or returns more than the hidden states."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    found = [_slot(node) for node in placeholders]
    slots = [slot for slot in found if slot is not None]
    outputs = gm.graph.output_node().args[0]
    if len(slots) != len(found) or not isinstance(outputs, (tuple, list)) or len(outputs) != 1:
        return None
    shapes: dict[int, tuple[int | None, ...]] = {i: tuple(x.shape) for i, x in enumerate(inputs)}
    for node, (i, dim) in zip(placeholders, slots):
        traced = node.meta.get("example_value")
        if dim < 0 and isinstance(traced, torch.Tensor):  # the sizes the graph left symbolic are free
            shapes[i] = tuple(None if isinstance(size, torch.SymInt) else int(size) for size in traced.shape)
    signature = tuple((x.dtype, shapes[i]) for i, x in enumerate(inputs))
    return DirectGraph(fn, tuple(slots), signature, inner)


class GraphCatcher:
    """A torch.compile backend: inductor's compile_fx, which also keeps a graph it compiles while `inputs` (the
    forward's, for the call that compiles) is set as a DirectGraph, `caught`.

    With `builds` set (an executor), a graph's C++ wrapper (the one-token graph's, engine/compiled.py) is built
    there instead of in the call that compiles, whose own run of the graph is then eager (the traced graph):
    warm-up goes on to compile the other graph in Python while g++ builds the first one's wrapper (7-10 s of
    one core here). `pending` holds those builds; a call of the compiled graph before they finish waits.
    """

    def __init__(self) -> None:
        self.inputs: Sequence[torch.Tensor] | None = None
        self.caught: DirectGraph | None = None
        self.builds: Executor | None = None
        self.pending: list[Future[None]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        codes: list[Any] = []

        def inner_compile(*args: Any, **kwargs: Any) -> Any:
            codes.append(compile_fx_inner(*args, **kwargs))
            return codes[-1]

        with _wrapper_loads(self.builds, self.pending):
            fn = compile_fx(gm, example_inputs, inner_compile=inner_compile)
        if not callable(fn):  # compile_fx's other results are for AOT export, which this never asks for
            raise TypeError(f"inductor returned {type(fn).__name__}, not a callable graph")
        pending = tuple(self.pending)

        def built() -> bool:
            return all(build.done() for build in pending)

        if self.inputs is not None:
            # CPU graphs only: on CUDA, decode replays captured CUDA graphs, and the wrappers cost nothing there.
            on_cpu = all(x.device.type == "cpu" for x in self.inputs)
            one = on_cpu and len(codes) == 1 and hasattr(codes[0], "current_callable")
            self.caught = direct_graph(gm, fn, self.inputs, InnerCall(codes[0], built) if one else None)
        if not pending:
            return fn
        return lambda *args: (fn if built() else gm)(*args)


# A line of the C++ wrapper's header naming one of the graph's constants, ending in the id of the tensor object.
_CONSTANT_LINE = re.compile(r"^(// \w+ device\(type='\w+'.*) [0-9a-f]+$", re.MULTILINE)


def _without_constant_ids(code: str) -> str:
    """A C++ wrapper's source without the ids of its constants' tensor objects. Inductor writes them into the
    header so that its code cache keeps graphs with different constants apart; the C++ never reads a constant of
    its own (the Python side passes them all in on every call, with the inputs), so without the ids the same
    graph's wrapper is the same source, and g++'s build (7-10 s of one core) is found in the cache from the
    second compile on: a restart, another engine in the process."""
    return _CONSTANT_LINE.sub(r"\1", code)


@contextlib.contextmanager
def _wrapper_loads(builds: Executor | None, pending: list[Future[None]]) -> Iterator[None]:
    """Inductor's C++ wrappers loaded from their source without constant ids (`_without_constant_ids`); with
    `builds`, lazily: built on `builds` (each build's future appended to `pending`), loaded on the first call
    (inductor's own asynchronous form of the load, which its kernels use)."""
    own = CppWrapperCodeCache.__dict__.get("load_pybinding")  # the class inherits it (torch 2.13)

    def submit(build: Callable[[], None]) -> Future[None]:
        assert builds is not None
        pending.append(builds.submit(build))
        return pending[-1]

    def load(
        cls: type[CppWrapperCodeCache], argtypes: Sequence[str], main_code: str, **kwargs: Any
    ) -> Callable[..., Any]:
        main_code = _without_constant_ids(main_code)
        if builds is None:
            return cls.load_pybinding_async(argtypes, main_code, **kwargs)()
        entry = cls.load_pybinding_async(argtypes, main_code, **{**kwargs, "submit_fn": submit})
        return lambda *call_args: entry()(*call_args)

    CppWrapperCodeCache.load_pybinding = classmethod(load)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        if own is None:
            delattr(CppWrapperCodeCache, "load_pybinding")
        else:
            CppWrapperCodeCache.load_pybinding = own  # type: ignore[method-assign]
