"""POST /v1/completions and /v1/chat/completions, streaming (SSE) and not.

A call becomes one engine request per prompt (a batch of prompts in /v1/completions gives
several); choice `i * n + j` is completion j of prompt i. Leaving a handler in any way (done,
client gone, cancelled) closes every stream, which aborts whatever is still running.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

from aiohttp import web

from jpaged import CompletionOutput, EngineDeadError, RequestStream, SamplingParams
from serve import responses as R
from serve.config import ENGINE, SETTINGS, STATE
from serve.errors import APIError, bad_request, from_value_error, parse, read_json_object
from serve.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest, check_num_logprobs
from serve import tools as T


@dataclasses.dataclass(frozen=True)
class ToolMode:
    """How a chat reply's text becomes tool calls (None on a request without tools or with "none")."""

    functions: list[dict]
    choice: str | dict  # "auto" | "required" | {"type": "function", "function": {"name"}}
    parser: str  # --tool-call-parser, for "auto"

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """(the message's content / tool_calls, finish_reason) of a whole reply."""
        if self.choice == "auto":
            content, calls = T.parse_tool_calls(text, self.parser, {f["name"] for f in self.functions})
        else:
            content, calls = None, (T.calls_from_constrained(text, self.choice) if finish_reason == "stop" else None)
        if not calls:
            return {"content": text}, finish_reason
        return {"content": content, "tool_calls": calls}, "tool_calls"


class Generation:
    """The engine requests behind one API call, their deltas merged into one stream."""

    def __init__(self, streams: list[RequestStream], n: int):
        self.streams = streams
        self.n = n
        self.num_prompt_tokens = sum(len(s.prompt_token_ids) for s in streams)
        # Per stream, its prompt's log-probabilities and ranks once they arrive (with its first output,
        # before any delta of it is yielded) when SamplingParams.prompt_logprobs asked for them.
        self.prompt_logprobs: list[list | None] = [None] * len(streams)
        self.prompt_ranks: list[list | None] = [None] * len(streams)

    async def deltas(self) -> AsyncIterator[CompletionOutput]:
        """Completion deltas whose `index` is the choice index, in the order the engine made them."""
        if len(self.streams) == 1:
            async for out in self.streams[0]:
                self._keep_prompt_logprobs(0, out)
                for c in out.outputs:
                    yield c
            return
        queue: asyncio.Queue = asyncio.Queue(maxsize=len(self.streams))

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    self._keep_prompt_logprobs(i, out)
                    for c in out.outputs:
                        await queue.put((dataclasses.replace(c, index=i * self.n + c.index), None))
            except Exception as e:  # noqa: BLE001 - handed to the reader
                await queue.put((None, e))
            await queue.put((None, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                delta, error = await queue.get()
                if error is not None:
                    raise error
                if delta is None:
                    remaining -= 1
                else:
                    yield delta
        finally:
            for task in tasks:
                task.cancel()

    def usage(self, num_completion_tokens: int) -> dict:
        return R.usage(self.num_prompt_tokens, num_completion_tokens, sum(s.num_cached_tokens for s in self.streams))

    def _keep_prompt_logprobs(self, i: int, out) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs[i], self.prompt_ranks[i] = out.prompt_logprobs, out.prompt_token_ranks

    def vllm_prompt_logprobs(self, tokenizer, num_top: int) -> list[list]:
        """Per stream (prompt), vLLM's prompt_logprobs with num_top alternatives (responses.prompt_logprobs)."""
        return [R.prompt_logprobs(tokenizer, s.prompt_token_ids, lp, ranks, num_top)
                for s, lp, ranks in zip(self.streams, self.prompt_logprobs, self.prompt_ranks)]

    def close(self) -> None:
        for stream in self.streams:
            stream.close()


@dataclasses.dataclass(frozen=True)
class Echo:
    """completions `echo`: each choice starts with its prompt (and the prompt's log-probabilities)."""

    prompt_texts: list[str]  # per prompt
    scoring: bool  # max_tokens 0: the prompt only; the one token generated to get there is dropped

    def prefix(self, gen: Generation, index: int, fmt: R.LogprobFormatter | None) -> tuple[str, dict | None]:
        """The prompt's text and logprobs (None for its first token) of choice `index`."""
        i = index // gen.n
        if fmt is None:
            return self.prompt_texts[i], None
        return self.prompt_texts[i], fmt.prompt(gen.streams[i].prompt_token_ids, gen.prompt_logprobs[i])


def check_model(app: web.Application, model: str | None) -> None:
    name = app[STATE].model_name
    if model is not None and model != name:
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


async def start(app: web.Application, kind: str, prompts: list, params: SamplingParams) -> tuple[str, Generation]:
    """Queues one engine request per prompt: 429 when the queue is full, 400 when the engine refuses one."""
    engine, settings = app[ENGINE], app[SETTINGS]
    if engine.is_dead:
        raise APIError(503, f"The engine is not running: {engine.error!r}", code="engine_dead")
    num_seqs = len(prompts) * params.n
    if engine.num_queued(num_seqs) > settings.max_queued_requests:
        raise APIError(429, f"The server is busy: more than {settings.max_queued_requests} sequences would be "
                            f"waiting. Retry later.", code="rate_limit_exceeded", headers={"Retry-After": "1"})
    response_id = f"{kind}-{uuid.uuid4().hex}"
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(prompts):
            streams.append(await engine.add_request(f"{response_id}-{i}", prompt, params))
    except ValueError as e:
        for stream in streams:
            stream.close()
        error = from_value_error(e, ("stop_token_ids", "logit_bias", "allowed_token_ids"))
        if len(prompts) > 1:
            error.message = f"prompt {i}: {error.message}"
        raise error from None
    except EngineDeadError as e:
        for stream in streams:
            stream.close()
        raise APIError(503, str(e), code="engine_dead") from None
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return response_id, Generation(streams, params.n)


@dataclasses.dataclass
class _Choice:
    text: list[str] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


async def collect(gen: Generation) -> dict[int, _Choice]:
    choices: dict[int, _Choice] = {}
    async for c in gen.deltas():
        choice = choices.setdefault(c.index, _Choice())
        choice.text.append(c.text)
        choice.token_ids += c.token_ids
        choice.logprobs += c.logprobs or []
        choice.finish_reason = c.finish_reason or choice.finish_reason
    return choices


async def event_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    return response


async def _respond(request: web.Request, req: GenerationRequest, gen: Generation, kind: str, response_id: str,
                   fmt: R.LogprobFormatter | None, echo: Echo | None = None,
                   tools: ToolMode | None = None) -> web.StreamResponse:
    """The whole response, streamed or not; closes the generation whatever happens.

    With tools, a streamed reply is held until it ends: then one chunk carries either its text or
    its tool calls (OpenAI's delta format, each call whole) and the finish reason."""
    chat = kind == "chat"
    created, model = int(time.time()), request.app[STATE].model_name
    obj = ("chat.completion" if chat else "text_completion") + (".chunk" if chat and req.stream else "")
    try:
        if not req.stream:
            try:
                choices = await collect(gen)
            except EngineDeadError as e:
                raise APIError(500, str(e), code="engine_dead") from None
            make_choice = R.chat_choice if chat else R.completion_choice
            out, extra = [], {}
            prompt_lps = None
            if req.prompt_logprobs is not None:  # vLLM's places: each completion choice, or the chat response
                prompt_lps = gen.vllm_prompt_logprobs(request.app[ENGINE].tokenizer, req.prompt_logprobs)
                if chat:
                    extra["prompt_logprobs"] = prompt_lps[0]
            if echo is not None and echo.scoring:
                choices = {i: _Choice(finish_reason=c.finish_reason) for i, c in choices.items()}
            for index in sorted(choices):
                c = choices[index]
                text, lp = "".join(c.text), None
                prefix, prefix_lp = echo.prefix(gen, index, fmt) if echo is not None else ("", None)
                if fmt is not None:
                    lp = (fmt.chat(c.token_ids, c.logprobs) if chat
                          else fmt.completion(c.token_ids, c.logprobs, len(prefix)))
                    lp = R.concat_logprobs(prefix_lp, lp) if prefix_lp is not None else lp
                choice = make_choice(index, prefix + text, c.finish_reason, lp)
                if prompt_lps is not None and not chat:
                    choice["prompt_logprobs"] = prompt_lps[index // gen.n]
                if tools is not None:
                    message, choice["finish_reason"] = tools.message(text, c.finish_reason)
                    choice["message"].update(message)
                out.append(choice)
            num_completion = sum(len(c.token_ids) for c in choices.values())
            return web.json_response(R.body(response_id, obj, created, model, out,
                                            usage=gen.usage(num_completion), **extra))

        response = await event_stream(request)
        extra = {"usage": None} if req.include_usage else {}
        if chat:  # the role first, as OpenAI does
            first = [R.chat_delta(i, {"role": "assistant", "content": ""}, None, None)
                     for i in range(len(gen.streams) * gen.n)]
            await response.write(R.sse(R.body(response_id, obj, created, model, first, **extra)))
        num_completion, offsets, held = 0, {}, {}
        try:
            async for c in gen.deltas():
                if echo is not None and c.index not in offsets:  # the prompt first, in a chunk of its own
                    prefix, prefix_lp = echo.prefix(gen, c.index, fmt)
                    offsets[c.index] = len(prefix)
                    await response.write(R.sse(R.body(response_id, obj, created, model,
                                                      [R.completion_choice(c.index, prefix, None, prefix_lp)],
                                                      **extra)))
                if echo is not None and echo.scoring:
                    c = dataclasses.replace(c, text="", token_ids=[], logprobs=None)
                num_completion += len(c.token_ids)
                if req.continuous_usage:
                    extra = {"usage": gen.usage(num_completion)}
                if tools is not None:
                    held[c.index] = held.get(c.index, "") + c.text
                    if c.finish_reason is None:
                        continue
                    message, reason = tools.message(held.pop(c.index), c.finish_reason)
                    delta = {"content": message["content"]} if "tool_calls" not in message else {
                        "tool_calls": [dict(call, index=k) for k, call in enumerate(message["tool_calls"])]}
                    await response.write(R.sse(R.body(response_id, obj, created, model,
                                                      [R.chat_delta(c.index, delta, reason, None)], **extra)))
                    continue
                lp = None
                if fmt is not None and c.token_ids:
                    if chat:
                        lp = fmt.chat(c.token_ids, c.logprobs)
                    else:
                        lp = fmt.completion(c.token_ids, c.logprobs, offsets.get(c.index, 0))
                offsets[c.index] = offsets.get(c.index, 0) + len(c.text)
                # A token whose text is held back (part of a character, maybe a stop string) still gets a
                # chunk, so clients timing tokens see every one; so do token-id-only models' tokens.
                if not (c.text or c.token_ids or c.finish_reason):
                    continue
                if chat:
                    delta = {"content": c.text} if c.text or c.token_ids else {}
                    choice = R.chat_delta(c.index, delta, c.finish_reason, lp)
                else:
                    choice = R.completion_choice(c.index, c.text, c.finish_reason, lp)
                await response.write(R.sse(R.body(response_id, obj, created, model, [choice], **extra)))
        except EngineDeadError as e:
            await response.write(R.sse(APIError(500, str(e), code="engine_dead").body()))
        if req.include_usage:
            await response.write(R.sse(R.body(response_id, obj, created, model, [],
                                              usage=gen.usage(num_completion))))
        await response.write(R.SSE_DONE)
        await response.write_eof()
        return response
    finally:
        gen.close()


async def create_completion(request: web.Request) -> web.StreamResponse:
    app = request.app
    req = parse(CompletionRequest, await read_json_object(request))
    check_model(app, req.model)
    req.check_fields(app[SETTINGS].max_n)
    check_num_logprobs(req.logprobs, app[SETTINGS].max_logprobs, "logprobs")
    check_num_logprobs(req.prompt_logprobs, app[SETTINGS].max_logprobs, "prompt_logprobs")
    prompts = req.prompts()
    tokenizer = app[ENGINE].tokenizer
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    echo = None
    if req.echo:  # lm-eval's scoring: echo, logprobs and max_tokens 0
        texts = [p if isinstance(p, str) else tokenizer.decode(p) if tokenizer is not None else "" for p in prompts]
        echo = Echo(texts, scoring=max_tokens == 0)
        max_tokens = max_tokens or 1
    # echo's logprobs and prompt_logprobs read the same prompt entries: the engine computes the larger k.
    asked = [k for k in (req.logprobs if req.echo else None, req.prompt_logprobs) if k is not None]
    params = req.sampling_params(max_tokens=max_tokens, logprobs=req.logprobs,
                                 prompt_logprobs=max(asked, default=None), constraint=req.constraint())
    response_id, gen = await start(app, "cmpl", prompts, params)
    fmt = None if req.logprobs is None else R.LogprobFormatter(tokenizer, req.logprobs,
                                                               as_token_ids=req.return_tokens_as_token_ids)
    return await _respond(request, req, gen, "completion", response_id, fmt, echo)


def apply_chat_template(tokenizer, messages: list[dict], functions: list[dict] | None = None, *,
                        add_generation_prompt: bool = True, continue_final_message: bool = False,
                        tools: list[dict] | None = None, add_special_tokens: bool = False) -> list[int]:
    """Token ids of a conversation in the model's chat template, by default ready for the assistant's turn.

    Tools (function definitions, or OpenAI's `tools` list), and tool calls / results in the
    history, go through the template when it renders them, else through serve.tools' default
    tool prompt."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise bad_request("This model has no chat template; use /v1/completions", param="messages")
    if add_generation_prompt and continue_final_message:
        raise bad_request("add_generation_prompt and continue_final_message cannot both be true",
                          param="continue_final_message")
    if functions is None and tools:
        functions = [t["function"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    kwargs = {}
    has_tool_history = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if functions or has_tool_history:
        if T.template_renders_tools(tokenizer):
            if functions:
                kwargs["tools"] = [{"type": "function", "function": f} for f in functions]
        else:
            messages = T.default_tool_messages(messages, functions or [])
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **kwargs)
    except Exception as e:  # noqa: BLE001 - the template rejects these messages (jinja raise_exception, ...)
        raise bad_request(f"The chat template cannot format these messages: {e}", param="messages") from None
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    app = request.app
    req = parse(ChatCompletionRequest, await read_json_object(request))
    check_model(app, req.model)
    req.check_fields(app[SETTINGS].max_n)
    check_num_logprobs(req.top_logprobs, app[SETTINGS].max_logprobs, "top_logprobs")
    check_num_logprobs(req.prompt_logprobs, app[SETTINGS].max_logprobs, "prompt_logprobs")
    engine = app[ENGINE]
    functions, tool_choice = T.check_tools(req.tools, req.tool_choice)
    constraint = req.constraint()
    tool_constraint = T.tool_constraint(functions, tool_choice, req.parallel_tool_calls is not False)
    if tool_constraint is not None:
        if constraint is not None:
            raise bad_request("tool_choice 'required' or a named function cannot be combined with another output "
                              "constraint (response_format, structured_outputs)", param="tool_choice")
        constraint = tool_constraint
    tools = ToolMode(functions, tool_choice, app[SETTINGS].tool_call_parser) if tool_choice != "none" else None
    ids = apply_chat_template(engine.tokenizer, [m.as_template_input(i) for i, m in enumerate(req.messages)],
                              functions)
    max_tokens = req.requested_max_tokens
    if max_tokens is None:  # as much as the context leaves
        max_tokens = engine.max_model_len - len(ids)
        if max_tokens < 1:
            raise bad_request(
                f"This model's maximum context length is {engine.max_model_len} tokens. However, your messages "
                f"resulted in {len(ids)} tokens. Please reduce the length of the messages.",
                param="messages", code="context_length_exceeded")
    num_logprobs = req.num_logprobs
    params = req.sampling_params(max_tokens=max_tokens, logprobs=num_logprobs, prompt_logprobs=req.prompt_logprobs,
                                 constraint=constraint)
    response_id, gen = await start(app, "chatcmpl", [ids], params)
    fmt = None if num_logprobs is None else R.LogprobFormatter(engine.tokenizer, num_logprobs,
                                                               as_token_ids=req.return_tokens_as_token_ids)
    return await _respond(request, req, gen, "chat", response_id, fmt, tools=tools)
