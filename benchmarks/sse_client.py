"""One streamed OpenAI-compatible request, timed: the client side of the serving benchmark.

The server answers with server-sent events, one JSON chunk per `data:` line and a final
`data: [DONE]`:

    data: {"choices": [{"text": "Hel"}]}                      /v1/completions
    data: {"choices": [{"delta": {"content": "Hel"}}]}        /v1/chat/completions
    data: {"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 3}}
    data: [DONE]

Lines are read with `response.content`'s line iterator, so an event split across TCP reads is
handled (and timed) once its line is complete. A chunk counts as a token when its text is
non-empty: a server may hold back text (an incomplete UTF-8 character) or send a role-only
first chat delta, and neither has produced anything a user would see. A model without a
tokenizer (random weights of a shape, `--dummy-config`) streams no text at all: when a stream
has none, its last chunks with a choice, as many as usage's completion_tokens at most, count as
the tokens instead (a server that is ahead of its client merges tokens into fewer chunks).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import aiohttp

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
ENDPOINTS = (COMPLETIONS, CHAT_COMPLETIONS)


@dataclasses.dataclass(frozen=True)
class RequestInput:
    prompt: list[int] | str  # token ids (completions only) or text
    num_prompt_tokens: int  # as drawn; the server's usage count replaces it when present
    max_tokens: int  # tokens to generate; EOS is ignored, so exactly this many


@dataclasses.dataclass
class RequestOutput:
    success: bool = False
    error: str = ""  # one line; empty on success
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # usage.completion_tokens, else the number of token chunks
    ttft: float = 0.0  # seconds from sending the request to the first non-empty token chunk
    itls: list[float] = dataclasses.field(default_factory=list)  # seconds between successive token chunks
    e2e: float = 0.0  # seconds from sending the request to the end of the stream


def build_payload(endpoint: str, model: str, req: RequestInput) -> dict[str, Any]:
    """The request body: greedy, EOS ignored, streamed with a final usage chunk."""
    payload: dict[str, Any] = dict(
        model=model, max_tokens=req.max_tokens, ignore_eos=True, temperature=0.0, stream=True,
        stream_options={"include_usage": True},
    )
    if endpoint == CHAT_COMPLETIONS:
        payload["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        payload["prompt"] = req.prompt
    return payload


def one_line(text: str, limit: int = 300) -> str:
    """Whitespace collapsed and truncated, so an error prints as one line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_message(status: int, body: str) -> str:
    """`HTTP 400: <message>`, the message taken from an OpenAI error body when there is one."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body
    return one_line(f"HTTP {status}: {message}")


def _chunk_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    text = choice.get("text")
    if text is None:
        text = (choice.get("delta") or {}).get("content")
    return text or ""


async def send_request(session: aiohttp.ClientSession, url: str, payload: dict[str, Any],
                       num_prompt_tokens: int) -> RequestOutput:
    """Sends one streamed request and times its tokens; never raises for a failed request."""
    out = RequestOutput(num_prompt_tokens=num_prompt_tokens)
    num_chunks, usage, is_done = 0, None, False
    start = last = time.perf_counter()
    textless: list[float] = []  # arrival times of chunks with a choice, for a stream without text
    try:
        async with session.post(url, json=payload) as response:
            if response.status != 200:
                out.error = error_message(response.status, await response.text())
                return out
            async for raw in response.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue  # blank separators, `: keep-alive` comments, `event:` fields
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    is_done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:  # an error after the 200 status line arrives as an event
                    error = chunk["error"]
                    message = error.get("message", error) if isinstance(error, dict) else error
                    out.error = one_line(f"stream error: {message}")
                    return out
                usage = chunk.get("usage") or usage
                choices = chunk.get("choices") or []
                if choices:  # the last one may carry the final tokens with finish_reason
                    textless.append(time.perf_counter())
                if _chunk_text(chunk):
                    now = time.perf_counter()
                    if num_chunks == 0:
                        out.ttft = now - start
                    else:
                        out.itls.append(now - last)
                    last = now
                    num_chunks += 1
        out.e2e = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 - a benchmark records any failure of one request and carries on
        out.error = one_line(f"{type(e).__name__}: {e}")
        return out
    if not is_done:
        out.error = "stream ended without data: [DONE]"
        return out
    if num_chunks == 0 and textless and usage and usage.get("completion_tokens"):
        textless = textless[-usage["completion_tokens"]:]  # past a leading empty (role) chunk
        num_chunks, out.ttft = len(textless), textless[0] - start
        out.itls = [b - a for a, b in zip(textless, textless[1:])]
    if num_chunks == 0:
        out.error = "no tokens in the stream"
        return out
    if usage:
        out.num_prompt_tokens = usage.get("prompt_tokens", num_prompt_tokens)
        out.num_output_tokens = usage.get("completion_tokens", num_chunks)
    else:
        out.num_output_tokens = num_chunks
    out.success = True
    return out
