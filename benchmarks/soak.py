"""Soak: many mixed requests against one server for a long time, checking that nothing is lost.

    python -m benchmarks.soak --duration 1200 --concurrency 32            # starts `jpaged serve` itself
    python -m benchmarks.soak --url http://127.0.0.1:8000 --pid 1234      # a running server

Each worker loops over request kinds drawn with a fixed seed: completions and chat, streamed or
not, n > 1, stop strings, a client that disconnects mid-stream (abort), one that gives up after
50 ms (timeout), malformed bodies (400), and bursts past --max-queued-requests (429). Every
request must end in a complete answer (a finish_reason on every choice, `[DONE]` on a stream) or
an explicit error status; anything else is "lost". Every --sample-s the server's RSS and open
file descriptors (from /proc) and its KV usage (from /metrics) are recorded. It fails when a
request was lost, when the server is not idle with KV usage 0 once the load stops, or when RSS
still grows after warm-up (the last quarter's median over the second quarter's by more than
10% + 32 MiB). A table on stdout, everything in --output-json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

KINDS = ("completion", "completion_stream", "chat", "chat_stream", "n3", "stop", "abort", "timeout", "bad", "burst")


def _proc(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of a process."""
    rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    return {line.split("{")[0].split(" ")[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("jpaged:")}


def _body(kind: str, rng: random.Random) -> tuple[str, dict]:
    words = " ".join(rng.choice(["the", "cat", "a", "robot", "sea", "paints", "blue"]) for _ in range(rng.randint(2, 40)))
    common = {"max_tokens": rng.randint(1, 24), "temperature": rng.choice([0.0, 0.8])}
    if kind.startswith("chat"):
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": words}], **common,
                                        "stream": kind.endswith("stream")}
    body = {"prompt": words, **common, "stream": kind in ("completion_stream", "abort")}
    if kind == "n3":
        body["n"] = 3
    elif kind == "stop":
        body["stop"] = ["e", "\n"]
    elif kind == "bad":
        body = rng.choice([{"prompt": words, "temperature": -1}, {"prompt": []}, {"max_tokens": 3},
                           {"prompt": words, "logit_bias": {"x": 1}}])
    return "/v1/completions", body


async def one(session: aiohttp.ClientSession, url: str, kind: str, rng: random.Random) -> str:
    """The outcome of one request: ok, aborted, timeout, rejected (400), busy (429), or lost: <why>."""
    path, body = _body(kind, rng)
    timeout = aiohttp.ClientTimeout(total=0.05 if kind == "timeout" else 300)
    try:
        async with session.post(url + path, json=body, timeout=timeout) as r:
            if r.status in (400, 429):
                error = (await r.json()).get("error", {})
                return ("rejected" if r.status == 400 else "busy") if error.get("message") else "lost: error without a body"
            if r.status != 200:
                return f"lost: status {r.status}"
            if not body.get("stream"):
                choices = (await r.json())["choices"]
                ok = len(choices) == body.get("n", 1) and all(c["finish_reason"] for c in choices)
                return "ok" if ok else "lost: a choice without finish_reason"
            finished, num_chunks = set(), 0
            async for raw in r.content:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    return "ok" if finished else "lost: a stream without finish_reason"
                if line.startswith("data:"):
                    num_chunks += 1
                    for c in json.loads(line[5:]).get("choices", []):
                        if c.get("finish_reason"):
                            finished.add(c["index"])
                    if kind == "abort" and num_chunks >= 2:
                        return "aborted"  # leaving the block closes the connection mid-stream
            return "lost: the stream ended without [DONE]"
    except asyncio.TimeoutError:
        return "timeout" if kind == "timeout" else "lost: timed out"
    except aiohttp.ClientError as e:
        return f"lost: {type(e).__name__}"


async def soak(url: str, pid: int | None, duration_s: float, concurrency: int, seed: int = 0,
               sample_s: float = 5.0, kinds: tuple[str, ...] = KINDS) -> dict:
    """Runs the load for duration_s and returns the report (see the module docstring)."""
    outcomes: collections.Counter = collections.Counter()
    samples: list[dict] = []
    deadline = time.monotonic() + duration_s
    async with aiohttp.ClientSession() as session:
        async def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < deadline:
                kind = rng.choice(kinds)
                if kind == "burst":  # many at once, past the queue limit: 429s expected
                    results = await asyncio.gather(*(one(session, url, "completion", rng) for _ in range(40)))
                    outcomes.update(results)
                else:
                    outcomes[await one(session, url, kind, rng)] += 1

        async def sampler() -> None:
            start = time.monotonic()
            while time.monotonic() < deadline:
                m = await metrics(session, url)
                rss, fds = _proc(pid) if pid else (0.0, 0)
                samples.append({"t": round(time.monotonic() - start, 1), "rss_mib": round(rss, 1), "fds": fds,
                                "kv_usage": m.get("jpaged:kv_cache_usage_perc", 0.0),
                                "running": m.get("jpaged:num_requests_running", 0.0)})
                await asyncio.sleep(sample_s)

        await asyncio.gather(sampler(), *(worker(i) for i in range(concurrency)))
        for _ in range(100):  # the aborted and timed-out requests are freed before the next steps
            m = await metrics(session, url)
            if m["jpaged:num_requests_running"] == m["jpaged:num_requests_waiting"] == m["jpaged:kv_cache_usage_perc"] == 0:
                break
            await asyncio.sleep(0.1)
    rss = [s["rss_mib"] for s in samples]
    quarter = max(len(rss) // 4, 1)
    growth = statistics.median(rss[-quarter:]) - statistics.median(rss[quarter : 2 * quarter] or rss) if pid else 0.0
    base = statistics.median(rss[quarter : 2 * quarter] or rss) if pid else 0.0
    lost = {k: v for k, v in outcomes.items() if k.startswith("lost")}
    failures = [f"{n} lost ({k})" for k, n in lost.items()]
    if m["jpaged:num_requests_running"] or m["jpaged:num_requests_waiting"] or m["jpaged:kv_cache_usage_perc"]:
        failures.append(f"not idle after the load: {m}")
    if pid and growth > 0.10 * base + 32:
        failures.append(f"RSS still growing after warm-up: +{growth:.0f} MiB over {base:.0f} MiB")
    return {"requests": sum(outcomes.values()), "outcomes": dict(outcomes), "samples": samples,
            "rss_start_mib": rss[0] if rss else None, "rss_end_mib": rss[-1] if rss else None,
            "rss_growth_after_warmup_mib": growth, "failures": failures}


def _start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    log = open(args.server_log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "jpaged", "serve", "--port", "0", "--max-queued-requests",
                             str(args.max_queued_requests), *args.serve_args], stdout=log, stderr=subprocess.STDOUT)
    while proc.poll() is None:
        match = re.search(r"ready on (http://[\d.]+:\d+)", Path(args.server_log).read_text())
        if match:
            return proc, match.group(1)
        time.sleep(0.5)
    raise SystemExit(f"the server exited with {proc.returncode}; see {args.server_log}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="a running server; else one is started")
    p.add_argument("--pid", type=int, default=None, help="the running server's process id (RSS, descriptors)")
    p.add_argument("--duration", type=float, default=1200.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--max-queued-requests", type=int, default=32, help="of the server it starts")
    p.add_argument("--server-log", default="soak-server.log")
    p.add_argument("--output-json", default=None)
    p.add_argument("serve_args", nargs="*", help="more `jpaged serve` options (after --)")
    args = p.parse_args(argv)
    proc = None
    url, pid = args.url, args.pid
    if url is None:
        proc, url = _start_server(args)
        pid = proc.pid
    try:
        report = asyncio.run(soak(url, pid, args.duration, args.concurrency, args.seed, args.sample_s))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    print(f"{'requests':<28}{report['requests']:>10}")
    for outcome, n in sorted(report["outcomes"].items()):
        print(f"  {outcome:<26}{n:>10}")
    print(f"{'RSS start / end (MiB)':<28}{report['rss_start_mib']!s:>10} / {report['rss_end_mib']}")
    print(f"{'RSS growth after warm-up':<28}{report['rss_growth_after_warmup_mib']:>10.1f}")
    for failure in report["failures"]:
        print(f"FAIL: {failure}")
    if args.output_json:
        from benchmarks.throughput import device_info  # imports jax: only for the file

        run = dict(duration_s=args.duration, concurrency=args.concurrency, seed=args.seed, url=args.url)
        Path(args.output_json).write_text(json.dumps(dict(meta=device_info(), run=run, **report), indent=1))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
