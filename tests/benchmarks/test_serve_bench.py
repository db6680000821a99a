"""benchmarks.serve_bench against a fake OpenAI-compatible SSE server with known token delays: exact counts,
latencies that match the delays, the concurrency cap and Poisson arrivals as the server sees them, failed
requests counted (HTTP 400, dropped connections), the JSON file, the CLI, and one-line fatal errors."""

from __future__ import annotations

import asyncio
import collections
import json
import math
import socket
import threading

import numpy as np
import pytest
from aiohttp import web

from benchmarks.datasets import make_workload
from benchmarks.serve_bench import ServeBenchConfig, arrival_times, build_parser, main, run_benchmark
from benchmarks.serve_metrics import compute_metrics, format_table
from benchmarks.sse_client import RequestOutput

FIRST_DELAY = 0.08  # seconds from the request to the first token
ITL_DELAY = 0.02  # seconds between tokens
SPLIT_DELAY = 0.005  # split mode: seconds between the two halves of every event
SLACK = 0.04  # scheduling noise allowed on top of a delay (the CPU is shared)
MODEL = "fake-model"


class FakeServer:
    """Streams max_tokens one-token chunks (an empty chunk and a comment first, usage last), on a thread.

    mode: ok | no-usage (no usage chunk) | no-text (token chunks without text, as a model without a
    tokenizer streams) | pairs (two tokens a chunk) | split (events split across writes) |
    fail (every 3rd request: HTTP 400) | fail-all | drop (every 2nd request: connection closed after 2 tokens) |
    no-done (the stream ends cleanly without `data: [DONE]`).
    Usage reports one prompt token more than sent, as a server adding BOS would.
    """

    def __init__(self, mode: str = "ok"):
        self.mode = mode
        self.payloads: list[dict] = []
        self.auth: list[str | None] = []
        self.num_requests = self.in_flight = self.max_in_flight = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = web.AppRunner(self._app())
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)

    def _app(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.get("/v1/models", self.models), web.post("/detokenize", self.detokenize),
                        web.post("/v1/completions", self.generate), web.post("/v1/chat/completions", self.generate)])
        return app

    async def _start(self):
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def detokenize(self, request):
        return web.json_response({"prompt": " ".join(f"t{i}" for i in (await request.json())["tokens"])})

    async def _event(self, resp, obj):
        data = b"data: " + json.dumps(obj).encode() + b"\n\n"
        if self.mode == "split":
            await resp.write(data[: len(data) // 2])
            await asyncio.sleep(SPLIT_DELAY)
            data = data[len(data) // 2:]
        await resp.write(data)

    async def generate(self, request):
        body = await request.json()
        self.payloads.append(body)
        self.auth.append(request.headers.get("Authorization"))
        self.num_requests += 1
        number = self.num_requests
        if self.mode == "fail-all" or (self.mode == "fail" and number % 3 == 0):
            return web.json_response({"error": {"message": "prompt too long", "type": "invalid_request_error"}},
                                     status=400)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            is_chat = "messages" in body
            prompt = body["messages"][0]["content"] if is_chat else body["prompt"]
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
            choice = (lambda text: {"delta": {"content": text}}) if is_chat else (lambda text: {"text": text})
            await self._event(resp, {"choices": [{"delta": {"role": "assistant", "content": ""}} if is_chat
                                                 else {"text": ""}]})
            await resp.write(b": keep-alive\n\n")
            n = body["max_tokens"]
            per_chunk = 2 if self.mode == "pairs" else 1
            split = SPLIT_DELAY if self.mode == "split" else 0.0  # so each event still completes on time
            for i in range(0, n, per_chunk):
                await asyncio.sleep((FIRST_DELAY if i == 0 else ITL_DELAY) - split)
                if self.mode == "drop" and number % 2 == 0 and i == 2:
                    request.transport.close()  # mid-stream, before [DONE]
                    return resp
                await self._event(resp, {"choices": [choice("" if self.mode == "no-text" else "ab"[: min(per_chunk, n - i)])]})
            if self.mode != "no-usage":
                num_prompt = len(prompt) if isinstance(prompt, list) else len(prompt.split())
                await self._event(resp, {"choices": [], "usage": {"prompt_tokens": num_prompt + 1,
                                                                  "completion_tokens": n}})
            if self.mode != "no-done":
                await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self.in_flight -= 1


@pytest.fixture
def serve():
    servers = []

    def start(mode: str = "ok") -> FakeServer:
        servers.append(FakeServer(mode))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def _config(server: FakeServer, **kwargs) -> ServeBenchConfig:
    base = dict(base_url=server.url, dataset="fixed", num_prompts=4, input_len=8, output_len=5, num_warmups=0,
                vocab_size=1000)
    return ServeBenchConfig(**(base | kwargs))


def _run(config: ServeBenchConfig) -> dict:
    return asyncio.run(run_benchmark(config))


def test_counts_and_request_bodies(serve):
    server = serve()
    result = _run(_config(server, num_prompts=6, api_key="sekret"))
    m = result["metrics"]
    assert (m["completed"], m["failed"]) == (6, 0)
    assert m["total_output_tokens"] == 6 * 5
    assert m["total_input_tokens"] == 6 * (8 + 1)  # the server's usage count, not ours
    assert result["config"]["model"] == MODEL and result["config"]["api_key"] == "***"
    workload = make_workload("fixed", num_prompts=6, input_len=8, output_len=5, vocab_size=1000)
    assert sorted(p["prompt"] for p in server.payloads) == sorted(workload.prompts)
    for p in server.payloads:
        assert p["model"] == MODEL and p["max_tokens"] == 5 and p["ignore_eos"] is True
        assert p["temperature"] == 0 and p["stream"] is True and p["stream_options"] == {"include_usage": True}
    assert server.auth == ["Bearer sekret"] * 6


def test_latencies_match_server_delays(serve):
    result = _run(_config(serve(), num_prompts=3, output_len=6))
    for r in result["requests"]:
        assert r["success"] and r["output_tokens"] == 6 and r["num_itls"] == 5
        # The empty first chunk and the comment come at once; TTFT must wait for the first real token.
        assert FIRST_DELAY <= r["ttft_ms"] / 1000 <= FIRST_DELAY + SLACK
        assert ITL_DELAY - 0.003 <= r["mean_itl_ms"] / 1000 <= ITL_DELAY + SLACK
        assert ITL_DELAY - 0.003 <= r["tpot_ms"] / 1000 <= ITL_DELAY + SLACK
        assert FIRST_DELAY + 5 * ITL_DELAY <= r["e2el_ms"] / 1000 <= FIRST_DELAY + 5 * ITL_DELAY + 2 * SLACK
    m = result["metrics"]
    assert FIRST_DELAY <= m["median_ttft_ms"] / 1000 <= FIRST_DELAY + SLACK
    assert ITL_DELAY - 0.003 <= m["median_itl_ms"] / 1000 <= ITL_DELAY + SLACK
    assert ITL_DELAY - 0.003 <= m["mean_tpot_ms"] / 1000 <= ITL_DELAY + SLACK
    # All sent at once: the benchmark lasts about one request.
    assert m["duration"] <= FIRST_DELAY + 5 * ITL_DELAY + 3 * SLACK
    assert m["output_throughput"] == pytest.approx(m["total_output_tokens"] / m["duration"])


def test_usage_count_preferred_and_chunks_counted_without_it(serve):
    m = _run(_config(serve("pairs"), output_len=6))["metrics"]  # 3 chunks of 2 tokens each
    assert m["total_output_tokens"] == 4 * 6
    no_usage = _run(_config(serve("no-usage")))
    assert no_usage["metrics"]["total_output_tokens"] == 4 * 5
    assert no_usage["metrics"]["total_input_tokens"] == 4 * 8  # the drawn prompt lengths
    assert [r["num_itls"] for r in no_usage["requests"]] == [4] * 4


def test_streams_without_text_time_their_chunks(serve):
    """Random weights without a tokenizer stream empty text: the token chunks are timed all the same."""
    result = _run(_config(serve("no-text"), num_prompts=2))
    assert result["metrics"]["completed"] == 2 and result["metrics"]["total_output_tokens"] == 10
    for r in result["requests"]:
        assert FIRST_DELAY <= r["ttft_ms"] / 1000 <= FIRST_DELAY + SLACK + ITL_DELAY
        assert r["num_itls"] >= 4


def test_events_split_across_reads(serve):
    result = _run(_config(serve("split"), num_prompts=3))
    assert result["metrics"]["completed"] == 3 and result["metrics"]["total_output_tokens"] == 15
    for r in result["requests"]:
        assert FIRST_DELAY <= r["ttft_ms"] / 1000 <= FIRST_DELAY + SLACK  # timed when the event is complete


def test_max_concurrency_caps_requests_in_flight(serve):
    capped = serve()
    assert _run(_config(capped, num_prompts=10, output_len=2, max_concurrency=3))["metrics"]["completed"] == 10
    assert capped.max_in_flight == 3
    free = serve()
    _run(_config(free, num_prompts=10, output_len=2))
    assert free.max_in_flight == 10


def test_arrival_times_are_poisson():
    times = np.array(arrival_times(20000, 50.0, seed=1))
    gaps = np.diff(times, prepend=0.0)
    assert np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.03)
    assert gaps.std() == pytest.approx(1 / 50, rel=0.05)  # exponential: std == mean
    assert arrival_times(5, 50.0, seed=1) == times[:5].tolist()
    assert arrival_times(3, math.inf, seed=1) == [0.0, 0.0, 0.0]


def test_request_rate_spreads_requests_over_num_over_rate(serve):
    num, rate = 20, 40.0
    m = _run(_config(serve(), num_prompts=num, output_len=2, request_rate=rate, seed=3))["metrics"]
    last = arrival_times(num, rate, seed=3)[-1]
    request = FIRST_DELAY + ITL_DELAY
    assert last + request <= m["duration"] <= last + request + 2 * SLACK
    assert 0.6 * num / rate <= m["duration"] - request <= 1.5 * num / rate


def test_http_errors_and_dropped_streams_are_failed_requests(serve):
    result = _run(_config(serve("fail"), num_prompts=9))
    assert (result["metrics"]["completed"], result["metrics"]["failed"]) == (6, 3)
    assert result["errors"] == {"HTTP 400: prompt too long": 3}
    assert result["metrics"]["total_output_tokens"] == 6 * 5
    dropped = _run(_config(serve("drop"), num_prompts=6))
    assert (dropped["metrics"]["completed"], dropped["metrics"]["failed"]) == (3, 3)
    assert all(r["error"] for r in dropped["requests"] if not r["success"])
    assert dropped["metrics"]["total_output_tokens"] == 3 * 5
    truncated = _run(_config(serve("no-done"), num_prompts=2))
    assert truncated["metrics"]["failed"] == 2 and truncated["errors"] == {"stream ended without data: [DONE]": 2}


def test_warmup_requests_are_not_measured(serve):
    server = serve()
    m = _run(_config(server, num_warmups=2))["metrics"]
    assert server.num_requests == 4 + 2 and m["completed"] == 4


def test_chat_endpoint_with_text_from_server_detokenize(serve):
    server = serve()
    result = _run(_config(server, endpoint="/v1/chat/completions"))
    assert result["metrics"]["completed"] == 4 and result["metrics"]["total_output_tokens"] == 20
    workload = make_workload("fixed", num_prompts=4, input_len=8, output_len=5, vocab_size=1000)
    expected = sorted(" ".join(f"t{i}" for i in p) for p in workload.prompts)
    assert sorted(p["messages"][0]["content"] for p in server.payloads) == expected
    assert all("prompt" not in p for p in server.payloads)


def test_text_prompts_with_local_tokenizer(serve, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {f"t{i}": i for i in range(1000)} | {"[UNK]": 1000}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    server = serve()
    result = _run(_config(server, prompt_format="text", tokenizer=str(tmp_path)))
    assert result["metrics"]["completed"] == 4
    workload = make_workload("fixed", num_prompts=4, input_len=8, output_len=5, vocab_size=1000)
    expected = sorted(" ".join(f"t{i}" for i in p) for p in workload.prompts)
    assert sorted(p["prompt"] for p in server.payloads) == expected


def test_compute_metrics_against_hand_computed_values():
    outs = [RequestOutput(True, "", 10, 3, ttft=0.1, itls=[0.02, 0.04], e2e=0.16),
            RequestOutput(True, "", 20, 1, ttft=0.3, itls=[], e2e=0.3),
            RequestOutput(False, "HTTP 500: boom", 30, 0)]
    m = compute_metrics(outs, duration=2.0)
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (2, 1, 30, 4)
    assert (m["request_throughput"], m["output_throughput"], m["total_token_throughput"]) == (1.0, 2.0, 17.0)
    assert m["mean_ttft_ms"] == pytest.approx(200) and m["median_ttft_ms"] == pytest.approx(200)
    assert m["p99_ttft_ms"] == pytest.approx(100 + 0.99 * 200)
    # TPOT excludes the first token: (0.16 - 0.1) / 2; the one-token request has none.
    assert m["mean_tpot_ms"] == pytest.approx(30) and m["p99_tpot_ms"] == pytest.approx(30)
    assert m["mean_itl_ms"] == pytest.approx(30) and m["p99_itl_ms"] == pytest.approx(20 + 0.99 * 20)
    assert m["mean_e2el_ms"] == pytest.approx(230)
    empty = compute_metrics([RequestOutput(False, "x")], duration=1.0)
    assert empty["mean_ttft_ms"] is None and empty["completed"] == 0
    assert "n/a" in format_table(empty)


def test_main_prints_table_and_writes_json(serve, tmp_path, capsys):
    out = tmp_path / "serve.json"
    server = serve()
    argv = ["--base-url", server.url, "--dataset", "random", "--num-prompts", "5", "--input-len", "8",
            "--output-len", "3", "--range-ratio", "0.5", "--vocab-size", "1000", "--label", "smoke",
            "--output-json", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "Successful requests:" in stdout and "Median TTFT (ms):" in stdout and "P99 ITL (ms):" in stdout
    result = json.loads(out.read_text())
    assert set(result) == {"date", "label", "config", "metrics", "errors", "requests"}
    assert result["label"] == "smoke" and result["config"]["request_rate"] == "inf"
    assert result["config"]["model"] == MODEL and len(result["requests"]) == 5
    for key in ("ttft", "tpot", "itl", "e2el"):
        assert {f"{s}_{key}_ms" for s in ("mean", "median", "p99")} <= set(result["metrics"])
    assert {"completed", "failed", "duration", "request_throughput", "output_throughput",
            "total_token_throughput"} <= set(result["metrics"])
    assert server.num_requests == 5 + 1  # the default warm-up


def test_parser_defaults_and_values():
    args = build_parser().parse_args([])
    assert args.base_url == "http://127.0.0.1:8000" and args.endpoint == "/v1/completions"
    assert math.isinf(args.request_rate) and args.max_concurrency is None and args.model is None
    args = build_parser().parse_args(["--request-rate", "2.5", "--max-concurrency", "4", "--endpoint",
                                      "/v1/chat/completions", "--model", "m", "--api-key", "k", "--seed", "7"])
    assert (args.request_rate, args.max_concurrency, args.model, args.api_key, args.seed) == (2.5, 4, "m", "k", 7)
    assert ServeBenchConfig(endpoint="/v1/chat/completions").prompt_format == "text"
    assert ServeBenchConfig().prompt_format == "ids"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--endpoint", "/v1/embeddings"])


@pytest.mark.parametrize("kwargs, field", [
    (dict(request_rate=0.0), "request_rate"),
    (dict(max_concurrency=0), "max_concurrency"),
    (dict(base_url="localhost:8000"), "base_url"),
    (dict(endpoint="/v1/chat/completions", prompt_format="ids"), "prompt_format"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ServeBenchConfig(**kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("extra", [[], ["--model", "m"]])
def test_refused_connection_is_one_line_and_exit_1(capsys, extra):
    assert main(["--base-url", f"http://127.0.0.1:{_free_port()}", "--num-prompts", "2", *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach") and err.count("\n") == 1 and "Traceback" not in err


def test_bad_url_and_failed_warmup_exit_1(serve, capsys):
    assert main(["--base-url", "localhost:8000"]) == 1
    assert capsys.readouterr().err.startswith("error: base_url must start with http://")
    server = serve("fail-all")
    assert main(["--base-url", server.url, "--num-prompts", "2", "--input-len", "4", "--output-len", "2"]) == 1
    assert capsys.readouterr().err == "error: warm-up request failed: HTTP 400: prompt too long\n"


def test_all_requests_failed_exits_1(serve, capsys):
    server = serve("fail-all")
    argv = ["--base-url", server.url, "--num-prompts", "3", "--input-len", "4", "--output-len", "2",
            "--num-warmups", "0"]
    assert main(argv) == 1
    assert "3 failed: HTTP 400: prompt too long" in capsys.readouterr().out
    assert collections.Counter(len(p["prompt"]) for p in server.payloads) == {4: 3}
