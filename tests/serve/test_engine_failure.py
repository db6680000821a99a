"""A fatal engine error, in-process (aiohttp's test server, tiny llama): in-flight requests fail with an
error, /health turns 503, new requests get 503, and nothing crashes."""

from __future__ import annotations

import asyncio
import json

from aiohttp.test_utils import TestClient, TestServer

from jpaged import EngineConfig, LLMEngine
from serve import ServerSettings, create_app


def test_engine_failure_fails_in_flight_requests_and_health_turns_503(tiny_models, monkeypatch):
    config = EngineConfig(model=str(tiny_models["llama"][2]), max_model_len=64, max_num_seqs=4,
                          max_num_batched_tokens=32)
    engines = []

    def make_engine():
        engine = LLMEngine(config)
        step, calls = engine.step, []

        def failing_step():
            calls.append(1)
            if len(calls) > 4:
                raise RuntimeError("device lost")
            return step()

        monkeypatch.setattr(engine, "step", failing_step)
        engines.append(engine)
        return engine

    body = {"prompt": [5, 6, 7], "max_tokens": 40, "ignore_eos": True, "temperature": 0}
    dead = {"message": "the engine failed: RuntimeError('device lost')", "type": "server_error", "param": None,
            "code": "engine_dead"}

    async def main():
        app = create_app(ServerSettings(engine=config), make_engine)
        async with TestClient(TestServer(app)) as client:
            assert (await client.get("/health")).status == 200
            streamed, plain = await asyncio.gather(
                client.post("/v1/completions", json={**body, "stream": True}),
                client.post("/v1/completions", json=body),
            )
            assert streamed.status == 200  # the stream had started; the error comes as an event
            events = (await streamed.text()).strip().split("\n\n")
            assert events[-2:] == [f"data: {json.dumps({'error': dead}, separators=(',', ':'))}", "data: [DONE]"]
            assert (plain.status, await plain.json()) == (500, {"error": dead})

            health = await client.get("/health")
            assert health.status == 503
            assert (await health.json())["error"]["code"] == "engine_dead"
            late = await client.post("/v1/completions", json=body)
            assert late.status == 503 and (await late.json())["error"]["code"] == "engine_dead"
            assert (await client.get("/metrics")).status == 200  # still answering

    asyncio.run(main())
    assert len(engines) == 1


def test_token_id_model_streams_a_chunk_per_token(tiny_models):
    """A model without a tokenizer: token-id prompts, empty texts, but still streamed chunks and usage."""
    config = EngineConfig(model=str(tiny_models["llama"][2]), max_model_len=64, max_num_seqs=4,
                          max_num_batched_tokens=32)
    body = {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 5, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}

    async def main():
        async with TestClient(TestServer(create_app(ServerSettings(engine=config)))) as client:
            r = await client.post("/v1/completions", json=body)
            events = (await r.text()).strip().split("\n\n")
            chat = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            return r.status, events, chat.status, await chat.json()

    status, events, chat_status, chat_body = asyncio.run(main())
    assert status == 200 and events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15,
                                  "prompt_tokens_details": {"cached_tokens": 0}}
    per_choice = {0: [], 1: []}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        assert choice["text"] == ""
        per_choice[choice["index"]].append(choice["finish_reason"])
    # Up to one chunk per token: a reader slower than the engine gets consecutive deltas merged.
    for reasons in per_choice.values():
        assert 1 <= len(reasons) <= 5 and reasons == [None] * (len(reasons) - 1) + ["length"]
    assert chat_status == 400
    assert chat_body["error"]["message"] == "This model has no chat template; use /v1/completions"
