"""Response bodies and stream chunks in OpenAI's shapes (plain dicts, ready for json.dumps)."""

from __future__ import annotations

import json
from typing import Any

# The end of every event stream.
SSE_DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event: `data: {json}` and a blank line."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage; cached_tokens: prompt tokens whose KV came from the prefix cache."""
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens,
            "prompt_tokens_details": {"cached_tokens": num_cached_tokens}}


def _top(entry: dict[int, float], num_top: int) -> list[tuple[int, float]]:
    """The num_top most likely (token id, logprob) of an entry. An entry holds the sampled (or prompt)
    token and the top alternatives; that token may not be among them."""
    return sorted(entry.items(), key=lambda item: -item[1])[:num_top]


class LogprobFormatter:
    """Turns the engine's per-token {token_id: logprob} dicts into the two OpenAI formats."""

    def __init__(self, tokenizer, num_top: int, *, as_token_ids: bool = False):
        self.tokenizer = tokenizer
        self.num_top = num_top
        self.as_token_ids = as_token_ids  # vLLM's return_tokens_as_token_ids: "token_id:<id>" for every token

    def token(self, token_id: int) -> str:
        if self.tokenizer is None or self.as_token_ids:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def completion(self, token_ids: list[int], logprobs: list[dict[int, float]], text_offset: int) -> dict[str, Any]:
        """The legacy completions format: parallel lists, top alternatives as {token: logprob}."""
        tokens, offsets = [], []
        for token_id in token_ids:
            tokens.append(self.token(token_id))
            offsets.append(text_offset)
            text_offset += len(tokens[-1])
        # As vLLM: each top_logprobs entry holds the sampled token besides the top alternatives, so
        # `logprobs: 0` still names it (k + 1 entries when it is not among the top k).
        return {
            "tokens": tokens,
            "token_logprobs": [entry[t] for t, entry in zip(token_ids, logprobs)],
            "top_logprobs": [{self.token(a): lp for a, lp in _top(entry, self.num_top)} | {tok: entry[t]}
                             for tok, t, entry in zip(tokens, token_ids, logprobs)],
            "text_offset": offsets,
        }

    def prompt(self, token_ids: list[int], logprobs: list[dict[int, float] | None]) -> dict[str, Any]:
        """An echoed prompt in the completions format; the first token has no log-probability (null)."""
        first = self.token(token_ids[0])
        rest = self.completion(token_ids[1:], logprobs[1:], len(first))
        return {"tokens": [first, *rest["tokens"]], "token_logprobs": [None, *rest["token_logprobs"]],
                "top_logprobs": [None, *rest["top_logprobs"]], "text_offset": [0, *rest["text_offset"]]}

    def chat(self, token_ids: list[int], logprobs: list[dict[int, float]]) -> dict[str, Any]:
        """The chat format: one object per token with its bytes and its top alternatives."""

        def item(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.token(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [
            {**item(t, entry[t]), "top_logprobs": [item(alt, lp) for alt, lp in _top(entry, self.num_top)]}
            for t, entry in zip(token_ids, logprobs)
        ]}


# vLLM's stand-in for a log-probability of -inf, which JSON cannot carry.
MIN_LOGPROB = -9999.0


def prompt_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float] | None],
                    ranks: list[int | None], num_top: int) -> list[dict[int, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: None for the first prompt token (nothing predicts it), then per token
    {token id: {logprob, rank, decoded_token}} for the prompt's token (its rank in the vocabulary) and
    the num_top most likely alternatives (ranks 1..num_top)."""

    def item(token_id: int, logprob: float, rank: int) -> dict[str, Any]:
        decoded = None if tokenizer is None else tokenizer.decode([token_id], skip_special_tokens=False)
        return {"logprob": max(logprob, MIN_LOGPROB), "rank": rank, "decoded_token": decoded}

    out: list[dict[int, dict[str, Any]] | None] = [None]
    for token_id, entry, rank in zip(token_ids[1:], logprobs[1:], ranks[1:]):
        position = {token_id: item(token_id, entry[token_id], rank)}
        position.update((t, item(t, lp, i + 1)) for i, (t, lp) in enumerate(_top(entry, num_top)) if t != token_id)
        out.append(position)
    return out


def concat_logprobs(first: dict[str, list], then: dict[str, list]) -> dict[str, list]:
    """Two completions-format logprobs objects one after the other (an echoed prompt, then the completion)."""
    return {key: first[key] + then[key] for key in first}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict[str, str], finish_reason: str | None, logprobs: dict | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def body(response_id: str, obj: str, created: int, model: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
    """The envelope shared by responses and chunks."""
    return {"id": response_id, "object": obj, "created": created, "model": model, "choices": choices, **extra}
