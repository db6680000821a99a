"""What generation returns, in vLLM's shape."""

from __future__ import annotations

import dataclasses
import enum


class RequestOutputKind(enum.Enum):
    """What LLMEngine.step returns for a request (vLLM's names). Each step's outputs cost time in
    proportion to what they carry, so a caller asks only for what it reads."""

    CUMULATIVE = "cumulative"  # after every step that advanced it: everything generated so far
    DELTA = "delta"  # after every step that advanced it: only what is new (text, ids, logprobs, finish)
    FINAL_ONLY = "final_only"  # once, when it has finished: everything


@dataclasses.dataclass
class CompletionOutput:
    index: int  # which of the request's n completions
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (end of sequence, stop token or string), "length", "abort"; None while running
    # Per generated token: {token_id: logprob} for the sampled token and the top alternatives,
    # when SamplingParams.logprobs is set.
    logprobs: list[dict[int, float]] | None = None


@dataclasses.dataclass
class RequestOutput:
    req_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # With SamplingParams.prompt_logprobs: per prompt token, {token_id: logprob} for the prompt's token and
    # the top alternatives given the tokens before it; None for the first token. A DELTA stream carries
    # it in its first output only.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # Beside prompt_logprobs: each prompt token's rank among the vocabulary given the tokens before it
    # (1 = the most likely; ties count against it, as vLLM); None for the first token.
    prompt_token_ranks: list[int | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (of the first of n sequences)
