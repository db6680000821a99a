"""The live server (default model) under Schemathesis, then under a short soak (benchmarks/soak.py).

Schemathesis reads /openapi.json and sends what the schema allows and what it does not, to every
route; no answer may be a 5xx (`not_a_server_error`), and every error body must match the schema's
OpenAI error object (`response_schema_conformance`: the schema states only that). The soak then
mixes streamed and plain completions and chat, n > 1, aborts, client time-outs, bad bodies and
bursts past the queue (429) for SOAK_S seconds: nothing may be lost, and RSS must not keep growing.
After each the server must be idle (nothing running or waiting, KV usage 0) and still answer.

One server serves both (its start is most of the cost when the compiled steps are cached); the two
run one after the other, never together, so that each can check the server idle at its end.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import soak

pytestmark = pytest.mark.default_model

HERE = Path(__file__).parent
# tests/serve/test_server.py's sizes, so the servers share compiled steps; a short queue so that the
# soak's bursts meet 429s.
SERVER_ARGS = ["--max-model-len", "512", "--max-num-batched-tokens", "128", "--max-num-seqs", "8",
               "--max-queued-requests", "16"]
MAX_EXAMPLES = 20  # fuzzing cases per operation; with the coverage phase's, ~1,100 requests in ~15 s
SOAK_S = 40  # 40 RSS samples, a second apart: the growth rule compares quarters of ten


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(*SERVER_ARGS)


def assert_idle_and_answering(server) -> None:
    m = server.wait_idle()
    assert (m["jpaged:num_requests_running"], m["jpaged:num_requests_waiting"], m["jpaged:kv_cache_usage_perc"]) \
        == (0, 0, 0), m
    assert server.request("GET", "/health")[0] == 200
    status, _, raw = server.request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 2


def test_schemathesis_finds_no_server_error(server, tmp_path):
    statuses = tmp_path / "statuses.txt"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HERE / "schemathesis_hooks.py"),
           "JPAGED_SCHEMATHESIS_STATUSES": str(statuses)}
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(HERE / "schemathesis.toml"), "run",
               f"{server.url}/openapi.json", "--checks", "not_a_server_error,response_schema_conformance",
               "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic", "--workers", "2",
               "--request-timeout", "30", "--no-color"]
    # cwd: Schemathesis and Hypothesis keep folders of their own there. The timeout catches a hang.
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    counts = collections.Counter(int(s) for s in statuses.read_text().split())
    print(f"schemathesis: {sum(counts.values())} requests, statuses {dict(sorted(counts.items()))}")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert not [s for s in counts if s >= 500]
    assert sum(counts.values()) > 500 and counts[200] > 0 and counts[400] > 0
    assert_idle_and_answering(server)


def test_short_soak_loses_nothing(server, tmp_path, capsys):
    report_path = tmp_path / "soak.json"
    status = soak.main(["--url", server.url, "--pid", str(server.proc.pid), "--duration", str(SOAK_S),
                        "--concurrency", "4", "--sample-s", "1", "--output-json", str(report_path)])
    report = json.loads(report_path.read_text())
    with capsys.disabled():
        print(f"\nsoak: {report['requests']} requests, {report['outcomes']}, RSS {report['rss_start_mib']} -> "
              f"{report['rss_end_mib']} MiB (growth after warm-up {report['rss_growth_after_warmup_mib']:.1f})")
    assert status == 0, report["failures"]
    outcomes = report["outcomes"]
    assert not [k for k in outcomes if k.startswith("lost")]
    # Every kind of ending happened: answers, refusals (400), a full queue (429), aborts and time-outs.
    assert outcomes["ok"] > 20 and {"rejected", "busy", "aborted", "timeout"} <= set(outcomes), outcomes
    assert len(report["samples"]) >= SOAK_S // 2
    assert_idle_and_answering(server)
