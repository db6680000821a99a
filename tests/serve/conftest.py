"""A real `python -m jpaged serve` subprocess on a free loopback port, and clients for it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

START_TIMEOUT_S = 300  # a fresh JPAGED_HOME converts the default model and compiles every bucket


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jpaged", "serve", "--host", "127.0.0.1", "--port", "0", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=os.environ.copy(),
        )
        self.url = ""

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> ServerProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = re.search(r"ready on (http://[\d.]+:\d+)", self.log())
            if match:
                self.url = match.group(1)
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {timeout_s}s:\n{self.log()[-3000:]}")

    def stop(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def openai(self, api_key: str = "EMPTY"):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def request(self, method: str, path: str, body: bytes | dict | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """A raw HTTP request: (status, headers, body), errors included."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        if data is not None:  # urllib's default would be a form (415)
            headers = {"Content-Type": "application/json", **(headers or {})}
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def metrics(self) -> dict[str, float]:
        """jpaged:* samples of /metrics, by name (labels dropped)."""
        status, _, text = self.request("GET", "/metrics")
        assert status == 200
        samples = {}
        for line in text.decode().splitlines():
            if line.startswith("jpaged:"):
                name_labels, value = line.rsplit(" ", 1)
                samples[name_labels.split("{")[0]] = float(value)
        return samples

    def wait_idle(self, timeout_s: float = 10.0) -> dict[str, float]:
        """metrics() once nothing runs or waits and the KV usage is 0 (or when timeout_s has passed)."""
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.metrics()
            idle = m["jpaged:num_requests_running"] == 0 and m["jpaged:num_requests_waiting"] == 0
            if (idle and m["jpaged:kv_cache_usage_perc"] == 0) or time.monotonic() > deadline:
                return m
            time.sleep(0.1)


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """start_server(*args) -> a ready ServerProcess; every one started is stopped after the module."""
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        server = ServerProcess(list(args), tmp_path_factory.mktemp("server") / "server.log")
        started.append(server)
        return server.wait_ready()

    yield start
    for server in started:
        server.stop()
