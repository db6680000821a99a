"""AsyncLLMEngine: the LLMEngine step loop on its own thread, requests as async streams of deltas.

    asyncio loop (handlers)                              engine thread (owns the LLMEngine)
    add_request ─► inbox (SimpleQueue) + wake event ──► add_request / abort, between steps
    RequestStream ◄─ loop.call_soon_threadsafe(push) ◄── step() -> RequestOutput deltas

The LLMEngine is not thread-safe, so only the engine thread touches it (tokenizing is read-only
and happens on the caller's side). The engine emits deltas (RequestOutputKind.DELTA: a step
costs what it generated, not what the requests hold); a stream merges the deltas its reader has
not taken yet, so a client that reads slower than the engine writes gets one merged delta,
never a backlog.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from jpaged.engine.llm_engine import LLMEngine, PromptType
from jpaged.outputs import RequestOutput, RequestOutputKind
from jpaged.request_stream import RequestStream, RequestTimings
from jpaged.sampling_params import SamplingParams

logger = logging.getLogger("jpaged")

# Prompts longer than this (characters) are tokenized off the event loop.
_INLINE_TOKENIZE_CHARS = 8192
# Process 0 of a group, idle, checks its workers this often: a dead one fails /health within it.
_PING_INTERVAL_S = 1.0


class EngineDeadError(RuntimeError):
    """The engine thread failed or stopped; no request can run any more."""


@dataclasses.dataclass
class _Add:
    stream: RequestStream
    prompt: dict[str, Any]
    params: SamplingParams
    priority: int
    accepted: asyncio.Future  # resolved on the event loop: None, or the exception add_request raised


@dataclasses.dataclass
class _Abort:
    req_id: str


class AsyncLLMEngine:
    """Runs an LLMEngine on a dedicated thread; `generate()` streams each request's deltas.

    Start with `start()` inside a running event loop; stop with `await shutdown()`.
    """

    def __init__(self, engine: LLMEngine, *, log_interval_s: float = 5.0):
        self.engine = engine
        self.log_interval_s = log_interval_s
        self.request_listeners: list[Callable[[RequestTimings], None]] = []  # called when a request ends
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jpaged-engine", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._live: dict[str, RequestStream] = {}  # requests the engine runs; engine thread only
        self._stopping = False
        self._error: BaseException | None = None
        # Read by the event loop, written by the engine thread: guarded by _lock.
        self._lock = threading.Lock()
        self._num_pending = 0  # sequences handed over but not yet in the engine's own counts
        self._stats: dict[str, float] = self._snapshot()
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        self._restart_log_window()

    # -- properties the server reads ------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_dead(self) -> bool:
        return self._error is not None

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def stats(self) -> dict[str, float]:
        """The engine's get_stats() as of the last step, plus prompt/generation token totals."""
        with self._lock:
            return dict(self._stats)

    @property
    def num_waiting(self) -> int:
        """Sequences not yet in the running batch: handed over, or waiting in the engine."""
        with self._lock:
            return self._num_pending + int(self._stats["num_requests_waiting"])

    def num_queued(self, num_new: int = 0) -> int:
        """Sequences that must wait for a running one to finish (with `num_new` more arriving): those
        handed over or waiting in the engine, beyond the free places of the batch."""
        with self._lock:
            stats, pending = self._stats, self._num_pending
        free = max(self.engine.config.max_num_seqs - stats["num_requests_running"], 0)
        return max(pending + int(stats["num_requests_waiting"]) + num_new - free, 0)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def shutdown(self) -> None:
        """Stops the engine thread after its current step; unfinished requests are aborted."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    # -- requests -------------------------------------------------------------------------
    async def add_request(
        self, req_id: str, prompt: PromptType, params: SamplingParams, *, priority: int = 0
    ) -> RequestStream:
        """Hands a request to the engine thread and waits until it is queued (at most one step).

        Raises ValueError (nothing queued) when the engine rejects it, EngineDeadError when the
        engine is gone. Closing the returned stream before it finishes aborts the request.
        """
        self._check_alive()
        if self._loop is None:
            raise RuntimeError("AsyncLLMEngine.start() was not called")
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        if isinstance(text, str) and len(text) > _INLINE_TOKENIZE_CHARS and not isinstance(prompt, dict):
            text, ids = await asyncio.to_thread(self.engine.tokenize_prompt, prompt)
        else:
            text, ids = self.engine.tokenize_prompt(prompt)
        stream = RequestStream(req_id, ids, params.n, on_close=self.abort, on_done=self._request_done)
        accepted = self._loop.create_future()
        with self._lock:
            self._num_pending += params.n
        self._inbox.put(_Add(stream, {"prompt": text, "prompt_token_ids": ids}, params, priority, accepted))
        self._wake.set()
        if self._stopping:  # stopped or died after the check above: the thread may never read the inbox
            self._reply(accepted, self._dead_error() if self._error else EngineDeadError("the engine is shutting down"))
        try:
            error = await accepted
        except asyncio.CancelledError:  # the caller is gone before the engine took the request
            self.abort(req_id)  # it may be queued a moment later
            stream.timings.aborted = True
            self._request_done(stream.timings)
            raise
        if error is not None:
            raise error
        return stream

    async def generate(
        self, prompt: PromptType, params: SamplingParams, req_id: str, *, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Deltas of one request: each RequestOutput holds the text / token ids / logprobs new since
        the previous one, for the completions that advanced; the last has finished=True.
        Leaving the loop early (or a cancelled task) aborts the request."""
        stream = await self.add_request(req_id, prompt, params, priority=priority)
        with stream:
            async for out in stream:
                yield out

    def abort(self, req_id: str) -> None:
        """Aborts a request; its KV blocks are freed before the engine's next step. Thread-safe."""
        self._inbox.put(_Abort(req_id))
        self._wake.set()

    def _check_alive(self) -> None:
        if self._error is not None:
            raise self._dead_error()
        if self._stopping:
            raise EngineDeadError("the engine is shutting down")

    def _dead_error(self) -> EngineDeadError:
        return EngineDeadError(f"the engine failed: {self._error!r}")

    def _request_done(self, timings: RequestTimings) -> None:
        for listener in self.request_listeners:
            try:
                listener(timings)
            except Exception:  # a metrics bug must not break a request
                logger.exception("request listener failed")

    # -- engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                self._apply_inbox()
                if not self.engine.has_unfinished():
                    # No busy loop while idle: add_request and abort set the event.
                    if not self._wake.wait(_PING_INTERVAL_S if self.engine.leads_workers else None):
                        self.engine.ping_workers()
                        continue
                    self._wake.clear()
                    self._restart_log_window()
                    continue
                outputs = self.engine.step()
                now = time.monotonic()
                self._count_tokens(outputs)
                self._refresh_stats()  # before the outputs go out: a reader never sees older stats
                self._dispatch(outputs, now)
                self._maybe_log()
            for req_id in list(self._live):
                self.engine.abort(req_id)
            self.engine.stop_workers()
            self._fail_everything(EngineDeadError("the engine shut down"))
        except BaseException as exc:  # noqa: BLE001 - any failure of the engine is fatal for all requests
            logger.exception("engine step failed; failing every in-flight request")
            self._error = exc
            self._fail_everything(self._dead_error())

    def _apply_inbox(self) -> None:
        num_added, num_items = 0, 0
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            num_items += 1
            if isinstance(item, _Abort):
                if self._live.pop(item.req_id, None) is not None:
                    self.engine.abort(item.req_id)
                continue
            num_added += item.params.n
            stream = item.stream
            try:
                self.engine.add_request(stream.req_id, item.prompt, item.params, priority=item.priority,
                                        output_kind=RequestOutputKind.DELTA)
            except ValueError as exc:
                self._reply(item.accepted, exc)
                continue
            self._live[stream.req_id] = stream
            self._num_prompt_tokens += len(stream.prompt_token_ids)
            self._reply(item.accepted, None)
        if num_items:  # /metrics must show freed blocks even when the engine goes idle now
            self._refresh_stats(num_added)

    def _count_tokens(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.req_id in self._live:
                self._num_generation_tokens += sum(len(c.token_ids) for c in out.outputs)

    def _dispatch(self, outputs: list[RequestOutput], now: float) -> None:
        for out in outputs:
            stream = self._live.get(out.req_id)
            if stream is None:
                continue  # aborted while the step ran
            if out.finished:
                del self._live[out.req_id]
            self._call_soon(stream.push, out, now)

    def _refresh_stats(self, num_applied: int = 0) -> None:
        stats = self.engine.get_stats()
        stats["prompt_tokens"] = self._num_prompt_tokens
        stats["generation_tokens"] = self._num_generation_tokens
        with self._lock:
            self._stats = stats
            self._num_pending -= num_applied  # now counted by the engine

    def _snapshot(self) -> dict[str, float]:
        stats = self.engine.get_stats()
        stats.update(prompt_tokens=0, generation_tokens=0)
        return stats

    def _restart_log_window(self) -> None:
        """Status lines report rates since the previous line, or since the engine was last idle."""
        self._last_log = (time.monotonic(), self._num_prompt_tokens, self._num_generation_tokens,
                          self._stats["prefix_cache_queries"], self._stats["prefix_cache_hits"])

    def _maybe_log(self) -> None:
        now = time.monotonic()
        then, prompt, gen, queries, hits = self._last_log
        if now - then < self.log_interval_s:
            return
        s = self._stats
        dq, dh = s["prefix_cache_queries"] - queries, s["prefix_cache_hits"] - hits
        logger.info(
            "running %d, waiting %d, KV usage %.1f%%, prompt %.1f tokens/s, generation %.1f tokens/s, "
            "prefix-cache hit rate %.1f%%",
            s["num_requests_running"], s["num_requests_waiting"] + self._num_pending, 100 * s["kv_cache_usage"],
            (self._num_prompt_tokens - prompt) / (now - then), (self._num_generation_tokens - gen) / (now - then),
            100 * dh / dq if dq else 0.0,
        )
        self._last_log = (now, self._num_prompt_tokens, self._num_generation_tokens,
                          s["prefix_cache_queries"], s["prefix_cache_hits"])

    def _fail_everything(self, error: Exception) -> None:
        self._stopping = True  # set before draining: an add that arrives later sees it in _check_alive
        for stream in self._live.values():
            self._call_soon(stream.fail, error)
        self._live.clear()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Add):
                self._reply(item.accepted, error)

    def _reply(self, future: asyncio.Future, error: BaseException | None) -> None:
        def resolve():
            if not future.done():
                future.set_result(error)

        if threading.current_thread() is self._thread:
            self._call_soon(resolve)
        else:
            resolve()

    def _call_soon(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass
