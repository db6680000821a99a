"""jpaged: LLM inference on JAX with a paged KV cache."""

from jpaged.config import EngineConfig
from jpaged.llm import LLM
from jpaged.outputs import CompletionOutput, RequestOutput
from jpaged.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
