"""The engine loop: accept requests, schedule a step, run it, turn sampled tokens into outputs.

This is the incremental interface a server drives (add_request, step, abort_request,
has_unfinished_requests); `LLM` wraps it for offline batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from engine.block_manager import BlockManager
from engine.checkpoint import load_model, read_expert_rows
from engine.command_line import eager_by_default
from engine.config import CheckpointError, ModelConfig
from engine.device import peak_rss_bytes, resolve_device, resolve_dtype
from engine.engine_stats import EngineStats
from engine.expert_parallel import ExpertShard, check_experts_served
from engine.limits import check_request
from engine.model_runner import ModelRunner, cuda_kv_cache_budget, kv_cache_blocks
from engine.moe import PendingSnapshot, select_backend
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.prebuild import start_prebuild
from engine.routing import RoutingPolicy
from engine.sampling_params import InvalidRequestError, RequestOutputKind, SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.stop_strings import StopStrings
from engine.token_routing import TokenRouting
from engine.tokenizer import IncrementalDetokenizer, ModelTokenizer

logger = logging.getLogger(__name__)

# What the expert counters hold: routed tokens per [layer, expert], forwards per [layer, experts read], tokens per
# [layer] (LLMEngine.expert_load, experts_read, tokens_routed).
ExpertCounts = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class EngineConfig:
    """Engine settings; names follow vLLM's engine arguments where one exists."""

    dtype: str | torch.dtype = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory_bytes: int = 1 << 30
    gpu_memory_utilization: float = 0.9
    moe_backend: str = "auto"
    enable_prefix_caching: bool = True
    # vLLM's name: run the model eagerly instead of compiling it (engine/compiled.py); eager is the reference.
    # Default: $MOE_SERVE_ENFORCE_EAGER, else compiled.
    enforce_eager: bool = field(default_factory=eager_by_default)
    # The pruning seam at load: per-MoE-layer routing policies, installed before the KV cache is sized; with
    # release_unrouted_experts, the weights of experts no policy can reach are freed first.
    routing_policies: dict[int, RoutingPolicy] = field(default_factory=dict)
    release_unrouted_experts: bool = True
    # Pruning switchable while serving (set_live_pruning): the policies' kept experts and redirects become data
    # every step reads (engine/expert_tables.py), not traced code, so a switch needs no recompile; every expert
    # stays loaded unless live_pruning_releases_experts.
    live_pruning: bool = False
    # With live_pruning: each pruning (the first included) frees the weights of experts it cannot reach and
    # reads back from the checkpoint those it needs again; a switch that changes the weights recompiles the step.
    live_pruning_releases_experts: bool = False
    # Every request's routing budget unless it brings its own (SamplingParams.routing).
    token_routing: TokenRouting = field(default_factory=TokenRouting)
    # Expert parallelism (engine/expert_parallel.py): this rank's share of the experts. Every rank runs its own
    # engine over the same requests; the MoE layers combine the ranks' experts with collectives.
    expert_shard: ExpertShard | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.max_model_len is None or self.max_model_len >= 1, "max_model_len", "must be at least 1"),
            (self.max_num_seqs >= 1, "max_num_seqs", "must be at least 1"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be at least 1"),
            (self.block_size >= 1, "block_size", "must be at least 1"),
            (self.kv_cache_memory_bytes >= 1, "kv_cache_memory_bytes", "must be positive"),
            (0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "must be in (0, 1]"),
        ]
        if self.live_pruning_releases_experts and self.expert_shard is not None:
            raise ValueError(
                "EngineConfig.live_pruning_releases_experts cannot be combined with expert_shard: under expert "
                "parallelism each rank holds its placement's experts"
            )
        for ok, name, message in checks:
            if not ok:
                raise ValueError(f"EngineConfig.{name} {message}, got {getattr(self, name)!r}")


@dataclass
class _Request:
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    metrics: RequestMetrics


@dataclass(frozen=True)
class StepStats:
    """What the last step computed: tokens run through the model (the batch size in tokens)."""

    num_tokens: int = 0


class LLMEngine:
    """Continuous-batching generation over one model loaded from a Hugging Face directory."""

    def __init__(self, model: str | Path, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        path = self.model_path = Path(model)
        model_config = ModelConfig.from_dir(path)
        self.tokenizer = ModelTokenizer(path, model_config.eos_token_ids)
        if self.tokenizer.vocab_size > model_config.vocab_size:
            raise CheckpointError(
                f"{path / 'tokenizer.json'}: {self.tokenizer.vocab_size} tokens, more than the model's "
                f"vocab_size {model_config.vocab_size} in config.json"
            )
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu":  # while the model loads and its forward is traced (engine/prebuild.py)
            start_prebuild("cpu", probe_compiler=not config.enforce_eager)
        self.model = load_model(path, self.dtype, self.device, model_config, config.expert_shard)
        self.model.set_moe_backend(
            select_backend(config.moe_backend, model_config.hidden_size, model_config.moe_intermediate_size, self.dtype)
        )
        self.model.eval().requires_grad_(False)
        self.released_expert_bytes = self._install_routing(config)
        self.weight_bytes = self._resident_weight_bytes()
        if config.expert_shard is not None:
            check_experts_served(self.model)
        self.max_model_len = self._max_model_len(model_config)
        num_blocks = self._num_kv_blocks()
        if config.expert_shard is not None:  # free GPU memory differs between ranks; their schedules may not
            num_blocks = config.expert_shard.smallest(num_blocks, self.device)
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * config.block_size} tokens, fewer than max_model_len "
                f"{self.max_model_len}: raise the KV cache budget or lower max_model_len"
            )
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            self.max_model_len,
            self.tokenizer.eos_token_ids,
        )
        self.runner = ModelRunner(
            self.model,
            num_blocks,
            config.block_size,
            self.tokenizer.eos_token_ids,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            self.max_model_len,
            config.enforce_eager,
        )
        self.requests: dict[str, _Request] = {}
        self.last_step = StepStats()
        logger.info(
            "loaded %s (%s) on %s in %s: %d KV blocks of %d tokens, max_model_len %d",
            path,
            model_config.model_type,
            self.device,
            self.dtype,
            num_blocks,
            config.block_size,
            self.max_model_len,
        )

    def _install_routing(self, config: EngineConfig) -> int:
        policies = config.routing_policies
        if config.live_pruning:
            tables = self.model.enable_expert_tables()
            live = {layer: RoutingPolicy(p.kept_experts, p.redirect) for layer, p in policies.items()}
            tables.install(tables.tables_for(live, self.model.config.top_k))
            self.model.set_routing_policies(
                {layer: replace(p, kept_experts=None, redirect=None) for layer, p in policies.items()}
            )
            return -self._hold_reachable_experts(live) if config.live_pruning_releases_experts else 0
        if not policies:
            return 0
        self.model.set_routing_policies(policies)
        if not config.release_unrouted_experts:
            return 0
        released = self.model.release_unrouted_experts()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.info(
            "routing policies on %d MoE layers; released %.1f MiB of expert weights",
            len(config.routing_policies),
            released / 2**20,
        )
        return released

    def _hold_reachable_experts(self, policies: dict[int, RoutingPolicy]) -> int:
        """Hold the weights of exactly the experts the policies can reach (all, in layers they do not name),
        reading released ones back from the checkpoint; returns the change in resident bytes."""
        num_experts = self.model.config.num_experts
        keep = {layer: policy.reachable_experts(num_experts) for layer, policy in policies.items()}
        config, dtype, device = self.model.config, self.dtype, self.device
        change = self.model.hold_experts(
            keep, lambda layer, experts: read_expert_rows(self.model_path, config, layer, experts, dtype, device)
        )
        if change < 0 and self.device.type == "cuda":
            torch.cuda.empty_cache()
        if change:
            logger.info("live pruning holds %+.1f MiB of expert weights", change / 2**20)
        return change

    def _resident_weight_bytes(self) -> int:
        """Bytes of the model's parameters as now held (after any released experts)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @property
    def peak_memory_bytes(self) -> int:
        """The most memory the engine has held: torch's peak reservation on CUDA, the process's peak RSS on CPU
        (what sizing a machine for a model and pruning level needs). On Linux the RSS peak is this process's own
        (VmHWM): getrusage's also counts the parent's peak at the time this process was started."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_reserved(self.device)
        return peak_rss_bytes()

    def _max_model_len(self, model_config: ModelConfig) -> int:
        limit = model_config.max_position_embeddings
        if model_config.sliding_window:
            limit = min(limit, model_config.sliding_window)
        if self.config.max_model_len is None:
            return limit
        if self.config.max_model_len > limit:
            raise ValueError(f"max_model_len {self.config.max_model_len} exceeds the model's limit of {limit} tokens")
        return self.config.max_model_len

    def _num_kv_blocks(self) -> int:
        config = self.config
        if self.device.type == "cuda":
            step_tokens = min(config.max_num_batched_tokens, self.max_model_len)
            budget = cuda_kv_cache_budget(self.model, step_tokens, config.gpu_memory_utilization)
        else:
            budget = config.kv_cache_memory_bytes
        return kv_cache_blocks(self.model, config.block_size, budget, config.max_num_seqs, self.max_model_len)

    # ----- requests -----

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        """Queue a request; InvalidRequestError (naming the field) if it can never run."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_request(token_ids, params, self.model.config.vocab_size, self.max_model_len)
        routing = self._checked_routing(params.routing or self.config.token_routing)
        stop_strings = StopStrings(params.stop) if params.stop else None
        max_output = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(token_ids)
        seqs = []
        for index in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(params.seed + index)
            detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
            seq = Sequence(
                request_id, index, token_ids, params, detokenizer, max_output, generator, stop_strings, routing
            )
            if seq.wants_prompt_logprobs:
                seq.prompt_logprobs = [None]
            seqs.append(seq)
        self.requests[request_id] = _Request(text, token_ids, seqs, RequestMetrics(arrival_time=time.monotonic()))
        for seq in seqs:
            self.scheduler.add(seq)

    def _checked_routing(self, routing: TokenRouting) -> TokenRouting:
        """`routing` if this model can run it; otherwise InvalidRequestError naming the field."""
        try:
            routing.validate(self.model.config.top_k)
        except ValueError as error:
            raise InvalidRequestError(f"routing: {error}", "routing") from None
        if routing.keep_top is not None and not any(
            block.policy is not None and block.policy.similarity is not None for block in self.model.moe_blocks()
        ):
            raise InvalidRequestError(
                "routing: substitution needs the experts' similarity map, and this engine has none "
                "(install routing policies with a similarity map, e.g. moe-serve --similarity-maps)",
                "routing",
            )
        return routing

    def set_token_routing(self, routing: TokenRouting, pruning: dict[int, RoutingPolicy] | None = None) -> None:
        """Change the default routing budget between steps: requests that did not bring their own, in flight
        included, route under it from the next step. Nothing recompiles (the budget is data). With `pruning`,
        switch the live pruning too (set_live_pruning), both or neither: ValueError (InvalidRequestError for
        the budget, naming the field) leaves the old ones in place."""
        routing = self._checked_routing(routing)
        if pruning is not None:
            self.set_live_pruning(pruning)
        self.config.token_routing = routing
        rows = (routing.row(generated=False), routing.row(generated=True))
        for request in self.requests.values():
            for seq in request.seqs:
                if seq.params.routing is None and seq.routing_rows != rows:
                    seq.routing_rows = rows
                    seq.shares_prefixes = False

    def set_live_pruning(self, policies: dict[int, RoutingPolicy]) -> None:
        """Switch the experts each MoE layer routes to (the policies' kept_experts and redirect; layers not named
        prune nothing) from the next step, requests in flight included; nothing recompiles or reloads unless
        EngineConfig.live_pruning_releases_experts (then the weights follow the pruning: released experts are
        read back from the checkpoint; the compiled step reads them from the forward context, so it stays, and
        CUDA graphs are captured again). Needs
        EngineConfig.live_pruning; ValueError (naming the layer and field) leaves the old pruning in place.
        Cached prefixes were computed under the old pruning, so they are forgotten and sequences in flight stop
        sharing theirs."""
        tables = self.model.expert_tables
        if tables is None:
            raise ValueError("live pruning is off: start the engine with EngineConfig.live_pruning")
        new_tables = tables.tables_for(policies, self.model.config.top_k)
        change = self._hold_reachable_experts(policies) if self.config.live_pruning_releases_experts else 0
        if change:
            self.released_expert_bytes -= change
            self.weight_bytes = self._resident_weight_bytes()
            self.runner.experts_moved()
        tables.install(new_tables)
        self.block_manager.reset_prefix_cache()
        for request in self.requests.values():
            for seq in request.seqs:
                seq.shares_prefixes = False

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks; unknown ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ----- the step -----

    def step(self) -> list[RequestOutput]:
        """Run one batch: schedule -> execute -> update; return outputs of requests that produced a token or
        finished."""
        scheduled = self.scheduler.schedule()
        self.last_step = StepStats(sum(item.num_new_tokens for item in scheduled.scheduled))
        if not scheduled.scheduled:
            return []
        start = time.monotonic()
        for item in scheduled.scheduled:
            metrics = self.requests[item.seq.request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = start
        output = self.runner.execute(scheduled, self.tokenizer.decode_token)
        stepped = self.scheduler.update_from_output(scheduled, output)
        return self._process_outputs(stepped, time.monotonic())

    def _process_outputs(self, stepped: list[Sequence], now: float) -> list[RequestOutput]:
        """Detokenize each new token, apply stop strings, and build the requests' outputs."""
        touched: dict[str, None] = {}
        for seq in stepped:
            touched[seq.request_id] = None
            if seq.num_output_tokens == 0:
                continue  # prompt logprobs only
            piece = seq.detokenizer.add(seq.token_ids[-1])
            by_token = seq.is_finished and seq.finish_reason == "stop"  # an end or stop token decided
            past_min = seq.num_output_tokens >= seq.params.min_tokens
            hit = self._stop_string_hit(seq, piece, past_min and not by_token)
            if hit is not None:
                end, stop = hit
                text = seq.detokenizer.text
                end += len(text) - len(piece)
                seq.stop_reason = stop
                seq.output_text = text[:end] if seq.params.include_stop_str_in_output else text[: end - len(stop)]
                if seq.is_finished:
                    seq.finish_reason = "stop"  # the length limit and a stop string on the same token: the string
                else:
                    self.scheduler.finish(seq, "stop")
            elif not isinstance(seq.stop_reason, str):
                seq.output_text = seq.detokenizer.text
        outputs = []
        for request_id in touched:
            request = self.requests[request_id]
            metrics = request.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.last_token_time = now
            finished = all(seq.is_finished for seq in request.seqs)
            if finished or request.seqs[0].params.output_kind is not RequestOutputKind.FINAL_ONLY:
                outputs.append(self._request_output(request_id, now))
            if finished:
                del self.requests[request_id]
        return outputs

    @staticmethod
    def _stop_string_hit(seq: Sequence, piece: str, check: bool) -> tuple[int, str] | None:
        """Feed the newest text to the sequence's stop-string automaton (always, so that a stop string begun
        before min_tokens is still found after it); the first hit when `check`, as (characters of piece up to
        its end, the stop string)."""
        if seq.stop_strings is None:
            return None
        consumed = 0
        while consumed < len(piece):
            seq.stop_state, used, stop = seq.stop_strings.feed(seq.stop_state, piece[consumed:])
            consumed += used
            if stop is not None and check:
                return consumed, stop
        return None

    def _request_output(self, request_id: str, now: float) -> RequestOutput:
        request = self.requests[request_id]
        metrics = request.metrics
        delta = request.seqs[0].params.output_kind is RequestOutputKind.DELTA
        completions = []
        for seq in request.seqs:
            text = seq.output_text
            end = len(text)
            if not seq.is_finished and seq.params.stop_holdback:
                end = max(0, end - seq.params.stop_holdback)
            wants_logprobs = seq.params.logprobs is not None
            if delta:  # what is new since the last output (the visible text only grows: a stop string is held back)
                first_char, first_token = seq.sent_chars, seq.sent_tokens
                seq.sent_chars, seq.sent_tokens = max(end, first_char), seq.num_output_tokens
                text = text[first_char:end]
                token_ids = seq.token_ids[seq.num_prompt_tokens + first_token :]
                logprobs = seq.output_logprobs[first_token:] if wants_logprobs else None
            else:
                text = text[:end]
                token_ids = seq.output_token_ids
                logprobs = list(seq.output_logprobs) if wants_logprobs else None
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=token_ids,
                    cumulative_logprob=seq.cumulative_logprob if wants_logprobs else None,
                    logprobs=logprobs,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        finished = all(seq.is_finished for seq in request.seqs)
        if finished:
            metrics.finished_time = now
        return RequestOutput(
            request_id=request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=request.seqs[0].prompt_logprobs,
            outputs=completions,
            finished=finished,
            metrics=metrics.snapshot(),
        )

    def stats(self, stepped: bool = True, expert_counts: ExpertCounts | None = None) -> EngineStats:
        """The engine's state now; `stepped` when a step just ran, expert_counts when a counter read landed."""
        scheduler, blocks = self.scheduler, self.block_manager
        load, read, routed = expert_counts or (None, None, None)
        return EngineStats(
            num_step_tokens=self.last_step.num_tokens if stepped else 0,
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            num_requests=len(self.requests),
            kv_cache_usage=blocks.usage,
            num_preemptions=scheduler.num_preemptions,
            peak_memory_bytes=self.peak_memory_bytes,
            weight_bytes=self.weight_bytes,
            released_expert_bytes=self.released_expert_bytes,
            prefix_cache_queries=blocks.prefix_cache_queries,
            prefix_cache_hits=blocks.prefix_cache_hits,
            expert_counts=load,
            experts_read=read,
            tokens_routed=routed,
        )

    # ----- expert routing -----

    def expert_load(self) -> np.ndarray:
        """Routed (token, expert) pairs per [layer, expert] since start or the last reset.

        Each token's routing counts once: tokens recomputed after a preemption and the shared prompt of a
        request's n > 1 completions are not counted again.
        """
        return self.model.expert_load.snapshot().numpy()

    def experts_read(self) -> np.ndarray:
        """[layers, experts + 1]: column u counts the forwards that read u of the layer's experts (all rows'
        distinct experts, after routing policies and substitution), since start or the last reset."""
        return self.model.expert_load.experts_read().numpy()

    def tokens_routed(self) -> np.ndarray:
        """[layers]: tokens each layer routed (counted as expert_load), since start or the last reset."""
        return self.model.expert_load.tokens().numpy()

    def expert_load_async(self) -> PendingSnapshot:
        """expert_load(), experts_read() and tokens_routed(), copied to the host without a device sync (for
        metrics)."""
        return self.model.expert_load.snapshot_async()

    def reset_expert_load(self) -> None:
        self.model.expert_load.reset()

    def set_routing_policies(self, policies: dict[int, RoutingPolicy]) -> None:
        """Change routing between requests; cached prefixes computed under the old routing are dropped, and so
        are compiled graphs specialized on it."""
        if self.has_unfinished_requests():
            raise RuntimeError("routing policies can change only while no request is in flight")
        self.model.set_routing_policies(policies)
        self.block_manager.reset_prefix_cache()
        self.runner.reset_compiled()

    def warm_up(self, progress: Callable[[str], None] | None = None) -> float:
        """Pay first-use costs before serving: compile the forward (unless enforce_eager), then run one short
        request through prefill and decode; its routing counts and cached prefix are forgotten. Returns the
        seconds compilation took."""
        seconds = self.runner.warm_up(progress)
        prompt = list(range(max(1, min(16, self.max_model_len - 4))))
        max_tokens = min(4, self.max_model_len - len(prompt))
        self.add_request("warmup", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        while self.has_unfinished_requests():
            self.step()
        self.reset_expert_load()
        self.block_manager.reset_prefix_cache()
        return seconds
