"""AsyncLLMEngine on the tiny llama (token ids): deltas vs the engine driven offline, slow readers, aborts,
rejections, idleness and a fatal step error."""

from __future__ import annotations

import asyncio
import time

import pytest

from jpaged import AsyncLLMEngine, EngineConfig, EngineDeadError, LLMEngine, SamplingParams

PROMPT = [5, 17, 33, 42, 9, 11, 70]


@pytest.fixture(scope="module")
def engine(tiny_models):
    converted = tiny_models["llama"][2]
    return LLMEngine(EngineConfig(model=str(converted), max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32))


def offline(engine: LLMEngine, prompt, params: SamplingParams):
    """The final RequestOutput of a request run alone, stepping the engine by hand."""
    engine.add_request("offline", prompt, params)
    while True:
        for out in engine.step():
            if out.finished:
                return out


def run(engine: LLMEngine, body):
    """Runs body(async_engine) on a fresh AsyncLLMEngine over `engine`, then stops it."""

    async def main():
        async_engine = AsyncLLMEngine(engine, log_interval_s=0.05)
        async_engine.start()
        try:
            return await body(async_engine)
        finally:
            await async_engine.shutdown()

    return asyncio.run(main())


def test_deltas_add_up_to_the_offline_output(engine):
    params = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=12, logprobs=2, ignore_eos=True)
    expected = offline(engine, PROMPT, params)

    async def body(ae):
        ids, logprobs, reasons, finished = {0: [], 1: []}, {0: [], 1: []}, {}, []
        async for out in ae.generate(PROMPT, params, "r1"):
            finished.append(out.finished)
            assert out.prompt_token_ids == PROMPT
            for c in out.outputs:
                assert c.index not in reasons, "a delta after the finish reason"
                ids[c.index] += c.token_ids
                logprobs[c.index] += c.logprobs
                if c.finish_reason:
                    reasons[c.index] = c.finish_reason
        return ids, logprobs, reasons, finished

    ids, logprobs, reasons, finished = run(engine, body)
    assert finished[-1] and not any(finished[:-1])
    for c in expected.outputs:
        assert ids[c.index] == c.token_ids and logprobs[c.index] == c.logprobs
        assert reasons[c.index] == c.finish_reason == "length"


def test_slow_reader_gets_one_merged_delta(engine):
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    expected = offline(engine, PROMPT, params).outputs[0].token_ids

    async def body(ae):
        stream = await ae.add_request("slow", PROMPT, params)
        with stream:
            first = await anext(stream)
            while not stream.finished:  # the engine runs on while nobody reads
                await asyncio.sleep(0.01)
            rest = await anext(stream)
            with pytest.raises(StopAsyncIteration):
                await anext(stream)
        return first, rest

    first, rest = run(engine, body)
    assert len(rest.outputs[0].token_ids) > 1 and rest.finished
    assert first.outputs[0].token_ids + rest.outputs[0].token_ids == expected


def test_abort_frees_blocks_within_a_step_and_the_idle_thread_sleeps(engine, monkeypatch):
    calls = {"step": 0, "has_unfinished": 0}
    step, has_unfinished = engine.step, engine.has_unfinished

    def counting(name, fn):
        def wrapper():
            calls[name] += 1
            return fn()
        return wrapper

    monkeypatch.setattr(engine, "step", counting("step", step))
    monkeypatch.setattr(engine, "has_unfinished", counting("has_unfinished", has_unfinished))
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)

    async def body(ae):
        async for _ in ae.generate(PROMPT, params, "gone"):
            assert ae.stats["kv_cache_usage"] > 0
            break  # leaving the loop closes the generator, which aborts the request
        steps_at_abort = calls["step"]
        deadline = time.monotonic() + 5
        while ae.stats["kv_cache_usage"] > 0 or ae.stats["num_requests_running"] > 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        steps_to_free = calls["step"] - steps_at_abort
        await asyncio.sleep(0.1)
        idle_calls = calls["has_unfinished"]
        await asyncio.sleep(0.5)
        return steps_to_free, calls["has_unfinished"] - idle_calls, ae.stats

    steps_to_free, idle_checks, stats = run(engine, body)
    assert steps_to_free <= 1
    assert idle_checks == 0  # asleep on the wake event, not polling
    assert stats["num_requests_waiting"] == 0 and stats["generation_tokens"] < 50
    assert not engine.has_unfinished()


def test_rejected_request_raises_and_the_engine_goes_on(engine):
    async def body(ae):
        too_long = r"maximum context length is 64 tokens\. However, you requested 71 tokens \(61 in the prompt, 10 for"
        with pytest.raises(ValueError, match=too_long):
            await ae.add_request("long", PROMPT * 8 + [1, 2, 3, 4, 5], SamplingParams(max_tokens=10))
        with pytest.raises(ValueError, match=r"out of vocabulary"):
            await ae.add_request("bad", [10**6], SamplingParams())
        outs = [out async for out in ae.generate(PROMPT, SamplingParams(temperature=0, max_tokens=3), "ok")]
        return outs, ae.num_waiting, ae.num_queued(), ae.num_queued(6)

    outs, num_waiting, num_queued, num_queued_after_6 = run(engine, body)
    assert sum(len(o.outputs[0].token_ids) for o in outs) == 3 and outs[-1].finished
    assert num_waiting == 0 and num_queued == 0
    assert num_queued_after_6 == 2  # 4 places in the batch



def test_a_failing_step_fails_every_in_flight_request(engine, monkeypatch):
    step = engine.step
    num_steps = {"n": 0}

    def failing_step():
        num_steps["n"] += 1
        if num_steps["n"] > 3:
            raise RuntimeError("device lost")
        return step()

    monkeypatch.setattr(engine, "step", failing_step)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

    async def body(ae):
        streams = [await ae.add_request(f"f{i}", PROMPT[: i + 2], params) for i in range(2)]
        errors = []
        for stream in streams:
            with pytest.raises(EngineDeadError, match="device lost") as e:
                async for _ in stream:
                    pass
            errors.append(e.value)
        with pytest.raises(EngineDeadError):
            await ae.add_request("late", PROMPT, params)
        return ae.is_dead, errors

    is_dead, errors = run(engine, body)
    assert is_dead and len(errors) == 2
    for req_id in ("f0", "f1"):  # leave the shared engine clean for later tests
        engine.abort(req_id)
