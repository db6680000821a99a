"""One request's output collector: deltas in (engine side), merged deltas out (reader side).

The engine pushes a RequestOutput delta after every step that advanced the request; the
collector appends it to what the reader has not taken yet (text, token ids and logprobs per
completion, its finish reason), so however slowly the reader reads, it gets every token exactly
once, in one merged delta per read. Everything here runs on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

from jpaged.outputs import CompletionOutput, RequestOutput


@dataclasses.dataclass
class RequestTimings:
    """When a request's tokens arrived (time.monotonic seconds), for latency metrics."""

    req_id: str
    num_prompt_tokens: int
    arrival_time: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    inter_token_latencies: list[float] = dataclasses.field(default_factory=list)  # between steps that advanced it
    num_generation_tokens: int = 0  # over all n sequences
    finish_reasons: list[str | None] = dataclasses.field(default_factory=list)
    aborted: bool = False  # closed before the engine finished it

    @property
    def e2e_latency(self) -> float | None:
        return None if self.last_token_time is None or self.aborted else self.last_token_time - self.arrival_time


class RequestStream:
    """Async iterator of one request's deltas; a context manager that aborts it if left unfinished."""

    def __init__(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        n: int,
        *,
        on_close: Callable[[str], None],
        on_done: Callable[[RequestTimings], None],
    ):
        self.req_id = req_id
        self.prompt_token_ids = prompt_token_ids
        self.timings = RequestTimings(req_id, len(prompt_token_ids), time.monotonic())
        self._on_close = on_close
        self._on_done = on_done
        self._prompt: str | None = None
        self._pending: dict[int, CompletionOutput] = {}  # by completion index: what the reader has not taken
        self._finish_reasons: list[str | None] = [None] * n
        self._returned_last = False  # the reader has had the output that says finished
        self._error: BaseException | None = None
        self._event = asyncio.Event()
        self.finished = False  # the engine sent the last output
        # (prompt_logprobs, prompt_token_ranks) received, not yet handed to the reader
        self._prompt_logprobs: tuple[list, list] | None = None
        self.num_cached_tokens = 0  # prompt tokens the prefix cache supplied
        self._closed = False

    # -- engine side (called on the event loop through call_soon_threadsafe) ---------------
    def push(self, out: RequestOutput, now: float) -> None:
        t = self.timings
        if t.first_token_time is None:
            t.first_token_time = now
        else:
            t.inter_token_latencies.append(now - t.last_token_time)
        t.last_token_time = now
        self._prompt = out.prompt
        if out.prompt_logprobs is not None:  # the async engine streams deltas: this comes once
            self._prompt_logprobs = out.prompt_logprobs, out.prompt_token_ranks
        self.num_cached_tokens = out.num_cached_tokens
        for c in out.outputs:
            t.num_generation_tokens += len(c.token_ids)
            self._finish_reasons[c.index] = c.finish_reason or self._finish_reasons[c.index]
            held = self._pending.get(c.index)
            if held is None:
                self._pending[c.index] = CompletionOutput(c.index, c.text, list(c.token_ids), c.finish_reason,
                                                          None if c.logprobs is None else list(c.logprobs))
                continue
            held.text += c.text
            held.token_ids += c.token_ids
            if c.logprobs is not None:
                held.logprobs = held.logprobs or []
                held.logprobs += c.logprobs
            held.finish_reason = c.finish_reason or held.finish_reason
        if out.finished and not self.finished:
            self.finished = True
            t.finish_reasons = list(self._finish_reasons)
            if not self._closed:
                self._on_done(t)
        self._event.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    # -- reader side ----------------------------------------------------------------------
    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            if self._pending or (self.finished and not self._returned_last):
                merged = [self._pending[i] for i in sorted(self._pending)]
                self._pending = {}
                self._returned_last = self.finished
                prompt_logprobs, ranks = self._prompt_logprobs or (None, None)
                self._prompt_logprobs = None
                return RequestOutput(self.req_id, self._prompt, self.prompt_token_ids, merged, self.finished,
                                     prompt_logprobs=prompt_logprobs, prompt_token_ranks=ranks,
                                     num_cached_tokens=self.num_cached_tokens)
            if self._error is not None:
                raise self._error
            if self.finished or self._closed:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()

    def close(self) -> None:
        """Aborts the request unless the engine already finished it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.finished and self._error is None:
            self.timings.aborted = True
            self._on_close(self.req_id)
            self._on_done(self.timings)
        self._event.set()

    def __enter__(self) -> RequestStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
