"""The typed messages between the HTTP process and the engine process, one dataclass per kind.

They travel pickled over one duplex pipe, in order. Each side dispatches on the message's type through a
table of handlers, so adding a message is a dataclass and a table line, not another branch.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.engine_stats import EngineStats
from engine.routing import RoutingPolicy
from engine.sampling_params import SamplingParams
from engine.token_routing import TokenRouting
from server.output_delta import OutputDelta


@dataclass(frozen=True)
class EngineInfo:
    """What the HTTP side needs to know about the loaded engine."""

    max_model_len: int
    dtype: str
    device: str
    num_kv_blocks: int
    pid: int
    weight_bytes: int  # parameters resident on the device
    released_expert_bytes: int  # expert weights freed because no routing policy reaches them
    expert_weight_bytes: tuple[int, ...] = ()  # routed-expert weights each rank holds, by rank (one: one process)


# ----- to the engine -----


@dataclass(frozen=True)
class AddRequest:
    """A request already tokenized and checked by the HTTP process: the engine sees token ids only. Its params
    ask for DELTA outputs, which the engine process sends on (server/output_delta.py)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class AbortAll:
    pass


@dataclass(frozen=True)
class Refresh:
    """Report exact figures now if idle (answered with Refreshed)."""

    query: int


@dataclass(frozen=True)
class SetRouting:
    """Change the default routing budget, and the live pruning if given (kept experts and redirects per MoE
    layer), at the next step boundary (answered with RoutingSet)."""

    query: int
    routing: TokenRouting
    pruning: dict[int, RoutingPolicy] | None = None


@dataclass(frozen=True)
class Exit:
    pass


ToEngine = AddRequest | AbortRequest | AbortAll | Refresh | SetRouting | Exit


# ----- from the engine -----


@dataclass(frozen=True)
class Loaded:
    info: EngineInfo


@dataclass(frozen=True)
class LoadFailed:
    kind: str  # the exception's class name, raised again on the HTTP side
    message: str


@dataclass(frozen=True)
class Ready:
    """Warm-up is done: it took warmup_seconds, of which compile_seconds compiling the forward."""

    compile_seconds: float = 0.0
    warmup_seconds: float = 0.0


@dataclass(frozen=True)
class Added:
    """The engine's answer to AddRequest: error is None, or (kind, message) with kind "invalid" or "error"."""

    request_id: str
    error: tuple[str, str] | None


@dataclass(frozen=True)
class StepDone:
    deltas: list[OutputDelta]
    stats: EngineStats


@dataclass(frozen=True)
class Idle:
    stats: EngineStats


@dataclass(frozen=True)
class Refreshed:
    query: int
    stats: EngineStats | None  # None when the engine was busy


@dataclass(frozen=True)
class RoutingSet:
    query: int
    error: str | None  # why the engine refused it (the old setting stays), or None


@dataclass(frozen=True)
class Heartbeat:
    """Sent at least every HEARTBEAT_INTERVAL_S while the engine loop is idle (a busy loop's steps count too)."""


@dataclass(frozen=True)
class Dead:
    message: str


FromEngine = Loaded | LoadFailed | Ready | Added | StepDone | Idle | Refreshed | RoutingSet | Heartbeat | Dead

HEARTBEAT_INTERVAL_S = 0.5
