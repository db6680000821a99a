"""/metrics: Prometheus text via prometheus_client, names after vLLM's with a `jpaged:` prefix.

Gauges and engine counters are read from the engine's latest stats at scrape time (a custom
collector), so they can never drift from the engine; latency histograms are fed by the async
engine's request listener when a request ends.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from aiohttp import web

from jpaged import AsyncLLMEngine, RequestTimings

# (metric, help, stats key); counters get the `_total` suffix from prometheus_client.
_GAUGES = [
    ("jpaged:num_requests_running", "Sequences in the engine's running batch.", "num_requests_running"),
    ("jpaged:num_requests_waiting", "Sequences waiting for a place in the batch.", "num_requests_waiting"),
    ("jpaged:kv_cache_usage_perc", "Fraction of KV-cache blocks held by requests (0 to 1).", "kv_cache_usage"),
    # A gauge, so the name stays as documented (a counter would gain `_total`); 0 under --warmup full.
    ("jpaged:num_compiles_after_warmup", "Step executables compiled after the engine reported ready.",
     "num_compiles_after_warmup"),
]
_COUNTERS = [
    ("jpaged:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
    ("jpaged:prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_cache_hits"),
    ("jpaged:num_preemptions", "Requests preempted (to be recomputed) when KV blocks ran out.", "num_preemptions"),
    ("jpaged:prompt_tokens", "Prompt tokens of requests the engine accepted.", "prompt_tokens"),
    ("jpaged:generation_tokens", "Tokens generated.", "generation_tokens"),
]
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_E2E_BUCKETS = (0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0)


class _EngineCollector:
    """Reads the engine's stats snapshot on every scrape."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        stats = self.engine.stats
        stats["num_requests_waiting"] = self.engine.num_waiting
        for name, doc, key in _GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], float(stats[key]))
            yield family
        for name, doc, key in _COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], float(stats[key]))
            yield family


class ServerMetrics:
    """One registry per server (never the global one, so several apps can live in one process)."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model_name))

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=self.registry)

        self.ttft = histogram("jpaged:time_to_first_token_seconds", "Time to the first generated token.",
                              _TTFT_BUCKETS)
        self.itl = histogram("jpaged:inter_token_latency_seconds", "Time between a request's generated tokens.",
                             _ITL_BUCKETS)
        self.e2e = histogram("jpaged:e2e_request_latency_seconds", "Arrival to last token of finished requests.",
                             _E2E_BUCKETS)
        self.requests = Counter("jpaged:request_success", "Sequences finished, by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        self.aborted = Counter("jpaged:request_aborted", "Requests aborted (client gone) before they finished.",
                               ["model_name"], registry=self.registry)

    def observe(self, t: RequestTimings) -> None:
        """Records a request that ended (a request listener of the async engine)."""
        if t.aborted:
            self.aborted.labels(self.model_name).inc()
        if t.first_token_time is not None:
            self.ttft.labels(self.model_name).observe(t.first_token_time - t.arrival_time)
        itl = self.itl.labels(self.model_name)
        for gap in t.inter_token_latencies:
            itl.observe(gap)
        if t.e2e_latency is not None:
            self.e2e.labels(self.model_name).observe(t.e2e_latency)
            for reason in t.finish_reasons:
                self.requests.labels(self.model_name, reason or "unknown").inc()

    def response(self) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


METRICS = web.AppKey("metrics", ServerMetrics)
