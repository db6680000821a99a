"""Online serving benchmark against any OpenAI-compatible server (like `vllm bench serve`).

Draws a workload with `benchmarks.datasets` (fixed seed), sends it as streamed requests (greedy,
EOS ignored, so every request generates exactly its output length), with Poisson arrivals at
`--request-rate` (default inf: all at once) and at most `--max-concurrency` in flight, then
prints throughput and TTFT / TPOT / ITL / E2E latency statistics (see `benchmarks.serve_metrics`).
One warm-up request, not measured, runs first (a JIT-compiling server compiles on it).

    python -m benchmarks.serve_bench --base-url http://127.0.0.1:8000 --num-prompts 64 \\
        --input-len 256 --output-len 128 --request-rate 4 --output-json benchmarks/results/serve.json

Prompts go out as token ids by default (`"prompt": [101, 2045, ...]`, which the completions API
allows); `--prompt-format text` detokenizes them first, with `--tokenizer PATH` or else the
server's `POST /detokenize`. The chat endpoint takes text only.

`run_benchmark(config)` is the in-process entry point for sweep scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import sys
import time

import aiohttp
import numpy as np

from benchmarks.datasets import make_workload
from benchmarks.serve_metrics import compute_metrics, error_counts, format_table, request_record
from benchmarks.sse_client import (CHAT_COMPLETIONS, COMPLETIONS, ENDPOINTS, RequestInput, build_payload,
                                   error_message, one_line, send_request)

# A request may legitimately take long under heavy load; this only stops a hung server.
REQUEST_TIMEOUT_S = 6 * 60 * 60
CONNECT_TIMEOUT_S = 60  # a host that drops packets fails the benchmark in a minute, not six hours
MAX_DETOKENIZE_IN_FLIGHT = 16


class BenchmarkError(Exception):
    """A failure that stops the whole benchmark (server unreachable, warm-up failed); one line."""


@dataclasses.dataclass(frozen=True)
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    """The server's root, http:// or https://, without the endpoint path."""
    endpoint: str = COMPLETIONS
    """/v1/completions or /v1/chat/completions."""
    model: str | None = None
    """The `model` sent in requests; None: the first id listed by GET /v1/models."""
    api_key: str | None = None
    """Sent as `Authorization: Bearer <api_key>`; None: no header."""
    dataset: str = "random"
    """random or fixed (see benchmarks.datasets)."""
    num_prompts: int = 100
    input_len: int = 256
    output_len: int = 128
    range_ratio: float = 0.0
    """random dataset: lengths drawn from [len * (1 - r), len * (1 + r)]; in [0, 1)."""
    seed: int = 0
    """Seeds both the workload and the arrival times."""
    vocab_size: int = 49152
    """Prompt token ids are drawn below this (SmolLM2's vocabulary by default)."""
    request_rate: float = math.inf
    """Mean requests per second of the Poisson arrivals; > 0; inf sends all at once."""
    max_concurrency: int | None = None
    """At most this many requests in flight (>= 1); None: no cap."""
    prompt_format: str | None = None
    """ids or text; None: ids for /v1/completions, text for the chat endpoint."""
    tokenizer: str | None = None
    """text prompts: a Hugging Face tokenizer folder or name; None: the server's POST /detokenize."""
    num_warmups: int = 1
    """Unmeasured requests (the first prompt) sent before the benchmark; >= 0."""
    label: str | None = None
    """A name for this run, kept in the JSON."""

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (inf: all at once), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.num_warmups < 0:
            raise ValueError(f"num_warmups must be >= 0, got {self.num_warmups}")
        if self.prompt_format is None:
            object.__setattr__(self, "prompt_format", "text" if self.endpoint == CHAT_COMPLETIONS else "ids")
        if self.prompt_format not in ("ids", "text"):
            raise ValueError(f"prompt_format must be ids or text, got {self.prompt_format!r}")
        if self.prompt_format == "ids" and self.endpoint == CHAT_COMPLETIONS:
            raise ValueError(f"prompt_format must be text for {CHAT_COMPLETIONS} (chat messages are strings), "
                             f"got 'ids'")

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path


def arrival_times(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent: a Poisson process (exponential gaps
    of mean 1 / rate, the first after one gap), or all at 0 for an infinite rate."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=num_requests)
    return np.cumsum(gaps).tolist()


async def _get_json(session: aiohttp.ClientSession, method: str, url: str, **kwargs) -> tuple[int, object]:
    """(status, JSON body, or the error message when the status is not 200 or the body not JSON);
    raises BenchmarkError when the server cannot be reached."""
    try:
        async with session.request(method, url, **kwargs) as response:
            status, text = response.status, await response.text()
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
        raise BenchmarkError(f"cannot reach {url}: {one_line(f'{type(e).__name__}: {e}')}") from e
    if status != 200:
        return status, error_message(status, text)
    try:
        return status, json.loads(text)
    except ValueError:
        return 500, one_line(f"not JSON: {text}")


async def _resolve_model(session: aiohttp.ClientSession, config: ServeBenchConfig) -> str:
    """Checks the server is reachable (GET /v1/models) and returns the model to send."""
    status, body = await _get_json(session, "GET", config.url("/v1/models"))
    if config.model is not None:
        return config.model  # a server without /v1/models is fine when the model is named
    if status != 200:
        raise BenchmarkError(f"GET /v1/models failed ({body}); pass --model")
    try:
        return body["data"][0]["id"]
    except (KeyError, IndexError, TypeError):
        raise BenchmarkError(f"GET /v1/models lists no model ({one_line(json.dumps(body))}); pass --model") from None


async def _detokenize(session: aiohttp.ClientSession, config: ServeBenchConfig, model: str,
                      prompts: list[list[int]]) -> list[str]:
    if config.tokenizer is not None:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(config.tokenizer)
        return [tokenizer.decode(ids) for ids in prompts]
    limit = asyncio.Semaphore(MAX_DETOKENIZE_IN_FLIGHT)

    async def one(ids: list[int]) -> str:
        async with limit:
            status, body = await _get_json(session, "POST", config.url("/detokenize"),
                                           json=dict(model=model, tokens=ids))
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise BenchmarkError(f"POST /detokenize failed ({one_line(str(body))}); pass --tokenizer")
        return body["prompt"]

    return list(await asyncio.gather(*map(one, prompts)))


async def run_benchmark(config: ServeBenchConfig) -> dict:
    """Runs the benchmark; returns dict(date, label, config, metrics, errors, requests).

    Raises BenchmarkError when the server cannot be reached or the warm-up request fails, and
    ValueError for a bad workload; a failed benchmark request is counted, not raised."""
    workload = make_workload(config.dataset, num_prompts=config.num_prompts, input_len=config.input_len,
                             output_len=config.output_len, range_ratio=config.range_ratio, seed=config.seed,
                             vocab_size=config.vocab_size)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None
    # limit=0: aiohttp's default pool of 100 connections would silently cap concurrency.
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S)
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:
        model = await _resolve_model(session, config)
        prompts = workload.prompts
        if config.prompt_format == "text":
            prompts = await _detokenize(session, config, model, workload.prompts)
        inputs = [RequestInput(p, len(ids), n) for p, ids, n in zip(prompts, workload.prompts, workload.output_lens)]
        url = config.url(config.endpoint)

        async def send(req: RequestInput):
            return await send_request(session, url, build_payload(config.endpoint, model, req), req.num_prompt_tokens)

        for _ in range(config.num_warmups):
            warmup = await send(inputs[0])
            if not warmup.success:
                raise BenchmarkError(f"warm-up request failed: {warmup.error}")

        limit = asyncio.Semaphore(config.max_concurrency or len(inputs))

        async def limited(req: RequestInput):
            async with limit:
                return await send(req)

        tasks = []
        start = time.perf_counter()
        for req, at in zip(inputs, arrival_times(len(inputs), config.request_rate, config.seed)):
            # Sleep to absolute times, so scheduling delays do not accumulate into a lower rate.
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(limited(req)))
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start

    config_dict = dataclasses.asdict(config) | dict(model=model, api_key="***" if config.api_key else None)
    config_dict["request_rate"] = str(config.request_rate) if math.isinf(config.request_rate) else config.request_rate
    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), label=config.label, config=config_dict,
                metrics=compute_metrics(outputs, duration), errors=error_counts(outputs),
                requests=[request_record(o) for o in outputs])


def build_parser() -> argparse.ArgumentParser:
    d = ServeBenchConfig()
    p = argparse.ArgumentParser(prog="jpaged bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=d.base_url, help="server root (default %(default)s)")
    p.add_argument("--endpoint", default=d.endpoint, choices=ENDPOINTS)
    p.add_argument("--model", default=None, help="model name sent in requests (default: first of GET /v1/models)")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer <key>")
    p.add_argument("--dataset", default=d.dataset, choices=("random", "fixed"))
    p.add_argument("--num-prompts", type=int, default=d.num_prompts)
    p.add_argument("--input-len", type=int, default=d.input_len)
    p.add_argument("--output-len", type=int, default=d.output_len)
    p.add_argument("--range-ratio", type=float, default=d.range_ratio)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="prompt ids are drawn below this")
    p.add_argument("--request-rate", type=float, default=d.request_rate,
                   help="Poisson arrivals, requests/s (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight (default none)")
    p.add_argument("--prompt-format", choices=("ids", "text"), default=None,
                   help="default: ids for /v1/completions, text for chat")
    p.add_argument("--tokenizer", default=None, help="text prompts: HF tokenizer (default: server's /detokenize)")
    p.add_argument("--num-warmups", type=int, default=d.num_warmups)
    p.add_argument("--label", default=None)
    p.add_argument("--output-json", default=None, metavar="PATH")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 when some request succeeded, 1 otherwise or on a fatal error (one line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        config = ServeBenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeBenchConfig)})
        rate = "inf" if math.isinf(config.request_rate) else f"{config.request_rate:g}/s"
        print(f"{config.num_prompts} requests to {config.url(config.endpoint)}, rate {rate}, "
              f"max concurrency {config.max_concurrency or 'none'}")
        result = asyncio.run(run_benchmark(config))
    except (BenchmarkError, ValueError) as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 1
    print(format_table(result["metrics"]))
    for message, count in list(result["errors"].items())[:3]:
        print(f"{count} failed: {message}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["metrics"]["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
