"""One request's output collector: cumulative outputs in (engine side), deltas out (reader side).

The engine pushes the request's newest cumulative RequestOutput after every step it advanced;
the collector keeps only the newest. The reader gets the difference to what it already returned
(text[len(sent):], token_ids[len(sent):], logprobs likewise, a finish reason once), so however
slowly it reads, it gets every token exactly once. Everything here runs on the event loop.
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


@dataclasses.dataclass
class _Sent:
    num_chars: int = 0
    num_token_ids: int = 0
    num_logprobs: int = 0
    finished: bool = False


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
        self._latest: RequestOutput | None = None
        self._has_new = False
        self._error: BaseException | None = None
        self._event = asyncio.Event()
        self._sent = [_Sent() for _ in range(n)]
        self.finished = False  # the engine sent the last output
        self._closed = False

    # -- engine side (called on the event loop through call_soon_threadsafe) ---------------
    def push(self, out: RequestOutput, now: float) -> None:
        t = self.timings
        if t.first_token_time is None:
            t.first_token_time = now
        else:
            t.inter_token_latencies.append(now - t.last_token_time)
        t.last_token_time = now
        self._latest, self._has_new = out, True
        if out.finished and not self.finished:
            self.finished = True
            t.num_generation_tokens = sum(len(c.token_ids) for c in out.outputs)
            t.finish_reasons = [c.finish_reason for c in out.outputs]
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
            if self._has_new:
                self._has_new = False
                delta = self._delta(self._latest)
                if delta.outputs or delta.finished:
                    return delta
            if self._error is not None:
                raise self._error
            if self.finished or self._closed:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()

    def _delta(self, out: RequestOutput) -> RequestOutput:
        changed = []
        for c in out.outputs:
            sent = self._sent[c.index]
            text, ids = c.text[sent.num_chars :], c.token_ids[sent.num_token_ids :]
            logprobs = None if c.logprobs is None else c.logprobs[sent.num_logprobs :]
            reason = c.finish_reason if c.finish_reason is not None and not sent.finished else None
            if not (text or ids or reason):
                continue
            sent.num_chars, sent.num_token_ids = len(c.text), len(c.token_ids)
            sent.num_logprobs = 0 if c.logprobs is None else len(c.logprobs)
            sent.finished = sent.finished or reason is not None
            changed.append(CompletionOutput(c.index, text, ids, reason, logprobs))
        return RequestOutput(out.req_id, out.prompt, out.prompt_token_ids, changed, out.finished)

    def close(self) -> None:
        """Aborts the request unless the engine already finished it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.finished and self._error is None:
            self.timings.aborted = True
            if self._latest is not None:
                self.timings.num_generation_tokens = sum(len(c.token_ids) for c in self._latest.outputs)
            self._on_close(self.req_id)
            self._on_done(self.timings)
        self._event.set()

    def __enter__(self) -> RequestStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
