"""How the server exposes its engine: the settings `moe-serve` builds from its flags and the app reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.expert_placement import ExpertPlacement
from engine.token_routing import TokenRouting
from pruning.serving import LivePruning
from server.request_limits import RequestLimits


@dataclass
class ServerSettings:
    """How the server exposes the engine; the engine's own settings live in EngineConfig."""

    model_name: str
    model_path: Path
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    shutdown_grace_s: float = 30.0
    per_expert_series: bool | None = None  # None: on unless layers x experts is large
    expert_window_s: float = 60.0
    pruning_labels: dict[str, str] = field(default_factory=dict)  # pruning settings, for the model-info metric
    limits: RequestLimits = field(default_factory=RequestLimits)
    request_workers: int = 2
    allowed_hosts: frozenset[str] | None = None  # None: any Host header
    body_timeout_s: float = 30.0
    token_routing: TokenRouting = field(default_factory=TokenRouting)  # requests' routing unless they say
    allow_request_routing: bool = True
    substitution_available: bool = False  # the engine holds the experts' similarity maps
    enable_admin_api: bool = False  # GET/POST /v1/routing
    live_pruning: LivePruning | None = None  # pruning switchable through the admin API (engine's live_pruning)
    expert_placement: ExpertPlacement | None = None  # the engine ranks' experts (--expert-parallel N)
    access_log: bool = True  # a log line per request (server/middleware.py)
