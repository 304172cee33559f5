"""moe-serve's engine: load Hugging Face MoE checkpoints and generate with continuous batching.

Names are imported on first use, so that light modules (sampling parameters, request limits, the tokenizer)
can be used without importing torch: the server's request workers read them and nothing else.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from engine.paths import use_inductor_cache

use_inductor_cache()  # before anything imports torch's compiler, which reads the variable once

_EXPORTS = {
    "LLM": "engine.llm",
    "CheckpointError": "engine.config",
    "CompletionOutput": "engine.outputs",
    "EngineConfig": "engine.llm_engine",
    "InvalidRequestError": "engine.sampling_params",
    "LLMEngine": "engine.llm_engine",
    "Logprob": "engine.outputs",
    "ModelConfig": "engine.config",
    "RequestOutput": "engine.outputs",
    "RequestOutputKind": "engine.sampling_params",
    "RouterBalancing": "engine.config",
    "RoutingPolicy": "engine.routing",
    "SamplingParams": "engine.sampling_params",
    "TokenRouting": "engine.token_routing",
}
__all__ = [
    "LLM",
    "CheckpointError",
    "CompletionOutput",
    "EngineConfig",
    "InvalidRequestError",
    "LLMEngine",
    "Logprob",
    "ModelConfig",
    "RequestOutput",
    "RequestOutputKind",
    "RouterBalancing",
    "RoutingPolicy",
    "SamplingParams",
    "TokenRouting",
]

if TYPE_CHECKING:
    from engine.config import CheckpointError, ModelConfig, RouterBalancing
    from engine.llm import LLM
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.outputs import CompletionOutput, Logprob, RequestOutput
    from engine.routing import RoutingPolicy
    from engine.sampling_params import InvalidRequestError, RequestOutputKind, SamplingParams
    from engine.token_routing import TokenRouting


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
