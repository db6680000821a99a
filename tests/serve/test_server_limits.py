"""The server's guards on a real subprocess: --api-key, a full queue (429), and the SIGTERM drain (last: it
stops the server)."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

pytestmark = pytest.mark.default_model

MODEL = "SmolLM2-135M-Instruct"
KEY = "s3cret-key"
MAX_QUEUED = 2
SERVER_ARGS = ["--max-model-len", "512", "--max-num-batched-tokens", "128", "--max-num-seqs", "8",
               "--api-key", KEY, "--max-queued-requests", str(MAX_QUEUED), "--served-model-name", "tiny-smol"]
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(*SERVER_ARGS)


def test_api_key_is_required_except_on_open_paths(server):
    body = {"model": "tiny-smol", "prompt": "Hi", "max_tokens": 2}
    expected = {"error": {"message": "Invalid or missing API key: send 'Authorization: Bearer <key>'",
                          "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}]:
        status, got_headers, raw = server.request("POST", "/v1/completions", body, headers)
        assert (status, json.loads(raw)) == (401, expected), headers
        assert got_headers["WWW-Authenticate"] == "Bearer"
    assert server.request("GET", "/v1/models")[0] == 401
    assert server.request("POST", "/tokenize", {"prompt": "a"})[0] == 401
    for path in ["/health", "/metrics", "/version"]:
        assert server.request("GET", path)[0] == 200, path
    status, _, raw = server.request("POST", "/v1/completions", body, AUTH)
    assert status == 200 and json.loads(raw)["model"] == "tiny-smol"

    with pytest.raises(openai.AuthenticationError) as e:
        server.openai(api_key="wrong").models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    assert [m.id for m in server.openai(api_key=KEY).models.list()] == ["tiny-smol"]


def test_full_queue_gives_429_and_every_accepted_request_completes(server):
    client = server.openai(api_key=KEY)
    prompt, max_tokens = "The capital of France is", 8
    reference = client.completions.create(model="tiny-smol", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text

    def call(_):
        try:
            r = client.completions.create(model="tiny-smol", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                          extra_body={"ignore_eos": True})
            return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens
        except openai.RateLimitError as e:
            return e

    with ThreadPoolExecutor(24) as pool:  # 8 running + 2 waiting fit; the rest of the burst does not
        results = list(pool.map(call, range(24)))
    rejected = [r for r in results if isinstance(r, openai.RateLimitError)]
    accepted = [r for r in results if not isinstance(r, openai.RateLimitError)]
    assert len(rejected) >= 4 and len(accepted) >= MAX_QUEUED + 1, results
    assert all(r == (reference, "length", max_tokens) for r in accepted)
    e = rejected[0]
    assert e.status_code == 429 and e.response.headers["Retry-After"] == "1"
    assert e.body == {"message": f"The server is busy: more than {MAX_QUEUED} sequences would be waiting. "
                                 "Retry later.", "type": "rate_limit_error", "param": None,
                      "code": "rate_limit_exceeded"}
    assert client.completions.create(model="tiny-smol", prompt=prompt, max_tokens=2).usage.completion_tokens == 2


def test_sigterm_drains_in_flight_requests_and_exits_0(server):
    client = server.openai(api_key=KEY)
    max_tokens, num_streams = 40, 3
    started = threading.Barrier(num_streams + 1)

    def stream(i: int):
        text, reason, usage = "", None, None
        chunks = client.completions.create(model="tiny-smol", prompt=f"Tell me a story, number {i}:",
                                           max_tokens=max_tokens, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        for n, chunk in enumerate(chunks):
            if n == 0:
                started.wait()
            for c in chunk.choices:
                text, reason = text + c.text, c.finish_reason or reason
            usage = chunk.usage or usage
        return reason, usage.completion_tokens

    with ThreadPoolExecutor(num_streams) as pool:
        futures = [pool.submit(stream, i) for i in range(num_streams)]
        started.wait(timeout=60)  # every stream has its first token
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(urllib.error.URLError):  # no longer listening
            server.request("GET", "/health")
        results = [f.result(timeout=120) for f in futures]
    assert results == [("length", max_tokens)] * num_streams
    assert server.proc.wait(60) == 0
    log = server.log()
    assert f"shutting down: no new requests; {num_streams} in flight" in log and "jpaged serve: stopped" in log
