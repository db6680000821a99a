"""Fast checks of the server's pieces without a model: request models, validation errors, deltas,
logprob formats, the API-key check and the error middleware."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from jpaged import CompletionOutput, RequestOutput, RequestStream, SamplingParams
from serve.app import _has_key
from serve.errors import APIError, error_middleware, parse
from serve.protocol import ChatCompletionRequest, CompletionRequest
from serve.responses import LogprobFormatter, sse


def _api_error(fn, *args) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*args)
    return e.value


@pytest.mark.parametrize("prompt, expected", [
    ("hi", ["hi"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_prompt_forms(prompt, expected):
    assert parse(CompletionRequest, {"prompt": prompt}).prompts() == expected


@pytest.mark.parametrize("prompt", [None, 3, [], [1, "a"], [[]], [True, 2], {"x": 1}])
def test_bad_prompts_are_400_naming_prompt(prompt):
    e = _api_error(parse(CompletionRequest, {"prompt": prompt}).prompts)
    assert (e.status, e.param) == (400, "prompt")


def test_fields_map_onto_sampling_params():
    req = parse(CompletionRequest, {
        "prompt": "x", "max_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 4, "min_p": 0.1, "seed": 9,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2, "n": 2, "stop": "\n",
        "stop_token_ids": [2], "ignore_eos": True, "min_tokens": 3, "logprobs": 1,
    })
    params = req.sampling_params(max_tokens=req.max_tokens, logprobs=req.logprobs)
    assert params == SamplingParams(n=2, temperature=0.0, top_p=0.5, top_k=4, min_p=0.1, seed=9, presence_penalty=0.5,
                                    frequency_penalty=-0.5, repetition_penalty=1.2, max_tokens=7, min_tokens=3,
                                    stop=("\n",), stop_token_ids=(2,), ignore_eos=True, logprobs=1)
    defaults = parse(CompletionRequest, {"prompt": "x"})
    assert defaults.sampling_params(max_tokens=16, logprobs=None) == SamplingParams(max_tokens=16)


@pytest.mark.parametrize("body, message, param", [
    ({"temperature": -0.1}, "temperature must be >= 0, got -0.1", "temperature"),
    ({"top_k": -2}, "top_k must be an integer in [-1, 2**31) (0 or -1 = off), got -2", "top_k"),
    ({"min_tokens": 99}, "min_tokens must be an integer in [0, max_tokens], got 99", "min_tokens"),
    ({"seed": -(2**63) - 1}, f"seed must be an integer in [-2**63, 2**63) or None, got {-(2**63) - 1}", "seed"),
    ({"logprobs": 21}, "logprobs must be None or an integer in [0, 20], got 21", "logprobs"),
    ({"stop": [""]}, "stop must be non-empty strings, got ('',)", "stop"),
])
def test_out_of_range_values_are_400_naming_the_field(body, message, param):
    req = parse(CompletionRequest, {"prompt": "x", **body})
    with pytest.raises(APIError) as e:
        req.sampling_params(max_tokens=16, logprobs=req.logprobs)
    assert (e.value.status, e.value.message, e.value.param) == (400, message, param)


@pytest.mark.parametrize("body, message, param", [
    ({"prompt": "x", "temperature": "0.5"}, "temperature: Input should be a valid number", "temperature"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens: Input should be a valid integer", "max_tokens"),
    ({"prompt": "x", "n": True}, "n: Input should be a valid integer", "n"),
    ({"prompt": "x", "stop": ["a", 3]}, "stop.1: Input should be a valid string", "stop.1"),
    ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage: Input should be a "
                                                                  "valid boolean", "stream_options.include_usage"),
    ({}, "'prompt' is a required property", "prompt"),
])
def test_wrong_types_are_400_naming_the_field(body, message, param):
    e = _api_error(parse, CompletionRequest, body)
    assert (e.status, e.message, e.param) == (400, message, param)


def test_unknown_fields_are_logged_and_ignored(caplog):
    with caplog.at_level(logging.INFO, logger="jpaged.serve"):
        req = parse(CompletionRequest, {"prompt": "x", "frobnicate": 3, "zeal": True})
    assert req.prompts() == ["x"]
    assert "ignoring unknown fields of CompletionRequest: frobnicate, zeal" in caplog.text


def test_chat_fields():
    req = parse(ChatCompletionRequest, {
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                     {"role": "assistant", "content": None}],
        "max_completion_tokens": 5, "max_tokens": 9, "logprobs": True, "top_logprobs": 3,
    })
    assert [m.as_template_input(i) for i, m in enumerate(req.messages)] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": ""}]
    assert (req.requested_max_tokens, req.num_logprobs) == (5, 3)
    assert parse(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}]}).num_logprobs is None
    bad = parse(ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    e = _api_error(bad.messages[0].as_template_input, 0)
    assert (e.status, e.param) == (400, "messages.0.content")
    e = _api_error(parse, ChatCompletionRequest, {"messages": [{"content": "no role"}]})
    assert (e.status, e.param) == (400, "messages.0.role")


def test_stream_merges_what_a_slow_reader_missed_and_aborts_when_closed():
    def out(deltas, finished):
        """deltas: (index, text, first token id, finish reason); one token id per character."""
        return RequestOutput("r", None, [1, 2], [
            CompletionOutput(i, t, list(range(first, first + len(t))), r, [{0: -0.5}] * len(t))
            for i, t, first, r in deltas], finished)

    async def main():
        aborted, done = [], []
        stream = RequestStream("r", [1, 2], 2, on_close=aborted.append, on_done=done.append)
        stream.push(out([(0, "a", 0, None)], False), 1.0)
        stream.push(out([(0, "b", 1, None), (1, "x", 0, None)], False), 1.5)
        stream.push(out([(0, "c", 2, "length")], False), 2.0)
        first = await anext(stream)
        stream.push(out([(1, "y", 1, "stop")], True), 2.5)
        second = await anext(stream)
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
        stream.close()  # finished: nothing to abort

        other = RequestStream("q", [1], 1, on_close=aborted.append, on_done=done.append)
        other.push(RequestOutput("q", None, [1], [CompletionOutput(0, "z", [4], None)], False), 3.0)
        with other:
            await anext(other)
        return first, second, aborted, done

    first, second, aborted, done = asyncio.run(main())
    assert [(c.index, c.text, c.token_ids, c.finish_reason, len(c.logprobs)) for c in first.outputs] == [
        (0, "abc", [0, 1, 2], "length", 3), (1, "x", [0], None, 1)]
    assert [(c.index, c.text, c.token_ids, c.finish_reason) for c in second.outputs] == [(1, "y", [1], "stop")]
    assert second.finished and not first.finished
    assert aborted == ["q"]
    assert done[0].inter_token_latencies == [0.5, 0.5, 0.5] and done[0].finish_reasons == ["length", "stop"]
    assert done[0].num_generation_tokens == 5 and not done[0].aborted
    assert done[1].aborted and done[1].e2e_latency is None


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(f"<{i}>" for i in ids)


def test_logprob_formats():
    fmt = LogprobFormatter(_Tokenizer(), num_top=2)
    # Token 7 was sampled although 3 and 5 were likelier (the engine adds the sampled one to the top list).
    entries = [{7: -2.0, 3: -0.1, 5: -0.5}, {3: -0.2, 5: -1.0}]
    assert fmt.completion([7, 3], entries, text_offset=4) == {
        "tokens": ["<7>", "<3>"], "token_logprobs": [-2.0, -0.2],
        "top_logprobs": [{"<3>": -0.1, "<5>": -0.5, "<7>": -2.0}, {"<3>": -0.2, "<5>": -1.0}], "text_offset": [4, 7]}
    chat = fmt.chat([7], entries[:1])["content"][0]
    assert chat == {"token": "<7>", "logprob": -2.0, "bytes": list(b"<7>"), "top_logprobs": [
        {"token": "<3>", "logprob": -0.1, "bytes": list(b"<3>")},
        {"token": "<5>", "logprob": -0.5, "bytes": list(b"<5>")}]}
    assert sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()


@pytest.mark.parametrize("header, ok", [
    ("Bearer k3y", True), ("bearer k3y", True), ("Bearer k3y ", True), ("Bearer k3", False), ("Bearer k3yy", False),
    ("k3y", False), ("Basic k3y", False), (None, False), ("Bearer ", False),
])
def test_api_key_check(header, ok):
    request = make_mocked_request("GET", "/v1/models", headers={"Authorization": header} if header else {})
    assert _has_key(request, "k3y") is ok


def test_error_middleware_shapes_every_error():
    async def boom(request):
        raise RuntimeError("bug")

    async def echo(request):
        return web.json_response(await request.json())

    async def main():
        app = web.Application(middlewares=[error_middleware], client_max_size=1024)
        app.router.add_routes([web.get("/boom", boom), web.post("/echo", echo)])
        async with TestClient(TestServer(app)) as client:
            results = {}
            for name, call in {"boom": client.get("/boom"), "missing": client.get("/missing"),
                               "method": client.get("/echo"), "large": client.post("/echo", data=b"x" * 4096)}.items():
                r = await call
                results[name] = (r.status, (await r.json())["error"], r.headers.get("Allow"))
            return results

    results = asyncio.run(main())
    assert results["boom"] == (500, {"message": "Internal server error", "type": "server_error", "param": None,
                                     "code": None}, None)
    assert results["missing"][:2] == (404, {"message": "Not found: GET /missing", "type": "invalid_request_error",
                                            "param": None, "code": None})
    assert results["method"][0] == 405 and results["method"][2] == "POST"
    assert results["large"][0] == 413 and "Maximum request body size 1024 exceeded" in results["large"][1]["message"]


def test_stream_returns_a_finish_that_carries_nothing_new():
    async def main():
        stream = RequestStream("r", [1], 1, on_close=lambda req_id: None, on_done=lambda timings: None)
        stream.push(RequestOutput("r", "p", [1], [CompletionOutput(0, "a", [5], None)], False), 1.0)
        first = await anext(stream)
        stream.push(RequestOutput("r", "p", [1], [], True), 1.5)
        last = await anext(stream)
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
        return first, last

    first, last = asyncio.run(main())
    assert not first.finished and first.outputs[0].text == "a" and first.prompt == "p"
    assert last.finished and last.outputs == []
