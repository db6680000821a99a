"""What the engine tracks of each request beyond the scheduler's view, and the RequestOutputs it
builds from that: cumulative, or deltas of what no earlier output carried."""

from __future__ import annotations

import dataclasses

import numpy as np

from jpaged.engine.detokenizer import IncrementalDetokenizer
from jpaged.outputs import CompletionOutput, RequestOutput, RequestOutputKind
from jpaged.sampling_params import SamplingParams
from jpaged.structured import Matcher


@dataclasses.dataclass
class TrackedCompletion:
    """One of a request's n sequences, as the engine tracks its output."""

    index: int
    sched_id: str  # the scheduler's request id
    detokenizer: IncrementalDetokenizer | None
    # Its constraint's state (structured outputs): advanced by every sampled token; it lives as
    # long as the sequence, so a preempted sequence, recomputed from the same tokens, keeps it.
    matcher: Matcher | None = None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    # What DELTA outputs have already carried: token ids (and logprobs), characters, the finish.
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    sent_finish: bool = False

    def visible_text(self) -> str:
        return self.detokenizer.visible_text(self.finish_reason is not None) if self.detokenizer is not None else ""

    def cumulative(self) -> CompletionOutput:
        return CompletionOutput(self.index, self.visible_text(), list(self.token_ids), self.finish_reason,
                                None if self.logprobs is None else list(self.logprobs))

    def delta(self) -> CompletionOutput | None:
        """What is new since the last delta (None if nothing is), now counted as sent."""
        text = self.visible_text()[self.num_sent_chars :]  # visible text only grows (stop strings are held back)
        ids = self.token_ids[self.num_sent_tokens :]
        reason = None if self.sent_finish else self.finish_reason
        if not (text or ids or reason):
            return None
        logprobs = None if self.logprobs is None else self.logprobs[self.num_sent_tokens :]
        self.num_sent_chars += len(text)
        self.num_sent_tokens = len(self.token_ids)
        self.sent_finish = reason is not None or self.sent_finish
        return CompletionOutput(self.index, text, ids, reason, logprobs)


@dataclasses.dataclass
class TrackedRequest:
    req_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[TrackedCompletion]
    output_kind: RequestOutputKind
    # With SamplingParams.prompt_logprobs: one entry per prompt position, None for the first (nothing
    # predicts it); filled by position, so a recomputed (preempted) or n > 1 prefill rewrites equal values.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_token_ranks: list[int | None] | None = None  # beside prompt_logprobs, the same way
    sent_prompt_logprobs: bool = False  # a DELTA output carried them
    # SamplingParams.allowed_token_ids as a token bitmask row, int32 [W]: built once, placed in the
    # step's bitmask (jpaged.engine.step_bitmask) whenever one of its sequences samples.
    allowed_mask: np.ndarray | None = None
    num_cached_tokens: int = 0  # of its first sequence, read when that one finishes its prefill

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)

    def output(self) -> RequestOutput:
        """The output of this step in the request's output kind (a DELTA stream carries the prompt's
        log-probabilities in its first output only)."""
        prompt_logprobs, ranks = self.prompt_logprobs, self.prompt_token_ranks
        if self.output_kind is RequestOutputKind.DELTA:
            completions = [d for c in self.completions if (d := c.delta()) is not None]
            if self.sent_prompt_logprobs:
                prompt_logprobs = ranks = None
            self.sent_prompt_logprobs = True
        else:
            completions = [c.cumulative() for c in self.completions]
        return RequestOutput(self.req_id, self.prompt, self.prompt_token_ids, completions, self.finished,
                             prompt_logprobs=None if prompt_logprobs is None else list(prompt_logprobs),
                             prompt_token_ranks=None if ranks is None else list(ranks),
                             num_cached_tokens=self.num_cached_tokens)
