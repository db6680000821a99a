"""Server settings and the typed application keys shared by the app and its handlers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from aiohttp import web

from jpaged import AsyncLLMEngine, EngineConfig, LLMEngine


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """Options of `jpaged serve` beyond the engine's. Validated on construction."""

    engine: EngineConfig = EngineConfig(warmup="full")
    """The engine to serve (full warm-up: nothing compiles once the server is ready)."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8000
    """TCP port; 0 picks a free one (the start-up log names it)."""
    api_key: str | None = None
    """When set, /v1/*, /tokenize and /detokenize need `Authorization: Bearer <api_key>`."""
    served_model_name: str | None = None
    """The model's name in the API; None = the --model argument, or the default model's name."""
    max_queued_requests: int = 256
    """Sequences that may wait for a place in the batch; beyond that, requests get 429."""
    max_n: int = 8
    """Largest `n` (completions per prompt) a request may ask for."""
    max_logprobs: int = 20
    """Most log-probability alternatives (logprobs, top_logprobs) a request may ask for; at most 20, the
    width the sampler computes every step."""
    max_body_bytes: int = 1 << 20
    """Largest request body; larger ones get 413."""
    drain_timeout_s: float = 30.0
    """On SIGTERM, how long in-flight requests may take to finish before they are cancelled."""
    log_interval_s: float = 5.0
    """Seconds between status lines while requests are running."""
    tool_call_parser: str = "hermes"
    """How tool calls are found in a reply under tool_choice "auto": hermes | llama3_json."""

    def __post_init__(self):
        def check(ok: bool, field: str, rule: str):
            if not ok:
                raise ValueError(f"{field} must be {rule}, got {getattr(self, field)!r}")

        check(0 <= self.port < 65536, "port", "in [0, 65535]")
        check(self.api_key is None or len(self.api_key) > 0, "api_key", "non-empty")
        check(self.max_queued_requests >= 0, "max_queued_requests", ">= 0")
        check(self.max_n >= 1, "max_n", ">= 1")
        check(0 <= self.max_logprobs <= 20, "max_logprobs", "in [0, 20]")
        check(self.max_body_bytes >= 1024, "max_body_bytes", ">= 1024")
        check(self.drain_timeout_s >= 0, "drain_timeout_s", ">= 0")
        check(self.log_interval_s > 0, "log_interval_s", "> 0")
        check(self.tool_call_parser in ("hermes", "llama3_json"), "tool_call_parser", "hermes or llama3_json")


@dataclasses.dataclass
class ServerState:
    """What changes while the server runs (event loop only)."""

    model_name: str = ""
    created: int = 0  # unix time the model was loaded (the `created` of /v1/models)
    draining: bool = False  # SIGTERM received: new requests get 503
    num_in_flight: int = 0  # requests being handled


SETTINGS = web.AppKey("settings", ServerSettings)
STATE = web.AppKey("state", ServerState)
ENGINE = web.AppKey("engine", AsyncLLMEngine)
ENGINE_FACTORY = web.AppKey("engine_factory", Callable[[], LLMEngine])
