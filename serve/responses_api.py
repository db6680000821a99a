"""POST /v1/responses, OpenAI's Responses API, for text: `input` as a string or messages,
`instructions`, `max_output_tokens`, sampling fields, streaming with its typed events, usage.

Server-side state is refused with a 400: this server keeps no responses, so `previous_response_id`,
`store: true` and `background` cannot be honoured; so are tools (text only here).

    streamed: response.created → response.in_progress → response.output_item.added →
              response.content_part.added → response.output_text.delta ... → response.output_text.done →
              response.content_part.done → response.output_item.done → response.completed
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from aiohttp import web
from pydantic import Field

from jpaged import EngineDeadError
from serve import openai_routes as routes
from serve.config import ENGINE, SETTINGS, STATE
from serve.errors import APIError, bad_request, parse, read_json_object
from serve.protocol import ChatMessage, GenerationRequest


class ResponsesRequest(GenerationRequest):
    """POST /v1/responses (the GenerationRequest fields are vLLM's extensions here)."""

    input: str | list[ChatMessage] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = None
    previous_response_id: str | None = None
    background: bool = False
    tools: list[dict[str, Any]] | None = None

    def check_fields(self, max_n: int) -> None:
        super().check_fields(max_n)
        if self.max_tokens is not None:
            raise bad_request("max_tokens is not a field of the Responses API; use max_output_tokens",
                              param="max_tokens")
        if self.n != 1:
            raise bad_request("n is not a field of the Responses API; send several requests", param="n")
        for field in ("previous_response_id", "background"):
            if getattr(self, field):
                raise bad_request(f"{field} is not supported: this server keeps no responses", param=field)
        if self.tools:
            raise bad_request("tools are not supported in /v1/responses (text only)", param="tools")
        if self.prompt_logprobs is not None:
            raise bad_request("prompt_logprobs is not supported in /v1/responses; use /v1/completions or "
                              "/v1/chat/completions", param="prompt_logprobs")

    def messages(self) -> list[dict[str, Any]]:
        """The conversation for the chat template: instructions as the system message, then the input."""
        msgs = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return msgs + [{"role": "user", "content": self.input}]
        out = []
        for i, m in enumerate(self.input):
            # Responses content parts are {"type": "input_text" | "output_text", "text": ...}.
            if isinstance(m.content, list):
                m = m.model_copy(update={"content": [
                    {**part, "type": "text"} if isinstance(part, dict) and part.get("type") in (
                        "input_text", "output_text") else part for part in m.content]})
            message = m.as_template_input(i)
            message.pop("type", None)  # {"type": "message", ...} items
            out.append(message)
        return msgs + out


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: ".encode() + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"


def _response(rid: str, created: int, model: str, req: ResponsesRequest, status: str,
              output: list[dict], usage: dict | None, incomplete: str | None = None) -> dict[str, Any]:
    return {
        "id": rid, "object": "response", "created_at": created, "status": status, "model": model,
        "output": output, "usage": usage, "error": None,
        "incomplete_details": None if incomplete is None else {"reason": incomplete},
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "temperature": req.temperature, "top_p": req.top_p, "parallel_tool_calls": False, "tool_choice": "none",
        "tools": [], "text": {"format": {"type": "text"}}, "previous_response_id": None, "store": False,
        "metadata": {},
    }


def _message(msg_id: str, text: str, status: str) -> dict[str, Any]:
    content = [] if status == "in_progress" else [{"type": "output_text", "text": text, "annotations": []}]
    return {"type": "message", "id": msg_id, "status": status, "role": "assistant", "content": content}


def _usage(gen: routes.Generation, num_output: int) -> dict[str, Any]:
    u = gen.usage(num_output)
    return {"input_tokens": u["prompt_tokens"], "output_tokens": num_output, "total_tokens": u["total_tokens"],
            "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens_details": {"reasoning_tokens": 0}}


async def create_response(request: web.Request) -> web.StreamResponse:
    app = request.app
    req = parse(ResponsesRequest, await read_json_object(request))
    routes.check_model(app, req.model)
    req.check_fields(app[SETTINGS].max_n)
    engine = app[ENGINE]
    ids = routes.apply_chat_template(engine.tokenizer, req.messages())
    max_tokens = req.max_output_tokens if req.max_output_tokens is not None else engine.max_model_len - len(ids)
    params = req.sampling_params(max_tokens=max_tokens, logprobs=None)
    _, gen = await routes.start(app, "resp", [ids], params)
    rid, msg_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
    created, model = int(time.time()), app[STATE].model_name
    try:
        if not req.stream:
            try:
                choice = (await routes.collect(gen))[0]
            except EngineDeadError as e:
                raise APIError(500, str(e), code="engine_dead") from None
            text, length = "".join(choice.text), choice.finish_reason == "length"
            return web.json_response(_response(
                rid, created, model, req, "incomplete" if length else "completed",
                [_message(msg_id, text, "incomplete" if length else "completed")],
                _usage(gen, len(choice.token_ids)), "max_output_tokens" if length else None))

        response = await routes.event_stream(request)
        seq = iter(range(1 << 62))

        async def send(event_type: str, **fields: Any) -> None:
            await response.write(_sse({"type": event_type, "sequence_number": next(seq), **fields}))

        where = {"item_id": msg_id, "output_index": 0, "content_index": 0}
        start = _response(rid, created, model, req, "in_progress", [], None)
        await send("response.created", response=start)
        await send("response.in_progress", response=start)
        await send("response.output_item.added", output_index=0, item=_message(msg_id, "", "in_progress"))
        await send("response.content_part.added", **where, part={"type": "output_text", "text": "", "annotations": []})
        text, num_output, reason = [], 0, None
        try:
            async for c in gen.deltas():
                num_output += len(c.token_ids)
                reason = c.finish_reason or reason
                if c.text:
                    text.append(c.text)
                    await send("response.output_text.delta", **where, delta=c.text, logprobs=[])
        except EngineDeadError as e:
            await send("error", code="engine_dead", message=str(e), param=None)
            await response.write_eof()
            return response
        full, status = "".join(text), "incomplete" if reason == "length" else "completed"
        await send("response.output_text.done", **where, text=full, logprobs=[])
        await send("response.content_part.done", **where, part={"type": "output_text", "text": full, "annotations": []})
        item = _message(msg_id, full, status)
        await send("response.output_item.done", output_index=0, item=item)
        await send(f"response.{status}", response=_response(
            rid, created, model, req, status, [item], _usage(gen, num_output),
            "max_output_tokens" if status == "incomplete" else None))
        await response.write_eof()
        return response
    finally:
        gen.close()
