"""jpaged: LLM inference on JAX with a paged KV cache."""

from jpaged.async_engine import AsyncLLMEngine, EngineDeadError
from jpaged.config import EngineConfig
from jpaged.engine.llm_engine import LLMEngine
from jpaged.llm import LLM
from jpaged.outputs import CompletionOutput, RequestOutput, RequestOutputKind
from jpaged.request_stream import RequestStream, RequestTimings
from jpaged.sampling_params import SamplingParams
from jpaged.structured import StructuredOutputs

__all__ = [
    "LLM", "SamplingParams", "StructuredOutputs", "EngineConfig", "RequestOutput", "RequestOutputKind", "CompletionOutput",
    "LLMEngine", "AsyncLLMEngine", "EngineDeadError", "RequestStream", "RequestTimings",
]
__version__ = "0.1.0"
