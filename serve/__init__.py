"""OpenAI-compatible HTTP server (aiohttp) over jpaged's AsyncLLMEngine: `jpaged serve`."""

from serve.app import create_app, run_server, serve
from serve.config import ServerSettings

__all__ = ["create_app", "serve", "run_server", "ServerSettings"]
