"""The real server (a `python -m jpaged serve` subprocess, default model) through the official openai client.

Greedy outputs are compared with the offline engine (`default_llm`, the same model and sizes,
each prompt alone), so a streaming, batching or abort bug shows up as different text.
"""

from __future__ import annotations

import collections
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from jpaged import SamplingParams

pytestmark = pytest.mark.default_model

MODEL = "SmolLM2-135M-Instruct"
# The sizes of the session's `default_llm`, so server and offline engine share compiled steps.
SERVER_ARGS = ["--max-model-len", "512", "--max-num-batched-tokens", "128", "--max-num-seqs", "8",
               "--log-interval", "1"]
MAX_TOKENS = 12
PROMPTS = ["The capital of France is", "Once upon a time, a small robot", "The three primary colors are",
           "def fibonacci(n):"]
QUESTIONS = ["What is the capital of France?", "Name a fruit that is yellow.", "What is 2 + 3?",
             "Say hello in Spanish."]


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(*SERVER_ARGS)


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


@pytest.fixture(scope="module")
def reference(server, default_llm):
    """Offline greedy outputs, each prompt alone: ("completion" | "chat", i) -> (text, token count, reason).
    Built after the server is up, so the server's warm-up fills the compilation cache first."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    refs = {}
    for i, prompt in enumerate(PROMPTS):
        c = default_llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        refs["completion", i] = (c.text, len(c.token_ids), c.finish_reason)
    for i, question in enumerate(QUESTIONS):
        c = default_llm.chat([{"role": "user", "content": question}], params, use_tqdm=False)[0].outputs[0]
        refs["chat", i] = (c.text, len(c.token_ids), c.finish_reason)
    return refs


def _completion(client, i: int, stream: bool) -> tuple[str, int, str]:
    """(text, completion tokens, finish reason) of a greedy completion, streamed or not."""
    kwargs = dict(model=MODEL, prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0)
    if not stream:
        r = client.completions.create(**kwargs)
        return r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason
    text, reason, usage = "", None, None
    for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            assert not chunk.choices
            usage = chunk.usage
        for choice in chunk.choices:
            assert reason is None, "a chunk after the finish reason"
            text += choice.text
            reason = choice.finish_reason
    return text, usage.completion_tokens, reason


def _chat(client, i: int, stream: bool) -> tuple[str, int, str]:
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[i]}], max_tokens=MAX_TOKENS,
                  temperature=0)
    if not stream:
        r = client.chat.completions.create(**kwargs)
        assert r.choices[0].message.role == "assistant"
        return r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and not chunks[-1].choices
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    reasons = [c.choices[0].finish_reason for c in chunks[:-1]]
    assert reasons[-1] is not None and not any(reasons[:-1])
    return text, chunks[-1].usage.completion_tokens, reasons[-1]


@pytest.mark.parametrize("stream", [False, True])
def test_completion_equals_offline_greedy(client, reference, stream):
    for i in range(len(PROMPTS)):
        assert _completion(client, i, stream) == reference["completion", i], PROMPTS[i]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_offline_greedy(client, reference, stream):
    for i in range(len(QUESTIONS)):
        assert _chat(client, i, stream) == reference["chat", i], QUESTIONS[i]


def test_usage_counts_prompt_tokens(client, server, default_llm):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0)
    num_prompt = len(default_llm.get_tokenizer().encode(PROMPTS[0]))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (num_prompt, 3, num_prompt + 3)
    assert r.model == MODEL and r.object == "text_completion" and r.id.startswith("cmpl-")


def test_usage_counts_prompt_tokens_from_the_prefix_cache(client, default_llm):
    prompt = "A list of the planets of the solar system, from the closest to the sun to the farthest: " * 2
    num_prompt = len(default_llm.get_tokenizer().encode(prompt))
    first, again = (client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0).usage
                    for _ in range(2))
    assert first.prompt_tokens_details.cached_tokens == 0
    # Full 16-token blocks of the prompt, the last token always computed (its logits pick the next one).
    assert again.prompt_tokens_details.cached_tokens == (num_prompt - 1) // 16 * 16 > 0


def test_sixteen_concurrent_requests_equal_alone(client, reference):
    # Every mode at once: completions and chat, streamed and not, 4 prompts each.
    jobs = [(kind, i, stream) for kind in ("completion", "chat") for stream in (False, True) for i in range(4)]

    def run(job):
        kind, i, stream = job
        return (_completion if kind == "completion" else _chat)(client, i, stream)

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    for (kind, i, stream), result in zip(jobs, results):
        assert result == reference[kind, i], (kind, i, stream)


def test_n_and_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0.9, seed=7, n=3,
                                  logprobs=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 12
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
        # The top 2 and, as vLLM, the sampled token when it is not among them.
        assert all(len(top) <= 3 and all(v <= 0 for v in top.values()) for top in lp.top_logprobs)
        assert all(top[t] == v for t, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
        assert "".join(lp.tokens) == c.text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                          max_tokens=3, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob == t.logprob for t in content)  # greedy takes the most likely token
    assert "".join(t.token for t in content) == chat.choices[0].message.content


def _error(server, path: str, body, headers=None) -> tuple[int, dict]:
    status, _, raw = server.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
    return status, json.loads(raw)


def _err(message: str, param=None, code=None, type_="invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@pytest.mark.parametrize("path, body, status, expected", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, _err("The request body must be a JSON object, got list")),
    ("/v1/completions", {"model": MODEL}, 400, _err("'prompt' is a required property", "prompt")),
    ("/v1/chat/completions", {"model": MODEL}, 400, _err("'messages' is a required property", "messages")),
    ("/v1/completions", {"prompt": "a", "temperature": -1}, 400,
     _err("temperature must be >= 0, got -1.0", "temperature")),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, 400, _err("top_p must be in (0, 1], got 0.0", "top_p")),
    ("/v1/completions", {"prompt": "a", "top_p": 1.5}, 400, _err("top_p must be in (0, 1], got 1.5", "top_p")),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400,
     _err("max_tokens must be an integer >= 1, got 0", "max_tokens")),
    ("/v1/completions", {"prompt": "a", "n": 9}, 400, _err("n must be in [1, 8], got 9", "n")),
    ("/v1/completions", {"prompt": "a", "seed": 2**63}, 400,
     _err(f"seed must be an integer in [-2**63, 2**63) or None, got {2**63}", "seed")),
    ("/v1/completions", {"prompt": "a", "temperature": "hot"}, 400,
     _err("temperature: Input should be a valid number", "temperature")),
    ("/v1/completions", {"prompt": "a", "stop": [1]}, 400, _err("stop.0: Input should be a valid string", "stop.0")),
    ("/v1/completions", {"prompt": ""}, 400, _err("the prompt is empty")),
    ("/v1/completions", b'{"prompt": "a\\ud800b"}', 400,
     _err("The request body contains invalid Unicode (a lone surrogate escape)")),
    ("/v1/completions", b"[" * 100000 + b"]" * 100000, 400, None),
    ("/v1/completions", {"prompt": []}, 400, _err(
        "prompt must be a string, a list of strings, a non-empty list of token ids or a list of such lists", "prompt")),
    ("/v1/completions", {"prompt": [5, 10**9]}, 400, _err(
        "Token id 1000000000 in the prompt is out of vocabulary (the model's vocabulary has 49152 tokens, ids 0 to "
        "49151)")),
    # Fields clients send: each honoured or refused by name, never ignored.
    ("/v1/completions", {"prompt": "a", "stream_options": {"include_usage": True}}, 400,
     _err("stream_options can only be set when stream is true", "stream_options")),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"49152": 5}}, 400, _err(
        "logit_bias must hold ids in the vocabulary: token id 49152 is out of vocabulary (the model's vocabulary "
        "has 49152 tokens)", "logit_bias")),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop_token_ids": [7, 60000]}, 400,
     _err("stop_token_ids must hold ids in the vocabulary: token id 60000 is out of vocabulary (the model's "
          "vocabulary has 49152 tokens)", "stop_token_ids")),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 101}}, 400,
     _err("logit_bias must be biases in [-100, 100], got {5: 101.0}", "logit_bias")),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"hi": 1}}, 400,
     _err("logit_bias keys must be token ids, got 'hi'", "logit_bias")),
    ("/v1/completions", {"prompt": "a", "suffix": "b"}, 400,
     _err("suffix is not supported: the model has no fill-in-the-middle mode", "suffix")),
    ("/v1/completions", {"prompt": "a", "best_of": 2}, 400, _err(
        "best_of must equal n (1) when given: choosing the best of several completions is not supported, got 2",
        "best_of")),
    ("/v1/completions", {"prompt": "a", "n": 2, "use_beam_search": True}, 400,
     _err("use_beam_search is not supported: beam search is not implemented", "use_beam_search")),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "service_tier": "flex"}, 400,
     _err("service_tier must be one of auto, default (this server has one tier), got 'flex'", "service_tier")),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "store": True}, 400,
     _err("store is not supported: this server keeps no completions", "store")),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "metadata": {"a": "b"}}, 400,
     _err("metadata is only kept with store, which is not supported", "metadata")),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "parallel_tool_calls": False}, 400,
     _err("parallel_tool_calls is only allowed when tools are given", "parallel_tool_calls")),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, 400,
     _err("logprobs must be in [0, 20] (the server's --max-logprobs), got 21", "logprobs")),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, 400,
     _err("top_logprobs must be in [0, 20] (the server's --max-logprobs), got 21", "top_logprobs")),
    ("/v1/completions", {"prompt": "a", "prompt_logprobs": 21}, 400,
     _err("prompt_logprobs must be in [0, 20] (the server's --max-logprobs), got 21", "prompt_logprobs")),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": -1}, 400,
     _err("prompt_logprobs must be in [0, 20] (the server's --max-logprobs), got -1", "prompt_logprobs")),
    ("/v1/completions", {"prompt": "a", "prompt_logprobs": 1, "stream": True}, 400,
     _err("prompt_logprobs are not available when stream is true", "prompt_logprobs")),
    ("/v1/responses", {"input": "a", "prompt_logprobs": 1}, 400, _err(
        "prompt_logprobs is not supported in /v1/responses; use /v1/completions or /v1/chat/completions",
        "prompt_logprobs")),
    ("/v1/completions", {"prompt": "a", "allowed_token_ids": [5, 49152]}, 400, _err(
        "allowed_token_ids must hold ids in the vocabulary: token id 49152 is out of vocabulary (the model's "
        "vocabulary has 49152 tokens)", "allowed_token_ids")),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "allowed_token_ids": []}, 400,
     _err("allowed_token_ids must be None or a non-empty list of token ids, got []", "allowed_token_ids")),
    ("/v1/completions", {"prompt": "a", "allowed_token_ids": [-3]}, 400,
     _err("allowed_token_ids must hold non-negative token ids, got -3", "allowed_token_ids")),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True}, 400,
     _err("add_generation_prompt and continue_final_message cannot both be true", "continue_final_message")),
    ("/v1/completions", {"prompt": "a", "max_tokens": 600}, 400, _err(
        "This model's maximum context length is 512 tokens. However, you requested 601 tokens (1 in the prompt, "
        "600 for the completion).", code="context_length_exceeded")),
    ("/v1/chat/completions", {"messages": []}, 400,
     _err("messages: List should have at least 1 item after validation, not 0", "messages")),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, _err(
        "content must be a string or a list of text parts ({'type': 'text', 'text': ...}); other content types are "
        "not supported", "messages.0.content")),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     _err("top_logprobs needs logprobs to be true", "top_logprobs")),
    ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404,
     _err("The model `gpt-4` does not exist.", "model", "model_not_found")),
    ("/v1/nothing-here", {}, 404, _err("Not found: POST /v1/nothing-here")),
    ("/v1/completions", {"prompt": "a" * (1 << 20)}, 413, None),
])
def test_bad_requests_get_status_and_error_body(server, path, body, status, expected):
    got_status, got = _error(server, path, body)
    assert got_status == status, got
    if expected is None:
        assert set(got["error"]) == {"message", "type", "param", "code"} and got["error"]["message"]
    else:
        assert got == expected


def test_openai_client_sees_errors_and_the_server_lives_on(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="a", max_tokens=600)
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
    assert e.value.body["message"].startswith("This model's maximum context length is 512 tokens.")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-0.5)
    assert e.value.param == "temperature"
    assert server.request("GET", "/health")[0] == 200
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_unknown_fields_are_ignored_with_a_log_line(server, client):
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"frobnicate": 3})
    assert r.usage.completion_tokens == 2
    assert "ignoring unknown fields of CompletionRequest: frobnicate" in server.log()


def test_models_tokenize_detokenize_version_health(server, client, default_llm):
    assert [m.id for m in client.models.list()] == [MODEL]
    tokenizer = default_llm.get_tokenizer()
    status, _, raw = server.request("POST", "/tokenize", {"prompt": "Hello world"})
    ids = tokenizer.encode("Hello world")
    assert status == 200 and json.loads(raw) == {"count": len(ids), "max_model_len": 512, "tokens": ids}
    status, _, raw = server.request("POST", "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})
    assert status == 200 and json.loads(raw)["tokens"] == default_llm.apply_chat_template(
        [{"role": "user", "content": "Hi"}])
    status, _, raw = server.request("POST", "/detokenize", {"tokens": ids})
    assert status == 200 and json.loads(raw) == {"prompt": "Hello world"}
    assert _error(server, "/detokenize", {"tokens": [-1]}) == (400, _err(
        f"tokens must be token ids in [0, {len(tokenizer)}), got -1", "tokens"))
    status, _, raw = server.request("GET", "/version")
    assert status == 200 and "version" in json.loads(raw)
    assert server.request("GET", "/health")[0] == 200


def test_metrics_names_and_counts(server, client):
    before = server.metrics()
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=5, temperature=0)
    after = server.metrics()
    for name in ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "num_preemptions_total", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count"]:
        assert f"jpaged:{name}" in after, name
    assert after["jpaged:generation_tokens_total"] - before["jpaged:generation_tokens_total"] == 5
    assert after["jpaged:prompt_tokens_total"] - before["jpaged:prompt_tokens_total"] == r.usage.prompt_tokens
    assert after["jpaged:e2e_request_latency_seconds_count"] - before["jpaged:e2e_request_latency_seconds_count"] == 1
    assert after["jpaged:inter_token_latency_seconds_count"] - before["jpaged:inter_token_latency_seconds_count"] == 4
    assert after["jpaged:kv_cache_usage_perc"] == 0 and after["jpaged:num_requests_running"] == 0


def test_abort_storm_frees_everything(server, client, reference):
    rng = random.Random(0)
    plan = [rng.choice([0, 0, 1, 2, 3, 5, 8, 13]) for _ in range(32)]  # chunks read before disconnecting
    # Non-streaming clients that give up mid-generation: 400 tokens take far longer than their
    # timeout at any step time this engine reaches on a CPU (a time-out client that completes
    # would fail the test, not prove anything).
    timeouts = [rng.uniform(1.0, 1.5) for _ in range(8)]
    timeout_max_tokens = 400
    before = server.metrics()

    def disconnect_after(i: int) -> int:
        stream = client.completions.create(model=MODEL, prompt=f"Story {i}: once upon a time", max_tokens=64,
                                           temperature=0.8, stream=True, extra_body={"ignore_eos": True})
        read = 0
        for _ in stream if plan[i] else ():  # 0: gone before the first token
            read += 1
            if read == plan[i]:
                break
        stream.close()
        return read

    def time_out(i: int) -> str:
        with pytest.raises(openai.APITimeoutError):
            client.with_options(timeout=timeouts[i]).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Tell me story {i}."}], max_tokens=timeout_max_tokens,
                extra_body={"ignore_eos": True})
        return "timed out"

    with ThreadPoolExecutor(len(plan) + len(timeouts)) as pool:
        reads = pool.map(disconnect_after, range(len(plan)))
        gave_up = pool.map(time_out, range(len(timeouts)))
        assert list(reads) == plan and list(gave_up) == ["timed out"] * len(timeouts)
    after = server.wait_idle()
    assert after["jpaged:kv_cache_usage_perc"] == 0
    assert after["jpaged:num_requests_running"] == 0 and after["jpaged:num_requests_waiting"] == 0
    num_aborted = after["jpaged:request_aborted_total"] - before.get("jpaged:request_aborted_total", 0)
    assert num_aborted == len(plan) + len(timeouts)
    time.sleep(0.5)  # nothing is computed for the aborted requests any more
    assert server.metrics()["jpaged:generation_tokens_total"] == after["jpaged:generation_tokens_total"]
    # Every request was cut short: far fewer tokens were generated than all of them asked for.
    asked = len(plan) * 64 + len(timeouts) * timeout_max_tokens
    assert after["jpaged:generation_tokens_total"] - before["jpaged:generation_tokens_total"] < asked // 3
    assert _completion(client, 0, stream=False) == reference["completion", 0]


def test_any_int64_seed_repeats_and_matches_the_offline_engine(client, default_llm):
    """Seeds past 32 bits (and negative ones) are valid for OpenAI and vLLM; same seed, same text."""
    kwargs = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=6, temperature=1.0)
    texts = {client.completions.create(**kwargs, seed=2**40).choices[0].text for _ in range(2)}
    offline = default_llm.generate([PROMPTS[1]], SamplingParams(temperature=1.0, max_tokens=6, seed=2**40),
                                   use_tqdm=False)[0].outputs[0].text
    assert texts == {offline}
    assert client.completions.create(**kwargs, seed=-1).choices[0].finish_reason == "length"


def test_retrieve_model(client):
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "jpaged")
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["message"] == "The model `gpt-4` does not exist."


def test_tokenize_fields_match_the_hf_tokenizer(server, default_llm):
    tokenizer = default_llm.get_tokenizer()

    def tokenize(body):
        status, _, raw = server.request("POST", "/tokenize", body)
        assert status == 200, raw
        return json.loads(raw)

    got = tokenize({"prompt": "Hello world", "return_token_strs": True})
    assert got["token_strs"] == tokenizer.convert_ids_to_tokens(tokenizer.encode("Hello world"))
    assert tokenize({"prompt": "Hello", "add_special_tokens": False})["tokens"] == tokenizer.encode(
        "Hello", add_special_tokens=False)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]
    for fields in ({"add_generation_prompt": True}, {"add_generation_prompt": False},
                   {"add_generation_prompt": False, "continue_final_message": True}):
        messages = chat if fields.get("continue_final_message") else chat[:1]
        expect = tokenizer.apply_chat_template(messages, tokenize=False, **{"add_generation_prompt": True, **fields})
        got = tokenize({"messages": messages, **fields})
        assert got["tokens"] == tokenizer.encode(expect, add_special_tokens=False), fields
    # Tools: exactly the prompt chat completions builds (SmolLM2's template renders no tools, so
    # both use the default tool prompt, which names the function).
    with_tools = tokenize({"messages": chat[:1], "tools": tools})
    status, _, raw = server.request("POST", "/v1/chat/completions",
                                    {"model": MODEL, "messages": chat[:1], "tools": tools, "max_tokens": 1})
    assert status == 200, raw
    assert with_tools["count"] == json.loads(raw)["usage"]["prompt_tokens"]
    assert '"name": "f"' in tokenizer.decode(with_tools["tokens"])
    no_prompt = tokenize({"messages": chat[:1], "add_generation_prompt": False})["count"]
    assert tokenize({"messages": chat[:1]})["count"] > no_prompt  # the assistant header


def test_out_of_vocabulary_and_non_json_bodies(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[5, 49152], max_tokens=1)
    assert "out of vocabulary" in e.value.body["message"]
    body = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):
        status, _, raw = server.request("POST", "/v1/completions", body, {"Content-Type": content_type})
        assert status == 415 and "application/json" in json.loads(raw)["error"]["message"], content_type
    assert server.request("POST", "/v1/completions", body, {"Content-Type": "application/json; charset=utf-8"})[0] \
        == 200


def test_logprobs_0_names_the_sampled_token_and_token_ids_extension(client):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=0)
    lp = r.choices[0].logprobs
    assert lp.top_logprobs == [{t: v} for t, v in zip(lp.tokens, lp.token_logprobs)]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=1,
                                  extra_body={"return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=1)
    # The same tokens, as "token_id:<id>" whose id decodes to the plain token.
    tokenizer_tokens = plain.choices[0].logprobs.tokens
    assert [t.split(":")[0] for t in lp.tokens] == ["token_id"] * 4 and lp.token_logprobs == pytest.approx(
        plain.choices[0].logprobs.token_logprobs)
    assert len(tokenizer_tokens) == 4


def test_logit_bias_forces_and_bans(client, reference):
    forced = 1000
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=5, temperature=1.0, seed=3,
                                  logprobs=0, logit_bias={str(forced): 100},
                                  extra_body={"return_tokens_as_token_ids": True})
    assert r.choices[0].logprobs.tokens == [f"token_id:{forced}"] * 5
    greedy = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                       logprobs=0, extra_body={"return_tokens_as_token_ids": True})
    assert greedy.choices[0].text == reference["completion", 0][0]
    banned = sorted({int(t.split(":")[1]) for t in greedy.choices[0].logprobs.tokens})
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, logprobs=0,
                                  logit_bias={str(t): -100 for t in banned},
                                  extra_body={"return_tokens_as_token_ids": True})
    assert not {int(t.split(":")[1]) for t in r.choices[0].logprobs.tokens} & set(banned)


def test_allowed_token_ids_extension(client, default_llm):
    """Sampled (n > 1, several seeds) and greedy tokens stay in the set, greedy as the offline engine picks."""
    tokenizer = default_llm.get_tokenizer()
    allowed = sorted(set(tokenizer.encode(" the cat sat on a red mat and the dog ran away")))
    as_ids = {"return_tokens_as_token_ids": True, "allowed_token_ids": allowed}

    def ids(logprob_tokens) -> list[int]:
        return [int(t.split(":")[1]) for t in logprob_tokens]

    for seed in (1, 2):
        r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=6, temperature=1.0, seed=seed, n=2,
                                      logprobs=0, extra_body=as_ids)
        assert all(set(ids(c.logprobs.tokens)) <= set(allowed) and len(c.logprobs.tokens) == 6 for c in r.choices)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                          max_tokens=6, temperature=0, logprobs=True, extra_body=as_ids)
    got = ids(t.token for t in chat.choices[0].logprobs.content)
    offline = default_llm.chat([{"role": "user", "content": QUESTIONS[0]}],
                               SamplingParams(temperature=0, max_tokens=6, allowed_token_ids=allowed),
                               use_tqdm=False)[0].outputs[0].token_ids
    assert got == offline and set(got) <= set(allowed)


def _prompt_entries_match(got: list, ids: list[int], offline, k: int, tokenizer) -> None:
    """vLLM's prompt_logprobs JSON (token ids as string keys) against the offline engine's entries and ranks."""
    assert len(got) == len(ids) and got[0] is None
    for pos in range(1, len(ids)):
        entry, ref, rank = got[pos], offline.prompt_logprobs[pos], offline.prompt_token_ranks[pos]
        assert set(entry) == {str(t) for t in ref} and entry[str(ids[pos])]["rank"] == rank, pos
        # The top k are ranks 1..k; the prompt's token is one of them or comes besides them.
        assert sorted(v["rank"] for v in entry.values()) == list(range(1, k + 1)) + ([rank] if rank > k else [])
        for t, v in entry.items():
            assert v["logprob"] == pytest.approx(ref[int(t)], abs=1e-5)
            assert v["decoded_token"] == tokenizer.decode([int(t)])


def test_prompt_logprobs_extension(server, client, default_llm):
    """vLLM's prompt_logprobs: in each completions choice (per prompt, n copies) and atop a chat response."""
    tokenizer = default_llm.get_tokenizer()
    prompts = [PROMPTS[2], PROMPTS[3]]
    offline = default_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2),
                                   use_tqdm=False)
    status, _, raw = server.request("POST", "/v1/completions", {"model": MODEL, "prompt": prompts, "max_tokens": 2,
                                                                 "n": 2, "prompt_logprobs": 2})
    assert status == 200, raw
    choices = json.loads(raw)["choices"]
    for c in choices:
        i = c["index"] // 2
        _prompt_entries_match(c["prompt_logprobs"], offline[i].prompt_token_ids, offline[i], 2, tokenizer)
    # The openai client keeps the field; echo's logprobs 1 and prompt_logprobs 0 share the prompt's entries.
    r = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=1, echo=True, logprobs=1,
                                  extra_body={"prompt_logprobs": 0})
    ids = offline[0].prompt_token_ids
    assert [list(e) if e else e for e in r.choices[0].prompt_logprobs] == [None] + [[str(t)] for t in ids[1:]]
    assert r.choices[0].logprobs.token_logprobs[1 : len(ids)] == pytest.approx(
        [e[str(t)]["logprob"] for t, e in zip(ids[1:], r.choices[0].prompt_logprobs[1:])])
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    chat_ids = default_llm.apply_chat_template(messages)
    ref = default_llm.generate([chat_ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1),
                               use_tqdm=False)[0]
    status, _, raw = server.request("POST", "/v1/chat/completions", {"model": MODEL, "messages": messages,
                                                                      "max_tokens": 1, "prompt_logprobs": 1})
    body = json.loads(raw)
    assert status == 200 and "prompt_logprobs" not in body["choices"][0]
    _prompt_entries_match(body["prompt_logprobs"], chat_ids, ref, 1, tokenizer)


def test_stop_string_kept_and_continuous_usage(client, reference):
    text = reference["completion", 0][0]
    stop = text.split()[1]  # a word the greedy text contains
    kept = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stop=stop,
                                     extra_body={"include_stop_str_in_output": True}).choices[0].text
    assert kept == text[: text.index(stop) + len(stop)]
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts == sorted(counts) and counts[-1] == 5 and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for c in chunks)


def test_echo_gives_the_prompt_and_its_logprobs(server, client, default_llm):
    """lm-eval's local-completions scoring: echo, logprobs 1, max_tokens 0 (and 1), text and token-id prompts."""
    tokenizer = default_llm.get_tokenizer()
    prompt = PROMPTS[2]
    ids = tokenizer.encode(prompt)
    offline = default_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1),
                                   use_tqdm=False)[0]
    ref_lp = [None] + [entry[t] for t, entry in zip(ids[1:], offline.prompt_logprobs[1:])]
    ref_tokens = [tokenizer.decode([t]) for t in ids]
    for p in (prompt, ids):
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=0, echo=True, logprobs=1, temperature=0)
        c = r.choices[0]
        assert c.text == prompt and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
        assert c.logprobs.tokens == ref_tokens
        assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
        assert c.logprobs.token_logprobs[1:] == pytest.approx(ref_lp[1:], abs=1e-5)
        assert c.logprobs.text_offset == [len("".join(ref_tokens[:i])) for i in range(len(ids))]
        assert all(len(top) <= 2 and tok in top for tok, top in zip(c.logprobs.tokens[1:], c.logprobs.top_logprobs[1:]))
    # With a completion: prompt + completion in the text and in every logprobs list.
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, logprobs=1, temperature=0)
    c = r.choices[0]
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, logprobs=1, temperature=0).choices[0]
    assert c.text == prompt + plain.text and r.usage.completion_tokens == 3
    assert c.logprobs.tokens == ref_tokens + plain.logprobs.tokens
    assert c.logprobs.token_logprobs[len(ids):] == plain.logprobs.token_logprobs
    assert c.logprobs.text_offset[len(ids):] == [len(prompt) + o for o in plain.logprobs.text_offset]
    # Without logprobs: only the text.
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, temperature=0)
    assert r.choices[0].text == prompt + plain.text and r.choices[0].logprobs is None
    # Streamed: the prompt (with its logprobs) in the first chunk of the choice, then the completion.
    for max_tokens in (0, 3):
        chunks = [ch for ch in client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, echo=True,
                                                         logprobs=1, temperature=0, stream=True) if ch.choices]
        first = chunks[0].choices[0]
        assert first.text == prompt and first.logprobs.token_logprobs[1:] == pytest.approx(ref_lp[1:], abs=1e-5)
        assert "".join(ch.choices[0].text for ch in chunks) == prompt + (plain.text if max_tokens else "")
        assert chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError):  # max_tokens 0 only scores with echo
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=0)


def test_responses_api_streamed_and_not(client, reference):
    """The Responses API: the same greedy text as chat, streamed with its typed events; state refused."""
    text, num_tokens, _ = reference["chat", 0]
    r = client.responses.create(model=MODEL, input=QUESTIONS[0], max_output_tokens=MAX_TOKENS, temperature=0)
    assert (r.object, r.output_text, r.usage.output_tokens) == ("response", text, num_tokens)
    assert r.status == ("incomplete" if num_tokens == MAX_TOKENS else "completed")
    r = client.responses.create(model=MODEL, input=[{"role": "user", "content": [
        {"type": "input_text", "text": QUESTIONS[0]}]}], max_output_tokens=MAX_TOKENS, temperature=0)
    assert r.output_text == text
    events = list(client.responses.create(model=MODEL, input=QUESTIONS[0], max_output_tokens=MAX_TOKENS,
                                          temperature=0, stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
    assert events[-1].response.output_text == text and events[-1].response.usage.output_tokens == num_tokens
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_1")
    assert e.value.param == "previous_response_id"


def test_openapi_schema_describes_every_route_and_a_fuzz_finds_no_5xx(server, client):
    """/openapi.json lists the served routes with their body schemas; every field of every body, given values
    of each JSON type, gets an answer below 500, and the server is idle and answering afterwards."""
    status, _, raw = server.request("GET", "/openapi.json")
    schema = json.loads(raw)
    assert status == 200 and schema["openapi"].startswith("3.")
    paths = schema["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/models", "/v1/models/{model}",
            "/tokenize", "/detokenize", "/health", "/openapi.json"} <= set(paths)
    for path, ops in paths.items():  # every described route exists (no 404 / 405)
        for method in ops:
            body = None if method == "get" else b"{}"
            got = server.request(method.upper(), path.replace("{model}", MODEL), body)[0]
            assert got in (200, 400), (method, path, got)
    defs = schema["components"]["schemas"]
    extensions = {"allowed_token_ids", "prompt_logprobs", "logit_bias", "seed"}
    assert extensions | {"echo", "suffix", "best_of"} <= set(defs["CompletionRequest"]["properties"])
    assert extensions <= set(defs["ChatCompletionRequest"]["properties"])
    bases = {"/v1/completions": {"prompt": "a", "max_tokens": 1},
             "/v1/chat/completions": {"messages": [{"role": "user", "content": "a"}], "max_tokens": 1},
             "/v1/responses": {"input": "a", "max_output_tokens": 1}, "/tokenize": {"prompt": "a"},
             "/detokenize": {"tokens": [1]}}
    jobs = []
    for path, base in bases.items():
        ref = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        for field in defs[ref.rsplit("/", 1)[1]]["properties"]:
            for value in (-1, 2**70, "x", {"a": 1}):  # mostly wrong: a few generations only
                jobs.append((path, {**base, field: value}))

    def send(job):
        return job, server.request("POST", job[0], job[1])[0]

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(send, jobs))
    assert not [(job, s) for job, s in statuses if s >= 500]
    assert {s for _, s in statuses} <= {200, 400, 404, 413, 429}
    idle = server.wait_idle()
    assert idle["jpaged:num_requests_running"] == 0 and idle["jpaged:kv_cache_usage_perc"] == 0
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    print(f"schema fuzz: {len(jobs)} requests, statuses {collections.Counter(s for _, s in statuses)}")


def test_start_up_and_busy_log_lines(server):
    log = server.log()
    assert "KV cache capacity 4096 tokens" in log and "warm-up" in log and f"ready on {server.url}" in log
    assert "model SmolLM2-135M-Instruct" in log
    assert "running " in log and "tokens/s" in log and "prefix-cache hit rate" in log


def test_nothing_compiled_after_ready(server):
    """Last in this module, after every kind of request above: full warm-up left nothing to compile."""
    assert server.metrics()["jpaged:num_compiles_after_warmup"] == 0
