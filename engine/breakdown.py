"""Where a decode step's time goes, without a profiler's distortion: each part timed on the step's real inputs,
in real steps, and the parts checked against the whole.

A batch of B sequences is brought to pure decode in a real engine. First N plain steps are timed end to
end. Then N more steps run with a clock around each part (a perf_counter pair per part, nothing per aten op):
the host's scheduling, input preparation, update and outputs; the LM head and sampling; and the forward.
Eager, the forward is replayed part by part as the model computes it (engine/model.py): embeddings and RoPE
tables, norms and residuals, dense projections (q/k/v/o, the router), RoPE and q/k norms, the attention core
(the paged-attention op), routing (softmax, top-k, policy, load counter), the expert GEMMs (the expert op)
and the combine. Compiled, the dense parts are fused into one graph and are not separable: the two ops' kernels
are clocked inside the compiled forward and "compiled graph" is the rest of it.

Timing parts inside real steps keeps each part's caches as a step leaves them: timed back to back in
isolation, a part finds its weights in cache and the parts of a batch-1 step sum to about 40% of it; timed
after evicting the caches, to about 170%. Whatever the clocks do not cover (Python between the parts) is
reported as "unattributed", so parts + unattributed is the clocked step, compared with the plain one.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from engine import model_runner
from engine.cpu_kernels import kernels
from engine.decoding import start_decoding
from engine.llm_engine import LLMEngine
from engine.model import Attention, DecoderLayer, MoEForCausalLM, rotary_cos_sin
from engine.moe import SparseMoE, dispatch
from engine.native_ops import NativeOps, native_ops
from engine.projections import project
from engine.routing import Routing, route
from engine.sampling_params import SamplingParams

# The kernels' parts, whether the C++ ops (engine/native_ops.py) or the Python ones call them.
NATIVE_PARTS = ("attention core (kernel)", "expert GEMMs (kernel)")


@dataclass
class Breakdown:
    """Milliseconds per part of one decode step at batch `batch` (medians over steps), and the whole step."""

    batch: int
    mode: str  # "eager" or "compiled"
    parts: dict[str, float] = field(default_factory=dict)
    step_ms: float = 0.0  # a plain step, end to end
    clocked_step_ms: float = 0.0  # a step with the clocks on

    @property
    def parts_ms(self) -> float:
        return sum(self.parts.values())


class PartClock:
    """Accumulates seconds per part within a step; one sample per part per step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.samples: dict[str, list[float]] = defaultdict(list)
        self._step: dict[str, float] = defaultdict(float)

    def run(self, part: str, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args), its time added to part's."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        result = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._step[part] += time.perf_counter() - start
        return result

    def wrap(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *args: self.run(part, fn, *args)

    def end_step(self) -> float:
        total = sum(self._step.values())
        for part, seconds in self._step.items():
            self.samples[part].append(seconds)
        self._step.clear()
        return total


def decode_ready(engine: LLMEngine, prompts: list[list[int]], extra_tokens: int) -> list[str]:
    """Add one request per prompt and step until every sequence decodes one token per step."""
    params = SamplingParams(temperature=0, max_tokens=extra_tokens, ignore_eos=True)
    ids = start_decoding(engine, "breakdown", prompts, [params] * len(prompts))
    for _ in range(2):
        engine.step()
    return ids


def _timed_step(engine: LLMEngine) -> float:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    start = time.perf_counter()
    engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return time.perf_counter() - start


@torch.inference_mode()
def measure(engine: LLMEngine, prompts: list[list[int]], steps: int = 40) -> Breakdown:
    """The breakdown of a decode step of len(prompts) sequences (see the module docstring)."""
    mode = "eager" if engine.runner.forward.enforce_eager else "compiled"
    ids = decode_ready(engine, prompts, extra_tokens=2 * steps + 8)
    result = Breakdown(len(prompts), mode)
    result.step_ms = 1e3 * statistics.median(_timed_step(engine) for _ in range(steps))
    clock = PartClock(engine.device)
    clocked, unattributed = [], []
    with _clocks_on(engine, clock):
        for _ in range(steps):
            whole = _timed_step(engine)
            clocked.append(whole)
            unattributed.append(whole - clock.end_step())
    result.parts = {part: 1e3 * statistics.median(values) for part, values in clock.samples.items()}
    result.parts["unattributed (Python between parts)"] = 1e3 * statistics.median(unattributed)
    result.clocked_step_ms = 1e3 * statistics.median(clocked)
    for request_id in ids:
        engine.abort_request(request_id)
    return result


@contextmanager
def _clocks_on(engine: LLMEngine, clock: PartClock) -> Iterator[None]:
    """Clock every part of the engine's steps in the block (and restore everything after)."""
    runner, scheduler, model = engine.runner, engine.scheduler, engine.model
    saved = {
        (scheduler, "schedule"): scheduler.schedule,
        (scheduler, "update_from_output"): scheduler.update_from_output,
        (engine, "_process_outputs"): engine._process_outputs,
        (runner, "_prepare"): runner._prepare,
        (model_runner, "sample"): model_runner.sample,
    }
    scheduler.schedule = clock.wrap("host: schedule", scheduler.schedule)  # type: ignore[method-assign]
    scheduler.update_from_output = clock.wrap("host: update", scheduler.update_from_output)  # type: ignore[method-assign]
    engine._process_outputs = clock.wrap("host: detokenize, stop strings, outputs", engine._process_outputs)  # type: ignore[method-assign]
    runner._prepare = clock.wrap("host: prepare inputs", runner._prepare)  # type: ignore[method-assign]
    model_runner.sample = clock.wrap("sampling", model_runner.sample)  # type: ignore[assignment]
    forward = runner.forward
    cpu = kernels() if engine.device.type == "cpu" else None
    try:
        if forward.enforce_eager:
            runner.forward = _EagerPartsForward(model, clock)  # type: ignore[assignment]
            yield
        else:
            runner.forward = _CompiledPartsForward(forward, clock, native_ops() if cpu is not None else None)  # type: ignore[assignment]
            with _kernels_clocked(cpu, clock):
                yield
    finally:
        runner.forward = forward
        for owner, name in saved:
            if owner is not model_runner:
                delattr(owner, name)  # the instance attributes shadowing the methods go away
        setattr(model_runner, "sample", saved[(model_runner, "sample")])  # noqa: B010 (a method, restored)


@contextmanager
def _kernels_clocked(cpu: Any, clock: PartClock) -> Iterator[None]:
    """Clock the CPU kernels' calls (inside the compiled forward's ops) as the attention core, the expert GEMMs
    and the dense projections."""
    if cpu is None:
        yield
        return
    attention, experts, projections = cpu.paged_decode_attention, cpu.expert_mlp, cpu.linears
    cpu.paged_decode_attention = clock.wrap(NATIVE_PARTS[0], attention)
    cpu.expert_mlp = clock.wrap(NATIVE_PARTS[1], experts)
    cpu.linears = clock.wrap("dense projections (kernel)", projections)
    try:
        yield
    finally:
        del cpu.paged_decode_attention, cpu.expert_mlp, cpu.linears


class _CompiledPartsForward:
    """The compiled forward, clocked whole; the kernels inside it are clocked separately and subtracted (those
    the C++ ops call, engine/native_ops.py, by the ops' own clocks)."""

    def __init__(self, forward: Any, clock: PartClock, native: NativeOps | None) -> None:
        self.forward, self.clock, self.native = forward, clock, native
        self.enforce_eager = False

    def replays(self, num_decodes: int) -> bool:
        return bool(self.forward.replays(num_decodes))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.clock.run("lm head", self.forward.logits, hidden)

    def replay_decode(self, buffers: Any, num_decodes: int) -> torch.Tensor:
        return self.clock.run(
            "compiled graph (CUDA graph replay)", lambda: self.forward.replay_decode(buffers, num_decodes)
        )

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            self.native.clock_kernels(True)
            native_before = self.native.kernel_seconds()
        before = sum(self.clock._step.values())
        start = time.perf_counter()
        hidden = self.forward(*inputs)
        if self.native is not None:
            self.native.clock_kernels(False)
            for part, seconds, earlier in zip(NATIVE_PARTS, self.native.kernel_seconds(), native_before):
                self.clock._step[part] += seconds - earlier
        inner = sum(self.clock._step.values()) - before  # the kernels clocked inside
        self.clock._step["compiled graph (dense parts fused) + op glue"] += time.perf_counter() - start - inner
        return hidden


class _EagerPartsForward:
    """The eager forward, computed part by part as MoEForCausalLM.forward computes it, each part clocked."""

    def __init__(self, model: MoEForCausalLM, clock: PartClock) -> None:
        self.model, self.clock = model, clock
        self.enforce_eager = True

    def replays(self, num_decodes: int) -> bool:
        return False

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.clock.run("lm head", self.model.compute_logits, hidden)

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_mask: torch.Tensor, controls: torch.Tensor
    ) -> torch.Tensor:
        model, run = self.model, self.clock.run
        config = model.config
        x = run("embeddings + rope tables", model.model.embed_tokens, input_ids)
        rope = run("embeddings + rope tables", rotary_cos_sin, positions, config.head_dim, config.rope_theta, x.dtype)
        for layer in model.model.layers:
            assert isinstance(layer, DecoderLayer)
            attn: Attention = layer.self_attn
            h = run("norms + residuals", layer.input_layernorm, x)
            q, k, v = run("dense projections", _qkv, attn, h)
            q, k, v = run("rope + qk norm", attn.heads, q, k, v, rope)
            out = run("attention core", torch.ops.moe_serve.paged_attention, q, k, v, attn.layer_idx, attn.scale)
            (proj,) = run("dense projections", project, out.reshape(x.shape[0], -1), (attn.o_proj,))
            x = run("norms + residuals", torch.add, x, proj)
            h = run("norms + residuals", layer.post_attention_layernorm, x)
            mlp = layer.mlp
            if not isinstance(mlp, SparseMoE):
                x = run("norms + residuals", torch.add, x, run("dense projections", mlp, h))
                continue
            logits = run("dense projections", mlp.gate, h)
            routing = run("routing", _route, mlp, logits, token_mask, controls)
            experts = run("expert GEMMs", dispatch, h, routing, mlp.experts, mlp.backend)
            combined = run("combine", mlp.combine, h, experts)
            x = run("norms + residuals", torch.add, x, combined)
        return run("norms + residuals", model.model.norm, x)


def _qkv(attn: Attention, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return project(h, (attn.q_proj, attn.k_proj, attn.v_proj))


def _route(block: SparseMoE, logits: torch.Tensor, token_mask: torch.Tensor, controls: torch.Tensor) -> Routing:
    """SparseMoE.forward between the router and the dispatch."""
    routing = route(logits, block.top_k, block.norm_topk_prob, block.policy, controls, scoring=block.router_scoring)
    if block.record_load is not None:
        block.record_load(block.layer_idx, routing.expert_ids, token_mask)
    return Routing(block.held_rows(routing.expert_ids), routing.weights)


def markdown(rows: list[Breakdown]) -> str:
    """One column per batch size: each part's milliseconds, their sum, and the whole step as measured."""
    names: list[str] = []
    for row in rows:
        names += [n for n in row.parts if n not in names]
    header = "| part | " + " | ".join(f"B={r.batch} ({r.mode}) ms" for r in rows) + " |"
    lines = [header, "|---|" + "---:|" * len(rows)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{r.parts.get(name, 0.0):.3f}" for r in rows) + " |")
    lines.append("| **sum of parts** | " + " | ".join(f"**{r.parts_ms:.3f}**" for r in rows) + " |")
    lines.append("| whole step with the clocks on | " + " | ".join(f"{r.clocked_step_ms:.3f}" for r in rows) + " |")
    lines.append("| **whole step, plain** | " + " | ".join(f"**{r.step_ms:.3f}**" for r in rows) + " |")
    lines.append("| sum / plain step | " + " | ".join(f"{r.parts_ms / r.step_ms:.0%}" for r in rows) + " |")
    return "\n".join(lines)
