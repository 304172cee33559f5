"""Sparse MoE block: router -> routing stage -> dropless expert dispatch -> fp32 combine.

In inference the dispatch is one custom op per layer, opaque to torch.compile (its work depends on which
experts the step's tokens chose): `moe_serve::expert_mlp` takes the weights as arguments, and
`moe_serve::layer_experts`, the serving forward's, reads the layer's weights (and its row map after a release)
from the forward context (`serving_experts`, set around each serving step) as paged attention reads the KV
cache. So no compiled graph holds expert weights: live pruning that frees and reads back experts changes the
block, and the next step reads the new weights without recompiling. Its backends: `auto` runs the CPU kernel (each expert
that received tokens read once, empty experts not at all; engine/cpu_kernels.c) on CPU where it is built and
grouped GEMM elsewhere; `grouped` (torch's grouped_mm over every expert, sync-free on CUDA) and `loop` (one mm
per expert with tokens) are the references. Training, which needs gradients, runs the grouped path directly.

Under expert parallelism (engine/expert_parallel.py) each rank's block holds only its share of the routed
experts: routing runs on every rank alike (the router is replicated), each rank computes its own experts'
weighted outputs for all tokens (slots routed elsewhere are dropped slots here), and one all-reduce (SUM) over
the group combines them; the shared expert, replicated, is added once after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.choices import BACKENDS
from engine.cpu_kernels import SUFFIX, kernels
from engine.native_ops import ExpertContext, native_ops, native_ops_loaded
from engine.op_library import define_op, returns_nothing
from engine.projections import project
from engine.routing import ROUTER_SCORES, LiveExperts, Routing, RoutingPolicy, route

logger = logging.getLogger(__name__)

GroupedMM = Callable[..., torch.Tensor]
# Sees every routing decision: (block, block input [T, H], router logits [T, E], routing). Training reads the
# logits for its balancing losses, calibration runs all experts on the input; inference installs none.
RoutingObserver = Callable[["SparseMoE", torch.Tensor, torch.Tensor, Routing], None]
_grouped_mm: GroupedMM | None = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class DenseMLP(nn.Module):
    """SwiGLU feed-forward: the shared expert and the dense layers."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, (self.gate_proj, self.up_proj))
        return project(F.silu(gate) * up, (self.down_proj,))[0]


# Bumped whenever a layer's expert weights, row map or backend is assigned: what the C++ expert op reads of the
# serving layers is made again only then (serving_experts; engine/native_ops.py), not checked on every step.
_serving_generation = 0


def _serving_state_assigned() -> None:
    global _serving_generation
    _serving_generation += 1


class Experts(nn.Module):
    """All routed experts of a layer as stacked tensors: gate+up [E, 2I, H] and down [E, H, I]."""

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in ("gate_up_proj", "down_proj"):
            _serving_state_assigned()

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in (self.gate_up_proj, self.down_proj))

    @staticmethod
    def of(gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> Experts:
        """Experts holding these stacked weights (not copied; frozen)."""
        count, width, hidden = gate_up_proj.shape
        with torch.device("meta"):
            experts = Experts(count, hidden, width // 2)
        experts.gate_up_proj = nn.Parameter(gate_up_proj, requires_grad=False)
        experts.down_proj = nn.Parameter(down_proj, requires_grad=False)
        return experts

    def apply_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's output for every token, [E, T, H]: the dense pass that redundancy measures need."""
        gate, up = torch.einsum("th,eih->eti", x, self.gate_up_proj).chunk(2, dim=-1)
        return torch.einsum("eti,ehi->eth", F.silu(gate) * up, self.down_proj)


def count_routes(counts: torch.Tensor, expert_ids: torch.Tensor, token_mask: torch.Tensor, layer: int) -> None:
    """ExpertLoad.record of one layer's slots [T, k] into counts [layers, 2E + 3] (its columns), in torch's ops:
    the reference of `moe_serve::cpu_count_routes`."""
    num_experts = (counts.shape[1] - 3) // 2
    flat = expert_ids.reshape(-1)
    row = counts[layer]
    row.index_add_(0, flat, token_mask[:, None].expand_as(expert_ids).reshape(-1))
    read = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device).index_fill(0, flat, 1)
    column = read[:num_experts].sum().view(1) + num_experts + 1
    row.index_add_(0, column, torch.ones_like(column))
    tokens = token_mask.sum().view(1)
    row.index_add_(0, torch.full_like(tokens, 2 * num_experts + 2), tokens)


define_op(
    "count_routes(Tensor(a!) counts, Tensor expert_ids, Tensor token_mask, int layer) -> ()",
    count_routes,
    returns_nothing,
)


class ExpertLoad(nn.Module):
    """Routed (token, expert) counts per [layer, expert], accumulated on the device with no host sync per step.

    A token mask ([T] int64, 0 or 1; None counts all) lets the caller leave out tokens whose routing was
    already counted: those recomputed after a preemption, the shared prompt of a request's n > 1 copies, and
    the padding rows of a fixed-size batch. Each call also counts the forward as one that read u of the
    layer's experts (u = the distinct experts of all its rows, padding included: they are read), the figure
    batch-aware substitution lowers.
    """

    counts: torch.Tensor

    def __init__(self, num_layers: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        # Columns: routed tokens per expert; one for dropped slots (sentinel id == num_experts); then forwards
        # by the number of experts they read, 0..num_experts; then the tokens counted.
        width = 2 * num_experts + 3
        self.register_buffer("counts", torch.zeros(num_layers, width, dtype=torch.int64), persistent=False)

    def record(self, layer: int, expert_ids: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        if token_mask is None:
            token_mask = torch.ones_like(expert_ids[:, 0])
        if expert_ids.shape[0] == 1:  # a one-token step: dense ops the compiler fuses (scatters fall back to ATen)
            self._record_one(layer, expert_ids.reshape(-1), token_mask.expand(expert_ids.shape[1]))
        elif expert_ids.device.type == "cpu" and native_ops_loaded():
            # One C++ call (engine/native_ops.cpp), where the compiled many-token graph had a dozen scatter kernels
            # across the layers, each its own g++ build at a cold start.
            torch.ops.moe_serve.cpu_count_routes(self.counts, expert_ids, token_mask, layer)
        else:
            count_routes(self.counts, expert_ids, token_mask, layer)

    def _record_one(self, layer: int, flat: torch.Tensor, weights: torch.Tensor) -> None:
        """record() for the k slots of one token, as one add of a row built from one-hot rows."""
        num_experts = self.num_experts
        hits = F.one_hot(flat, num_experts + 1)
        routed = (hits * weights[:, None]).sum(0)
        read = F.one_hot(hits.amax(0)[:num_experts].sum(), num_experts + 1)
        self.counts[layer] += torch.cat([routed, read, weights[:1]])

    def snapshot(self) -> torch.Tensor:
        """A copy, [layers, experts] int64 on the CPU (one host sync)."""
        return self.counts[:, : self.num_experts].to("cpu", copy=True)

    def experts_read(self) -> torch.Tensor:
        """[layers, experts + 1] int64 on the CPU: column u counts the forwards that read u of the layer's
        experts (one host sync)."""
        return self.counts[:, self.num_experts + 1 : -1].to("cpu", copy=True)

    def tokens(self) -> torch.Tensor:
        """[layers] int64 on the CPU: tokens counted through each layer (routed slots / tokens = experts used per
        token, after thresholds, budgets and dropped slots)."""
        return self.counts[:, -1].to("cpu", copy=True)

    def snapshot_async(self) -> PendingSnapshot:
        """Start copying the counts to the host without waiting for the device (pinned memory and an event on
        CUDA); the copy holds the counts as of the work queued so far."""
        if self.counts.device.type != "cuda":
            return PendingSnapshot(self.counts.to("cpu", copy=True), None, self.num_experts)
        host = torch.empty(self.counts.shape, dtype=torch.int64, pin_memory=True)
        with torch.cuda.device(self.counts.device):  # the event must follow the copy on the counts' device
            host.copy_(self.counts, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return PendingSnapshot(host, event, self.num_experts)

    def reset(self) -> None:
        self.counts.zero_()


class PendingSnapshot:
    """Expert counts on their way to the host: poll `ready()`, then read `counts()` without a device sync."""

    def __init__(self, host: torch.Tensor, event: torch.cuda.Event | None, num_experts: int) -> None:
        self._host = host
        self._event = event
        self._num_experts = num_experts

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def counts(self) -> torch.Tensor:
        """[layers, experts] int64 on the CPU; waits for the copy if it is not ready yet."""
        if self._event is not None:
            self._event.synchronize()
        return self._host[:, : self._num_experts]

    def experts_read(self) -> torch.Tensor:
        """ExpertLoad.experts_read as of the copy; waits for it if it is not ready yet."""
        if self._event is not None:
            self._event.synchronize()
        return self._host[:, self._num_experts + 1 : -1]

    def tokens(self) -> torch.Tensor:
        """ExpertLoad.tokens as of the copy; waits for it if it is not ready yet."""
        if self._event is not None:
            self._event.synchronize()
        return self._host[:, -1]


def grouped_mm_supported(hidden_size: int, intermediate_size: int, dtype: torch.dtype) -> bool:
    """grouped_mm needs 16-byte-aligned strides on both operands."""
    size = torch.tensor([], dtype=dtype).element_size()
    return _grouped_mm is not None and all((n * size) % 16 == 0 for n in (hidden_size, intermediate_size))


def _expert_rows_grouped(xs: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    assert _grouped_mm is not None
    gate_up = _grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    gate, up = gate_up.chunk(2, dim=-1)
    return _grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)


def _expert_rows_loop(xs: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    out = xs.new_zeros(xs.shape[0], w2.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            gate, up = (xs[start:end] @ w13[e].transpose(0, 1)).chunk(2, dim=-1)
            out[start:end] = (F.silu(gate) * up) @ w2[e].transpose(0, 1)
        start = end
    return out


def _dispatch_sorted(
    x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, loop: bool
) -> torch.Tensor:
    """Sort (token, slot) pairs by expert, run each expert on its rows (grouped_mm or a loop), combine in fp32."""
    num_tokens, k = expert_ids.shape
    num_experts = w13.shape[0]
    flat_ids = expert_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=x.device)
    counts.index_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
    offs = torch.cumsum(counts[:num_experts], dim=0, dtype=torch.int32)
    xs = x.index_select(0, order // k)
    rows = (_expert_rows_loop if loop else _expert_rows_grouped)(xs, offs, w13, w2)
    # Rows past offs[-1] (dropped slots) are never written by grouped_mm: zero them before weighting.
    valid = (flat_ids[order] < num_experts).unsqueeze(-1)
    weighted = torch.where(valid, rows.float(), 0.0) * weights.reshape(-1)[order].unsqueeze(-1)
    # Undo the sort and sum each token's k slots in slot order: deterministic on every device (no atomics).
    by_slot = torch.empty_like(weighted).index_copy_(0, order, weighted)
    return by_slot.view(num_tokens, k, -1).sum(dim=1)


def expert_mlp(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """The routed experts' weighted outputs per token, [T, H] fp32 (see the module docstring for backends)."""
    cpu = None
    if backend == "auto" and x.device.type == "cpu" and gate_up_proj.dtype in SUFFIX:
        cpu = kernels()
    if cpu is not None:
        x = x if x.dtype == gate_up_proj.dtype else x.to(gate_up_proj.dtype)
        return cpu.expert_mlp(
            x.contiguous(), expert_ids.contiguous(), weights.float().contiguous(), gate_up_proj, down_proj
        )
    return _dispatch_sorted(x, expert_ids, weights, gate_up_proj, down_proj, _loops(backend, gate_up_proj))


def _loops(backend: str, w13: torch.Tensor) -> bool:
    """Whether the sorted path loops over experts: asked for, or grouped_mm cannot take these shapes."""
    return backend == "loop" or not grouped_mm_supported(w13.shape[2], w13.shape[1] // 2, w13.dtype)


def _expert_mlp_shape(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.float32)


define_op(
    "expert_mlp(Tensor x, Tensor expert_ids, Tensor weights, Tensor gate_up_proj, Tensor down_proj, str backend)"
    " -> Tensor",
    expert_mlp,
    _expert_mlp_shape,
)


def dispatch(x: torch.Tensor, routing: Routing, experts: Experts, backend: str = "auto") -> torch.Tensor:
    """Dropless expert computation: each token's routed experts applied and combined with their weights.

    Returns [T, H] in fp32. Slots with the sentinel id (the experts' row count) are skipped. With gradients
    (training) it runs the grouped path in autograd; otherwise the expert_mlp op.
    """
    w13, w2 = experts.gate_up_proj, experts.down_proj
    if torch.is_grad_enabled() and (x.requires_grad or w13.requires_grad):
        return _dispatch_sorted(x, routing.expert_ids, routing.weights, w13, w2, _loops(backend, w13))
    return torch.ops.moe_serve.expert_mlp(x, routing.expert_ids, routing.weights, w13, w2, backend)


# The serving forward's MoE blocks by decoder-layer index (None for dense layers), set by serving_experts.
_serving_blocks: Sequence[SparseMoE | None] = ()
_native_context: ExpertContext | None = None  # what the C++ op reads of _serving_blocks (engine/native_ops.py)


@contextmanager
def serving_experts(blocks: Sequence[SparseMoE | None]) -> Iterator[None]:
    """The forward context of a serving step: layer_experts reads each layer's experts from `blocks` (and so does
    its C++ twin, engine/native_ops.py, on the CPU)."""
    global _serving_blocks, _native_context
    native = native_ops()
    previous, previous_context = _serving_blocks, _native_context
    _serving_blocks = blocks
    if native is not None:
        _native_context = native.expert_context(blocks, _serving_generation)
        native.set_expert_context(_native_context)
    try:
        yield
    finally:
        _serving_blocks, _native_context = previous, previous_context
        if native is not None:
            native.set_expert_context(previous_context)


def layer_experts(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, layer: int) -> torch.Tensor:
    """expert_mlp with the experts serving layer `layer` holds now (expert_ids are the router's, original ids)."""
    block = _serving_blocks[layer] if layer < len(_serving_blocks) else None
    assert block is not None, f"layer {layer}: the serving expert op runs inside serving_experts(...)"
    experts = block.experts
    return expert_mlp(x, block.held_rows(expert_ids), weights, experts.gate_up_proj, experts.down_proj, block.backend)


def _layer_experts_shape(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, layer: int) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.float32)


define_op(
    "layer_experts(Tensor x, Tensor expert_ids, Tensor weights, int layer) -> Tensor",
    layer_experts,
    _layer_experts_shape,
)


def _nothing_to_read(experts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    raise AssertionError(f"experts {experts} were released, not kept")


class SparseMoE(nn.Module):
    """One MoE layer. `policy` is the routing seam; `load` (shared across layers) counts routed tokens."""

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in ("experts", "expert_rows", "backend"):
            _serving_state_assigned()

    def __init__(
        self,
        layer_idx: int,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        norm_topk_prob: bool,
        shared_expert_intermediate_size: int = 0,
        router_scoring: str = "softmax",
    ) -> None:
        super().__init__()
        if router_scoring not in ROUTER_SCORES:
            raise ValueError(f"unknown router scoring {router_scoring!r}; expected one of {tuple(ROUTER_SCORES)}")
        self.layer_idx = layer_idx
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.router_scoring = router_scoring
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = Experts(num_experts, hidden_size, intermediate_size)
        self.shared_expert: DenseMLP | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(hidden_size, shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        self.backend = "auto"
        self.policy: RoutingPolicy | None = None
        # A bound ExpertLoad.record (a plain attribute: the counters belong to the model, not to each block).
        self.record_load: Callable[[int, torch.Tensor, torch.Tensor | None], None] | None = None
        self.observer: RoutingObserver | None = None
        # After release_experts: the original ids of the experts whose weights are held (ascending, on the CPU),
        # and original expert id -> row of those weights (sentinel -> sentinel) on the block's device.
        self.held_experts: torch.Tensor | None = None
        self.expert_rows: torch.Tensor | None = None
        # Expert parallelism (join_expert_parallel): the group whose ranks hold the other experts, and which
        # experts they hold (bool [E] on the CPU).
        self.expert_group: dist.ProcessGroup | None = None
        self.remote_experts: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        """Experts the router chooses among (the checkpoint's count, also after weights were released)."""
        return self.gate.out_features

    def present_experts(self) -> torch.Tensor:
        """bool [E]: experts whose weights are loaded (in this process)."""
        present = torch.ones(self.num_experts, dtype=torch.bool)
        if self.held_experts is not None:
            present[:] = False
            present[self.held_experts] = True
        return present

    def servable_experts(self) -> torch.Tensor:
        """bool [E]: experts whose weights are loaded here or, under expert parallelism, on another rank."""
        present = self.present_experts()
        return present if self.remote_experts is None else present | self.remote_experts

    def release_experts(self, keep: torch.Tensor) -> int:
        """Free the weights of experts outside `keep` (bool [E]); routing still speaks original expert ids, so
        load counts and policies are unchanged. Returns the bytes released. On a model still on the meta
        device it only shrinks the shapes (load_model loads a shard so)."""
        if bool((keep & ~self.present_experts()).any()):
            raise ValueError(f"layer {self.layer_idx}: cannot keep experts whose weights were already released")
        return -self.hold_experts(keep, _nothing_to_read)

    def hold_experts(
        self, keep: torch.Tensor, read_rows: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]
    ) -> int:
        """Hold exactly the experts in `keep` (bool [E]): free the others, and get back with `read_rows` (their
        ids -> stacked gate+up and down rows) those released before. Live pruning's memory follows its plan this
        way. Returns the change in resident bytes (negative when memory was freed)."""
        present = self.present_experts()
        if bool((keep == present).all()):
            return 0
        before = self.experts.nbytes()
        ids = torch.nonzero(keep).squeeze(1)
        loaded = present[ids]
        held = ids[loaded]
        rows = held if self.held_experts is None else torch.searchsorted(self.held_experts, held)
        old_gate_up, old_down = self.experts.gate_up_proj.detach(), self.experts.down_proj.detach()
        gate_up = old_gate_up.new_empty((len(ids), *old_gate_up.shape[1:]))
        down = old_down.new_empty((len(ids), *old_down.shape[1:]))
        device = gate_up.device
        gate_up[loaded.to(device)] = old_gate_up[rows.to(device)]
        down[loaded.to(device)] = old_down[rows.to(device)]
        if not bool(loaded.all()):
            read_gate_up, read_down = read_rows([int(e) for e in ids[~loaded]])
            gate_up[~loaded.to(device)] = read_gate_up
            down[~loaded.to(device)] = read_down
        self.experts = Experts.of(gate_up, down)
        self._map_rows(ids)
        return self.experts.nbytes() - before

    def release_unreachable(self, reachable: torch.Tensor) -> int:
        """Free the weights of the experts routing can no longer reach (bool [E] `reachable`); under expert
        parallelism the other ranks free theirs alike, so they stop counting as servable. Returns the bytes."""
        if self.remote_experts is not None:
            self.remote_experts = self.remote_experts & reachable
        present = self.present_experts()
        return self.release_experts(reachable & present) if bool((present & ~reachable).any()) else 0

    def join_expert_parallel(self, owners: torch.Tensor, rank: int, group: dist.ProcessGroup) -> None:
        """Become `rank`'s share of this layer: `owners` (long [E], the rank holding each expert, -1 none)
        must give `rank` exactly the experts this block holds (release_experts frees the others). The forward
        then sums the ranks' outputs over `group`; experts without an owner count as released."""
        local = owners == rank
        if not torch.equal(local, self.present_experts()):
            raise ValueError(
                f"layer {self.layer_idx}: rank {rank} holds experts {_ids(self.present_experts())}, "
                f"but the placement gives it {_ids(local)}"
            )
        self._map_rows(torch.nonzero(local).squeeze(1))  # again: the rows made on the meta device hold nothing
        self.remote_experts = (owners >= 0) & ~local
        self.expert_group = group

    def _map_rows(self, ids: torch.Tensor) -> None:
        """Hold the experts `ids` (ascending) in that order; routing to any other expert becomes a dropped slot."""
        rows = torch.full((self.num_experts + 1,), len(ids), dtype=torch.long)
        rows[ids] = torch.arange(len(ids))
        self.held_experts = ids.cpu()
        self.expert_rows = rows.to(self.gate.weight.device)

    def held_rows(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """The rows of the held weights that serve the router's expert ids (the ids themselves until a release)."""
        return expert_ids if self.expert_rows is None else self.expert_rows[expert_ids]

    @property
    def dispatch_syncs_host(self) -> bool:
        """Whether the dispatch reads device data on the host (so a CUDA graph cannot capture it): the loop
        backend reads the group offsets, and so does grouped_mm outside bf16."""
        w13 = self.experts.gate_up_proj
        return w13.dtype != torch.bfloat16 or _loops(self.backend, w13)

    def set_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown MoE backend {backend!r}; expected one of {BACKENDS}")
        self.backend = backend

    def forward(
        self,
        x: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        route_controls: torch.Tensor | None = None,
        live: LiveExperts | None = None,
        serving: bool = False,
    ) -> torch.Tensor:
        """The block's output; `serving` (a paged serving step) reads the experts from the forward context."""
        router_logits = project(x, (self.gate,))[0]
        routing = route(
            router_logits, self.top_k, self.norm_topk_prob, self.policy, route_controls, live, self.router_scoring
        )
        if self.record_load is not None:
            self.record_load(self.layer_idx, routing.expert_ids, token_mask)
        if self.observer is not None:
            self.observer(self, x, router_logits, routing)
        if serving:
            ops = torch.ops.moe_serve
            experts = ops.cpu_layer_experts if x.device.type == "cpu" and native_ops_loaded() else ops.layer_experts
            routed = experts(x, routing.expert_ids, routing.weights, self.layer_idx)
            return self.combine(x, routed)
        held = Routing(self.held_rows(routing.expert_ids), routing.weights)
        return self.combine(x, dispatch(x, held, self.experts, self.backend))

    def combine(self, x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """The block's output from its input x and its routed experts' fp32 sum: under expert parallelism the
        ranks' sums added up (in place), then the shared expert once, in x's dtype."""
        if self.expert_group is not None:
            dist.all_reduce(routed, group=self.expert_group)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            routed = routed + (torch.sigmoid(project(x, (self.shared_expert_gate,))[0]) * self.shared_expert(x)).float()
        return routed.to(x.dtype)


def _ids(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).squeeze(1).tolist()


def select_backend(requested: str, hidden_size: int, intermediate_size: int, dtype: torch.dtype) -> str:
    """The backend to use, falling back to the loop (with one log line) where grouped_mm cannot run."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown MoE backend {requested!r}; expected one of {BACKENDS}")
    if requested == "grouped" and not grouped_mm_supported(hidden_size, intermediate_size, dtype):
        logger.warning(
            "grouped_mm cannot run here (hidden=%d, expert width=%d, %s: needs 16-byte-aligned strides and "
            "torch.nn.functional.grouped_mm); using the per-expert loop backend",
            hidden_size,
            intermediate_size,
            dtype,
        )
        return "loop"
    return requested
