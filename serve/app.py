"""The aiohttp application: factory, engine lifecycle, API-key guard, and `serve()` with SIGTERM drain.

    create_app(settings) ─ middlewares: error_middleware (outermost) → guard_middleware → handler
                         └ cleanup_ctx: LLMEngine built off the event loop → AsyncLLMEngine thread
    serve(settings)      ─ listen; on SIGTERM/SIGINT stop accepting, let in-flight requests finish
                           (up to drain_timeout_s, then cancel them), stop the engine, return 0;
                           if the engine dies (a worker process of a group among the causes),
                           answer 503 for a moment, then stop and return 1 for a restart
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import signal
import socket
import time
from collections.abc import Callable

from aiohttp import web

from jpaged import AsyncLLMEngine, LLMEngine
from serve.config import ENGINE, ENGINE_FACTORY, SETTINGS, STATE, ServerSettings, ServerState
from serve.errors import APIError, error_middleware
from serve.metrics import METRICS, ServerMetrics
from serve.routes import OPEN_PATHS, ROUTES

logger = logging.getLogger("jpaged.serve")

# After the engine dies: how long /health answers 503 (and in-flight requests get their errors)
# before the process exits non-zero, so an orchestrator restarts it or its group.
ENGINE_DEATH_GRACE_S = 2.0


def _has_key(request: web.Request, api_key: str) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        token = ""
    # Digests have equal lengths, so the comparison takes the same time whatever the token is.
    return hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(),
                               hashlib.sha256(api_key.encode()).digest())


@web.middleware
async def guard_middleware(request: web.Request, handler) -> web.StreamResponse:
    """API key (except on open paths), no new work while draining, and the in-flight count."""
    settings, state = request.app[SETTINGS], request.app[STATE]
    if request.path not in OPEN_PATHS:
        if settings.api_key is not None and not _has_key(request, settings.api_key):
            raise APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if state.draining:
            raise APIError(503, "The server is shutting down", code="shutting_down")
    state.num_in_flight += 1
    try:
        return await handler(request)
    finally:
        state.num_in_flight -= 1


async def _engine_ctx(app: web.Application):
    """Builds the engine (minutes of warm-up, off the event loop), runs it, and stops it at exit."""
    settings, state = app[SETTINGS], app[STATE]
    llm_engine = await asyncio.to_thread(app[ENGINE_FACTORY])
    engine = AsyncLLMEngine(llm_engine, log_interval_s=settings.log_interval_s)
    engine.start()
    state.model_name = settings.served_model_name or settings.engine.model or llm_engine.model_dir.name
    state.created = int(time.time())
    metrics = ServerMetrics(engine, state.model_name)
    engine.request_listeners.append(metrics.observe)
    app[ENGINE], app[METRICS] = engine, metrics
    logger.info("model %s (from %s): max_model_len %d, KV cache capacity %d tokens; loaded in %.1fs, "
                "warm-up %.1fs", state.model_name, llm_engine.model_dir, llm_engine.max_model_len,
                llm_engine.kv_capacity_tokens, llm_engine.load_seconds, llm_engine.warmup_seconds)
    try:
        yield
    finally:
        await engine.shutdown()


def create_app(settings: ServerSettings, make_engine: Callable[[], LLMEngine] | None = None) -> web.Application:
    """The server's application; `make_engine` (default: LLMEngine(settings.engine)) runs at start-up."""
    app = web.Application(middlewares=[error_middleware, guard_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[STATE] = ServerState()
    app[ENGINE_FACTORY] = make_engine or (lambda: LLMEngine(settings.engine))
    app.cleanup_ctx.append(_engine_ctx)
    app.router.add_routes(ROUTES)
    return app


async def _engine_death(engine: AsyncLLMEngine) -> None:
    """Returns ENGINE_DEATH_GRACE_S after the engine has died."""
    while not engine.is_dead:
        await asyncio.sleep(0.1)
    logger.error("the engine died (%r); exiting in %.0fs", engine.error, ENGINE_DEATH_GRACE_S)
    await asyncio.sleep(ENGINE_DEATH_GRACE_S)


async def serve(settings: ServerSettings, make_engine: Callable[[], LLMEngine] | None = None) -> int:
    """Runs the server until SIGTERM or SIGINT, then drains and returns 0; or until the engine
    dies, then returns 1."""
    start = time.perf_counter()
    # Bind before the minutes of warm-up: a taken port fails at once, and the port is ours meanwhile.
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.create_server((settings.host, settings.port), family=family, backlog=1024)
    app = create_app(settings, make_engine)
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True,
                           shutdown_timeout=settings.drain_timeout_s)
    try:
        await runner.setup()  # builds the engine
    except BaseException:
        sock.close()
        raise
    status = 0
    try:
        site = web.SockSite(runner, sock)
        await site.start()
        host, port = runner.addresses[0][:2]
        logger.info("jpaged serve: ready on http://%s:%d (start-up %.1fs); API at http://%s:%d/v1",
                    host, port, time.perf_counter() - start, host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        signalled, death = asyncio.create_task(stop.wait()), asyncio.create_task(_engine_death(app[ENGINE]))
        await asyncio.wait([signalled, death], return_when=asyncio.FIRST_COMPLETED)
        for task in (signalled, death):
            task.cancel()
        if death.done() and not death.cancelled():
            status = 1
        state = app[STATE]
        state.draining = True
        logger.info("shutting down: no new requests; %d in flight get up to %.0fs to finish",
                    state.num_in_flight, settings.drain_timeout_s)
    finally:
        await runner.cleanup()  # stops listening, waits for in-flight handlers, then stops the engine
    logger.info("jpaged serve: stopped")
    return status


def run_server(settings: ServerSettings, make_engine: Callable[[], LLMEngine] | None = None) -> int:
    """serve() in a new event loop; returns its exit status."""
    return asyncio.run(serve(settings, make_engine))
