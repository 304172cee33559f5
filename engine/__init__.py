"""moe-serve's engine: load Hugging Face MoE checkpoints and generate with continuous batching."""

from engine.config import CheckpointError, ModelConfig, RouterBalancing
from engine.llm import LLM
from engine.llm_engine import EngineConfig, LLMEngine
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.routing import RoutingPolicy
from engine.sampling_params import InvalidRequestError, SamplingParams

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
    "RouterBalancing",
    "RoutingPolicy",
    "SamplingParams",
]
