"""Per-request sampling settings."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable

from jpaged.structured.params import StructuredOutputs

MAX_LOGIT_BIAS = 300  # logit_bias entries per request: the width of the sampler's per-row bias arrays


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. Frozen; validated on construction (ValueError names the field)."""

    n: int = 1
    """Completions per prompt, >= 1; they share the prompt's KV blocks."""
    temperature: float = 1.0
    """Softmax temperature, >= 0. 0 means greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens (< 2**31); 0 or -1 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p, in (0, 1]."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one, in [0, 1]."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted once per earlier occurrence in the output, in [-2, 2]."""
    repetition_penalty: float = 1.0
    """> 0; logits of tokens seen in prompt or output are divided (if positive) or multiplied by it; 1 = off."""
    seed: int | None = None
    """Random seed of this request, any int64 (as OpenAI and vLLM accept); the engine reduces it to the
    device's 32-bit stream deterministically. None draws one from the engine's generator."""
    max_tokens: int = 16
    """Most tokens to generate, >= 1."""
    min_tokens: int = 0
    """End-of-sequence and stop tokens are not honoured before this many tokens, >= 0."""
    stop: tuple[str, ...] = ()
    """Strings that end the output; the match is not included in the text."""
    include_stop_str_in_output: bool = False
    """Keep the stop string that ended the output at the end of the text (vLLM's extension)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the output (the token is kept in token_ids)."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens."""
    logprobs: int | None = None
    """Return the log-probability of each sampled token and of the top `logprobs` alternatives (0..20)."""
    prompt_logprobs: int | None = None
    """Return the log-probability of each prompt token (after the first) given the ones before it, and of
    the top `prompt_logprobs` alternatives (0..20), as vLLM. Such a request skips the prefix cache: a cached
    block's tokens would have no logits."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the text."""
    structured_outputs: StructuredOutputs | None = None
    """A constraint on the output (JSON schema, regex, choice, grammar, any JSON object), enforced
    by a token mask on every step; a dict is taken as StructuredOutputs' keywords. The output ends
    with finish_reason "stop" when the constraint is complete, "length" if max_tokens comes first."""
    logit_bias: dict[int, float] | None = None
    """{token id: bias in [-100, 100]} added to the raw logits before anything else (at most
    MAX_LOGIT_BIAS entries): +100 all but forces a token, -100 all but bans it. Ids are checked
    against the vocabulary when the request is added."""
    allowed_token_ids: tuple[int, ...] | None = None
    """Sample only among these token ids (vLLM's extension; a list is taken as a tuple); None allows
    all. Non-empty; ids are checked against the vocabulary when the request is added. Applied as a
    token mask on the device, like structured outputs, so log-probabilities are those of the masked
    distribution; with a constraint too, a token must be allowed by both (a step where they share
    none follows the constraint alone: an empty mask would leave nothing to sample)."""

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if isinstance(self.structured_outputs, dict):
            object.__setattr__(self, "structured_outputs", StructuredOutputs(**self.structured_outputs))
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            raise ValueError(f"structured_outputs must be a StructuredOutputs or None, got {self.structured_outputs!r:.100}")

        def check(ok: bool, field: str, rule: str):
            if not ok:
                raise ValueError(f"{field} must be {rule}, got {getattr(self, field)!r}")

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        check(is_int(self.n) and self.n >= 1, "n", "an integer >= 1")
        check(is_num(self.temperature) and self.temperature >= 0, "temperature", ">= 0")
        # Per-request values become int32 / uint32 device arrays: out-of-range ones would fail the step.
        check(is_int(self.top_k) and -1 <= self.top_k < 2**31, "top_k", "an integer in [-1, 2**31) (0 or -1 = off)")
        check(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]")
        check(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]")
        check(is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]")
        check(is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]")
        check(is_num(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty", "> 0")
        check(self.seed is None or (is_int(self.seed) and -(2**63) <= self.seed < 2**63), "seed",
              "an integer in [-2**63, 2**63) or None")
        check(is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1")
        check(is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
              "an integer in [0, max_tokens]")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings")
        check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "non-negative token ids")
        check(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= 20), "logprobs",
              "None or an integer in [0, 20]")
        check(self.prompt_logprobs is None or (is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= 20),
              "prompt_logprobs", "None or an integer in [0, 20]")
        if self.logit_bias is not None:
            bias = self.logit_bias
            check(isinstance(bias, dict) and all(is_int(t) and t >= 0 for t in bias), "logit_bias",
                  "a dict of non-negative token ids to biases")
            check(len(bias) <= MAX_LOGIT_BIAS, "logit_bias", f"at most {MAX_LOGIT_BIAS} entries")
            check(all(is_num(v) and -100 <= v <= 100 for v in bias.values()), "logit_bias", "biases in [-100, 100]")
            object.__setattr__(self, "logit_bias", {int(t): float(v) for t, v in bias.items()})
        if self.allowed_token_ids is not None:
            self._check_allowed_token_ids()

    def _check_allowed_token_ids(self) -> None:
        # The list may be most of the vocabulary: messages name the first bad id, not the list.
        given = self.allowed_token_ids
        ids = () if isinstance(given, (str, bytes, dict)) or not isinstance(given, Iterable) else tuple(given)
        if not ids:
            raise ValueError(f"allowed_token_ids must be None or a non-empty list of token ids, got {given!r:.100}")
        bad = next((t for t in ids if not isinstance(t, numbers.Integral) or isinstance(t, bool) or t < 0), None)
        if bad is not None:
            raise ValueError(f"allowed_token_ids must hold non-negative token ids, got {bad!r:.100}")
        object.__setattr__(self, "allowed_token_ids", tuple(int(t) for t in ids))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0
