"""The serving forward: the model eager (`enforce_eager`, the reference), or compiled with torch.compile.

What the compiler cannot trace, because its work depends on the step's data, sits behind two custom ops, one node
each per layer: paged attention (engine/attention.py) and the expert dispatch (engine/moe.py). Both read what they
serve from the forward context, not from graph constants: the KV caches, and the layer's expert weights
(`serving_experts`, set around every call here), so live pruning that releases and reads back experts recompiles
nothing (on CUDA the captured graphs, which hold the weights' addresses, are captured again). The rest of the model
(embeddings, norms, projections, RoPE, routing, the expert-load counters) becomes a graph. Two graphs, compiled
separately: one for one-token steps (batch-1 decode, where fixed costs rule) and one with a symbolic token count for
every other step, decode or prefill; once compiled, each is called as inductor returned it, without torch.compile's
frame machinery, and the one-token graph beneath AOT autograd's runtime wrappers too (engine/direct_graph.py). On
CPU both run as inductor's fused C++, frozen (weights as constants, prepacked) with their GEMMs (fp32 only: bf16
graphs call the CPU kernel's op) autotuned among inductor's C++ GEMM templates, which nearly halved a batch-1 step
here and cut a batch-8 step by a fifth; the one-token graph has a C++ wrapper, whose g++ build (7-10 s of one core)
runs in the background at warm-up while the many-token graph compiles. On CUDA in bf16, decode-only steps are
padded up to the next size of a ladder and replayed from CUDA graphs captured at warm-up (the step's metadata lives
in static device buffers that every replay reads).

Compiled artifacts are cached by inductor under $MOE_SERVE_CACHE/inductor (engine/paths.py). A bf16 graph on the CPU
holds no GEMM of inductor's (the projections, gates and LM head run the CPU kernel, engine/projections.py), so its
FX graph cache stores both graphs whole and a restart loads them (warm-up 16 -> 8 s here); an fp32 graph's
weights are prepacked into mkldnn tensors, which that cache cannot store, so a restart compiles it again and finds
only its kernels' builds. Routing policies are traced into the graph: changing them drops the compiled graphs (they recompile on
the next step) and the captured CUDA graphs. Live pruning tables (engine/expert_tables.py) are graph inputs instead."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
import torch._inductor.config
from torch._inductor import select_algorithm
from torch._inductor.codegen.common import KernelTemplate

from engine.attention import PAGED, PagedStep, paged_step
from engine.direct_graph import DirectGraph, GraphCatcher
from engine.model import MoEForCausalLM
from engine.moe import SparseMoE, serving_experts
from engine.prebuild import ask_compiler
from engine.token_routing import NUM_CONTROLS, PADDING_ROW

if TYPE_CHECKING:
    from engine.model_runner import StepBuffers

logger = logging.getLogger(__name__)
# Decode batch sizes captured as CUDA graphs (vLLM's ladder shape); a step is padded up to the next one.
CUDA_GRAPH_SIZES = (1, 2, 4, 8, *range(16, 257, 16), *range(288, 1025, 32))
# Inductor's settings for the CPU graphs (see the module docstring); measured in docs/performance.md.
CPU_OPTIONS = {
    "freezing": True,
    "max_autotune": True,
    # Inductor's own CPP GEMM templates only: as fast per step as also trying ATen's, and a cold start 33 s
    # sooner (docs/performance.md, time to ready).
    "max_autotune_gemm_backends": "CPP",
    "max_autotune_report_choices_stats": False,  # autotuning's tables would fill the server's log
    "autotune_num_choices_displayed": 0,
}
# The one-token graph also gets a C++ wrapper: its ~60 kernel calls then cost no Python each, 0.1 ms of a 0.75 ms
# batch-1 step here. Not the many-token graph: a C++ wrapper is compiled afresh every start (its source names the
# frozen weights by object id, so inductor's cache never hits), ~6-8 s a graph, for a few percent of a larger step.
ONE_TOKEN_OPTIONS = {"cpp_wrapper": True}


def _cxx_compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _one_token_forward(model: MoEForCausalLM, *inputs: torch.Tensor) -> torch.Tensor:
    """The serving forward of a one-token step (its own function: torch.compile keeps a cache per function).
    inputs: input_ids, positions, token_mask, route_controls (StepBuffers.inputs), then the live expert tables
    if the model has them (engine.expert_tables)."""
    input_ids, positions, token_mask, route_controls, *tables = inputs
    return model(input_ids, positions, PAGED, token_mask, route_controls, (tables[0], tables[1]) if tables else None)


def _many_token_forward(model: MoEForCausalLM, *inputs: torch.Tensor) -> torch.Tensor:
    """The serving forward of every other step."""
    input_ids, positions, token_mask, route_controls, *tables = inputs
    return model(input_ids, positions, PAGED, token_mask, route_controls, (tables[0], tables[1]) if tables else None)


def _parse_once(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Inductor's C++ GEMM templates parse their jinja source anew for every kernel they render, though a parsed
    template renders any number of times: parsed once per source while a graph compiles, both graphs compile
    2.3-2.9 s sooner here (of ~50 s cold; docs/performance.md, time to ready)."""
    return functools.cache(parse)


def _own_copy(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The function with a code object of its own: torch.compile keeps its compiled graphs (and its recompile
    limit, 8) per code object, so every engine in a process compiling the one module function would share them,
    and the ninth engine's compile would fail. A copy per engine is its own cache, dropped with it."""
    code = forward.__code__.replace()
    return types.FunctionType(code, forward.__globals__, forward.__name__, forward.__defaults__, forward.__closure__)


@contextlib.contextmanager
def _cpu_settings(one_token: bool) -> Iterator[None]:
    """Inductor's settings while a CPU graph compiles (patched globally for the call: passed to torch.compile as
    options, freezing did not take effect), with autotuning's report to stderr off, the C++ GEMM templates
    parsed once (_parse_once) and the compiler asked once (engine.prebuild.ask_compiler)."""
    ask_compiler()  # before inductor asks on its own, which would probe every instruction set
    printing = select_algorithm.PRINT_AUTOTUNE
    parse = KernelTemplate.__dict__.get("_template_from_string")
    select_algorithm.PRINT_AUTOTUNE = False
    if isinstance(parse, staticmethod):  # see _parse_once
        KernelTemplate._template_from_string = staticmethod(_parse_once(parse.__func__))  # type: ignore[method-assign,assignment]
    try:
        with torch._inductor.config.patch({**CPU_OPTIONS, **(ONE_TOKEN_OPTIONS if one_token else {})}):
            yield
    finally:
        select_algorithm.PRINT_AUTOTUNE = printing
        if isinstance(parse, staticmethod):
            KernelTemplate._template_from_string = parse  # type: ignore[method-assign,assignment]


class CompiledForward:
    """Calls the model's serving forward: compiled unless enforce_eager, CUDA graphs for decode on CUDA.

    The caches have one block more than the block manager hands out: padded rows of a replayed CUDA graph
    write their keys there.
    """

    def __init__(
        self,
        model: MoEForCausalLM,
        kv_caches: list[torch.Tensor],
        max_num_seqs: int,
        max_blocks: int,
        enforce_eager: bool,
    ) -> None:
        self.model = model
        self.moe_blocks = tuple(layer.mlp if isinstance(layer.mlp, SparseMoE) else None for layer in model.model.layers)
        self.kv_caches = kv_caches
        self.device = model.lm_head.weight.device
        self.enforce_eager = enforce_eager
        self._compiled: dict[bool, Callable[..., torch.Tensor]] = {}
        self._catchers: dict[bool, GraphCatcher] = {}
        # The compiled graphs, called without dynamo's frame machinery (engine/direct_graph.py).
        self._direct: dict[bool, DirectGraph] = {}
        self.ladder = [s for s in CUDA_GRAPH_SIZES if s <= max_num_seqs]
        if self.ladder and self.ladder[-1] < max_num_seqs:
            self.ladder.append(max_num_seqs)
        self.max_blocks = max_blocks
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._static: dict[str, torch.Tensor] = {}
        # Graphs compiled since the last reset, by whether the step has one token (torch specializes it). Calls
        # of a compiled kind skip the guard checks: nothing the guards watch changes without a reset().
        self._compiled_kinds: set[bool] = set()
        if not enforce_eager and self.device.type == "cpu" and not _cxx_compiler():
            logger.warning("no C++ compiler found (g++ or $CXX): inductor cannot compile the forward, running eagerly")
            self.enforce_eager = True
        if not self.enforce_eager:
            self._compile()

    def _compile(self) -> None:
        """The two graphs, keyed by whether the step has one token; each compiles on its first call."""
        self._catchers = {True: GraphCatcher(), False: GraphCatcher()}
        self._direct = {}
        self._compiled = {
            True: torch.compile(_own_copy(_one_token_forward), dynamic=False, fullgraph=True, backend=self._catchers[True]),
            False: torch.compile(_own_copy(_many_token_forward), dynamic=True, fullgraph=True, backend=self._catchers[False]),
        }  # fmt: skip

    def _compile_call(self, kind: bool, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """A call through torch.compile that may compile: the graph it compiles is then called directly."""
        catcher = self._catchers[kind]
        catcher.inputs, catcher.caught = inputs, None
        try:
            with self._compiling(kind):
                hidden = self._compiled[kind](self.model, *inputs)
        finally:
            catcher.inputs = None
        if catcher.caught is not None:
            self._direct[kind] = catcher.caught
        self._compiled_kinds.add(kind)
        return hidden

    @contextlib.contextmanager
    def _compiling(self, one_token: bool) -> Iterator[None]:
        """Settings while a graph compiles: module floats (norm epsilons) as constants, not graph inputs, and on
        the CPU inductor's (_cpu_settings)."""
        cpu = _cpu_settings(one_token) if self.device.type == "cpu" else contextlib.nullcontext()
        with torch._dynamo.config.patch(specialize_float=True), cpu:
            yield

    @property
    def direct_kinds(self) -> set[bool]:
        """The graphs (by whether the step has one token) called without torch.compile's frame machinery."""
        return set(self._direct)

    @property
    def inner_kinds(self) -> set[bool]:
        """The graphs called beneath AOT autograd's runtime wrappers (engine/direct_graph.py, InnerCall)."""
        return {
            kind for kind, graph in self._direct.items() if graph.inner is not None and graph.inner.plan is not None
        }

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether warm-up captures decode as CUDA graphs: on CUDA where every layer's expert dispatch is
        capturable (SparseMoE.dispatch_syncs_host)."""
        return (
            not self.enforce_eager
            and self.device.type == "cuda"
            and not any(block is not None and block.dispatch_syncs_host for block in self.moe_blocks)
        )

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Hidden states of a step whose attention context is set (engine.attention.paged_step). inputs:
        input_ids, positions, token_mask, route_controls, each the step's rows."""
        if self.model.expert_tables is not None:  # graph inputs, not frozen constants: switching recompiles nothing
            inputs = (*inputs, *self.model.expert_tables.inputs())
        with serving_experts(self.moe_blocks):
            if not self._compiled:
                return _many_token_forward(self.model, *inputs)
            kind = inputs[0].shape[0] == 1
            direct = self._direct.get(kind)
            if direct is not None and direct.accepts(inputs):
                return direct(inputs)
            if kind not in self._compiled_kinds:
                return self._compile_call(kind, inputs)
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return self._compiled[kind](self.model, *inputs)
            except RuntimeError as exc:  # dynamo refuses to recompile without guards: the call ran nothing
                if "skip_guard_eval_unsafe" not in str(exc):
                    raise
            logger.warning("a %s step's inputs differ from those its graph was compiled for: compiling again",
                           "one-token" if kind else "many-token")  # fmt: skip
            return self._compile_call(kind, inputs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """compute_logits of the rows given (fp32). Eager in every mode: compiled, it measured no faster."""
        return self.model.compute_logits(hidden)

    def replays(self, num_decodes: int) -> bool:
        """Whether a decode-only step of this many sequences runs from a captured CUDA graph."""
        return bool(self._graphs) and num_decodes <= self.ladder[-1]  # captured only where uses_cuda_graphs

    def replay_decode(self, buffers: StepBuffers, num_decodes: int) -> torch.Tensor:
        """Copy the step's decode rows into the static buffers (padding the rest), replay the graph of the next
        ladder size, and return the real rows' hidden states."""
        size = next(s for s in self.ladder if s >= num_decodes)
        static = self._static
        for name in ("input_ids", "positions", "slot_mapping", "token_mask", "route_controls", "seq_lens"):
            static[name][:num_decodes].copy_(getattr(buffers, name)[:num_decodes], non_blocking=True)
        static["block_tables"][:num_decodes].copy_(buffers.block_tables[:num_decodes], non_blocking=True)
        self._pad(num_decodes, size)
        graph, hidden = self._graphs[size]
        graph.replay()
        return hidden[:num_decodes]

    def _pad(self, start: int, end: int) -> None:
        """Padding rows: token 0 at position 0, written to the spare block, attending to itself, not counted."""
        if end > start:
            static = self._static
            for name in ("input_ids", "positions", "token_mask", "block_tables"):
                static[name][start:end] = 0
            static["route_controls"][start:end] = static["padding_row"]  # on the device: no host copy per step
            static["slot_mapping"][start:end] = self.spare_slot
            static["seq_lens"][start:end] = 1
            static["block_tables"][start:end, 0] = self.kv_caches[0].shape[1] - 1

    @property
    def spare_slot(self) -> int:
        return (self.kv_caches[0].shape[1] - 1) * self.kv_caches[0].shape[2]

    def warm_up(self, buffers: StepBuffers, progress: Callable[[str], None] | None = None) -> float:
        """Compile now rather than on the first requests: a one-token and a two-token decode step through the
        compiled forward (the engine's warm-up request then runs a prefill through the same graphs), then
        (CUDA) one captured graph per ladder size."""
        if self.enforce_eager:
            return 0.0
        say = progress or (lambda message: logger.info(message))
        start = time.perf_counter()
        say(f"compiling the forward ({self.device.type}); cached under {os.environ['TORCHINDUCTOR_CACHE_DIR']}")
        # The one-token graph's C++ wrapper builds while the many-token graph compiles (GraphCatcher.builds).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-serve-wrapper-build") as builds:
            self._catchers[True].builds = builds
            try:
                for tokens in (1, 2)[: buffers.seq_lens.shape[0]]:  # decode rows: at most max_num_seqs of them
                    self._dummy_step(buffers, tokens)
                    say(f"compiled a {tokens}-token step ({time.perf_counter() - start:.1f} s)")
                for build in self._catchers[True].pending:
                    build.result()
            finally:
                self._catchers[True].builds, self._catchers[True].pending = None, []
        if self.uses_cuda_graphs:
            self._capture_ladder(say)
        seconds = time.perf_counter() - start
        say(f"compilation done in {seconds:.1f} s")
        return seconds

    def _dummy_step(self, buffers: StepBuffers, tokens: int) -> None:
        """A step of `tokens` decode rows, laid out in the step buffers as a real step is, that only touches the
        spare block and counts no routing."""
        spare_block = self.kv_caches[0].shape[1] - 1
        for name in ("input_ids", "positions", "token_mask"):
            getattr(buffers, name)[:tokens] = 0
        buffers.route_controls[:tokens] = torch.tensor(PADDING_ROW)
        buffers.slot_mapping[:tokens] = self.spare_slot
        buffers.block_tables[:tokens, 0] = spare_block
        buffers.seq_lens[:tokens] = 1
        step = PagedStep(
            kv_caches=self.kv_caches,
            slot_mapping=buffers.slot_mapping[:tokens].to(self.device),
            num_decodes=tokens,
            decode_block_tables=buffers.block_tables[:tokens].to(self.device),
            decode_seq_lens=buffers.seq_lens[:tokens].to(self.device),
            decode_width=1,
            prefills=(),
        )
        with torch.inference_mode(), paged_step(step):
            # Made as ModelRunner.execute makes a step's inputs (inside inference mode: on CUDA `.to` then gives
            # inference tensors, which dynamo's guards tell apart from normal ones), so no real step recompiles.
            inputs = [x[:tokens].to(self.device) for x in buffers.inputs()]
            self(*inputs)

    @torch.inference_mode()
    def _capture_ladder(self, say: Callable[[str], None]) -> None:
        """The static buffers (inference tensors, as a real step's inputs are) and a CUDA graph per ladder size."""
        largest = self.ladder[-1]
        self._static = {
            name: torch.zeros(largest, dtype=torch.long, device=self.device)
            for name in ("input_ids", "positions", "slot_mapping", "token_mask", "seq_lens")
        }
        self._static["block_tables"] = torch.zeros(largest, self.max_blocks, dtype=torch.long, device=self.device)
        self._static["route_controls"] = torch.zeros(largest, NUM_CONTROLS, device=self.device)
        self._static["padding_row"] = torch.tensor(PADDING_ROW, device=self.device)
        self._pad(0, largest)
        pool = None
        for size in reversed(self.ladder):  # largest first, so smaller graphs reuse its memory pool
            self._graphs[size] = self._capture(size, pool)
            pool = self._graphs[size][0].pool()
        say(f"captured {len(self.ladder)} CUDA graphs for decode batches {self.ladder[0]}..{largest}")

    @torch.inference_mode()
    def _capture(self, size: int, pool: Any) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        static = self._static
        step = PagedStep(
            kv_caches=self.kv_caches,
            slot_mapping=static["slot_mapping"][:size],
            num_decodes=size,
            decode_block_tables=static["block_tables"][:size],
            decode_seq_lens=static["seq_lens"][:size],
            decode_width=self.max_blocks,
            prefills=(),
        )
        inputs = tuple(static[name][:size] for name in ("input_ids", "positions", "token_mask", "route_controls"))
        with paged_step(step):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up the allocator and any lazy initialization off the graph
                    self(*inputs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self(*inputs)
        return graph, hidden

    def experts_moved(self) -> None:
        """Expert weights were freed or read back: CUDA graphs captured their old addresses, so they are captured
        again now (the compiled graphs read the weights from the forward context and stay)."""
        if self._graphs:
            self._graphs.clear()
            self._capture_ladder(logger.info)

    def reset(self) -> None:
        """Drop what was specialized on the model's routing: compiled graphs recompile on the next call, and
        CUDA graphs are captured again at the next warm-up (until then decode runs through the forward)."""
        if self.enforce_eager:
            return
        self._graphs.clear()
        self._compiled_kinds.clear()
        self._compile()  # new code objects: an empty cache, and the other engines in the process keep theirs
