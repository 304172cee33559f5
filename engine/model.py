"""The one decoder-only MoE model used for inference, training, calibration and pruning.

Parameter names follow the Hugging Face layout (model.layers.N.mlp.experts.gate_up_proj, ...) so a state
dict maps onto checkpoints with a few renames. The forward pass works on a flattened batch of tokens [T];
the attention metadata says whether they form dense causal sequences or paged-cache serving steps (whose
caches and block tables the model runner provides through the forward context, engine/attention.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from engine.attention import AttentionMetadata, Paged, attend
from engine.config import ModelConfig
from engine.cpu_kernels import kernels
from engine.expert_tables import ExpertTables
from engine.moe import DenseMLP, ExpertLoad, RoutingObserver, SparseMoE
from engine.projections import kernel_rows, project
from engine.routing import LiveExperts, RoutingPolicy


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, scaled in the input dtype (as transformers does)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """cos and sin [T, head_dim] for rotate-half RoPE at the given positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    """Grouped-query attention with the variants' biases, q/k norms and qkv clipping."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.o_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm == "head":
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        elif config.qk_norm == "full":
            self.q_norm = RMSNorm(q_size, config.rms_norm_eps)
            self.k_norm = RMSNorm(kv_size, config.rms_norm_eps)
        self.clip_qkv = config.clip_qkv
        self.scale = self.head_dim**-0.5

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = self.heads(q, k, v, rope)
        out = attend(q, k, v, meta, self.layer_idx, self.scale)
        return project(out.reshape(x.shape[0], -1), (self.o_proj,))[0]

    def heads(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected queries, keys and values [T, width] -> per-head [T, heads, head_dim], with the
        architecture's q/k norm, clipping and RoPE applied."""
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, *rope), apply_rotary(k, *rope), v


class DecoderLayer(nn.Module):
    """Pre-norm attention and MoE (or dense MLP) with residual connections."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp: SparseMoE | DenseMLP
        if config.is_moe_layer(layer_idx):
            self.mlp = SparseMoE(
                layer_idx,
                config.hidden_size,
                config.num_experts,
                config.top_k,
                config.moe_intermediate_size,
                config.norm_topk_prob,
                config.shared_expert_intermediate_size,
                config.router_scoring,
            )
        else:
            self.mlp = DenseMLP(config.hidden_size, config.dense_intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        token_mask: torch.Tensor | None = None,
        route_controls: torch.Tensor | None = None,
        live: LiveExperts | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, meta)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, SparseMoE):
            return x + self.mlp(h, token_mask, route_controls, live, serving=isinstance(meta, Paged))
        return x + self.mlp(h)


class DecoderStack(nn.Module):
    """Embeddings, decoder layers and the final norm (the `model.` prefix of checkpoints)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# (MoE layer, expert ids) -> their stacked gate+up [n, 2I, H] and down [n, H, I] weights, e.g. from the checkpoint.
ExpertRowReader = Callable[[int, list[int]], tuple[torch.Tensor, torch.Tensor]]


def _already_read(
    rows: tuple[torch.Tensor, torch.Tensor] | None, experts: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    assert rows is not None, f"experts {experts} were not read"
    return rows


class MoEForCausalLM(nn.Module):
    """Decoder stack plus LM head; `forward` returns final hidden states, `compute_logits` projects them."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.expert_load = ExpertLoad(config.num_layers, config.num_experts)
        for block in self.moe_blocks():
            block.record_load = self.expert_load.record
        # Live pruning tables (enable_expert_tables); the serving forward passes them to every step.
        self.expert_tables: ExpertTables | None = None

    @property
    def router_balancing(self) -> dict[str, object] | None:
        """The balancing loss the checkpoint was trained with, from config.json (None = unknown)."""
        balancing = self.config.router_balancing
        return None if balancing is None else balancing.to_dict()

    def moe_blocks(self) -> list[SparseMoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, SparseMoE)]

    def hold_experts(self, keep: dict[int, torch.Tensor], read_rows: ExpertRowReader) -> int:
        """Per MoE layer hold exactly the experts keep[layer] names (bool [E]; layers not named: all of them),
        freeing the others and reading back with read_rows(layer, ids) those released before. Every read happens
        before anything changes, so a failed read (CheckpointError) leaves the model as it was. Returns the
        change in resident bytes."""
        wanted = {
            block.layer_idx: keep.get(block.layer_idx, torch.ones(block.num_experts, dtype=torch.bool))
            for block in self.moe_blocks()
        }
        reads = {}
        for block in self.moe_blocks():
            missing = torch.nonzero(wanted[block.layer_idx] & ~block.present_experts()).squeeze(1)
            if len(missing):
                reads[block.layer_idx] = read_rows(block.layer_idx, [int(e) for e in missing])
        change = 0
        for block in self.moe_blocks():
            change += block.hold_experts(
                wanted[block.layer_idx], functools.partial(_already_read, reads.get(block.layer_idx))
            )
        return change

    def set_moe_backend(self, backend: str) -> None:
        for block in self.moe_blocks():
            block.set_backend(backend)

    def set_routing_policies(self, policies: dict[int, RoutingPolicy]) -> None:
        """Install routing policies by decoder-layer index; layers not named get default routing."""
        blocks = {block.layer_idx: block for block in self.moe_blocks()}
        unknown = sorted(set(policies) - set(blocks))
        if unknown:
            raise ValueError(f"layers {unknown} have no MoE block (MoE layers: {sorted(blocks)})")
        for layer, block in blocks.items():
            policy = policies.get(layer, RoutingPolicy())
            policy.validate(block.num_experts, block.top_k)
            missing = torch.nonzero(policy.reachable_experts(block.num_experts) & ~block.servable_experts())
            if len(missing):
                raise ValueError(
                    f"layer {layer}: the routing policy reaches experts {missing.squeeze(1).tolist()}, "
                    "whose weights were released (or that no rank holds)"
                )
        device = self.lm_head.weight.device
        for layer, block in blocks.items():
            block.policy = policies[layer].to(device) if layer in policies else None

    def enable_expert_tables(self) -> ExpertTables:
        """Route through live pruning tables from now on (engine.expert_tables), initially pruning nothing."""
        if self.expert_tables is None:
            config, device = self.config, self.lm_head.weight.device
            self.expert_tables = ExpertTables(config.num_layers, config.num_experts, config.moe_layers, device)
        return self.expert_tables

    def release_unrouted_experts(self) -> int:
        """Free the weights of every expert the installed routing policies can no longer reach (static pruning:
        the memory goes back to the device, e.g. for KV cache). Returns the bytes released."""
        released = 0
        for block in self.moe_blocks():
            if block.policy is not None:
                released += block.release_unreachable(block.policy.reachable_experts(block.num_experts))
        return released

    def set_routing_observer(self, observer: RoutingObserver | None) -> None:
        """Install (or remove, with None) the callback every MoE block calls with its routing decision."""
        for block in self.moe_blocks():
            block.observer = observer

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        token_mask: torch.Tensor | None = None,
        route_controls: torch.Tensor | None = None,
        expert_tables: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Final hidden states [T, H]. token_mask [T] (0 or 1) leaves tokens out of the expert-load counts;
        route_controls [T, 4] are each token's routing budget (engine.routing.TokenRouting.row); expert_tables
        are the live pruning tables (engine.expert_tables: kept [layers, E], serve [layers, E + 1])."""
        x = self.model.embed_tokens(input_ids)
        rope = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for index, layer in enumerate(self.model.layers):
            live = None if expert_tables is None else LiveExperts(expert_tables[0][index], expert_tables[1][index])
            x = layer(x, rope, meta, token_mask, route_controls, live)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [T, vocab] in fp32. A decode step's rows (up to kernel_rows()) of a bf16 model on CPU go through
        the CPU kernel (a quarter of torch's time at one row, a batch-32 step 2-3% faster, docs/performance.md);
        everything else is the linear layer."""
        weight = self.lm_head.weight
        if hidden.shape[0] <= kernel_rows() and hidden.device.type == "cpu" and not torch.is_grad_enabled():
            cpu = kernels()
            logits = cpu.linear(hidden.contiguous(), weight) if cpu is not None and weight.is_contiguous() else None
            if logits is not None:
                return logits
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int = 0) -> None:
        """Random initialization (normal(0, std) matrices, unit norms) for fresh models."""
        generator = torch.Generator().manual_seed(seed)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
