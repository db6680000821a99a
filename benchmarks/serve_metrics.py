"""Serving metrics from timed requests, named and printed as `vllm bench serve` does.

    TTFT  time to first token: request sent -> first non-empty token chunk
    TPOT  time per output token, excluding the first: (e2e - ttft) / (output_tokens - 1), per request
          (requests with one output token have none)
    ITL   inter-token latency: the gap between successive token chunks, over all requests
    E2EL  end-to-end latency: request sent -> end of the stream

Only successful requests count towards tokens and latencies. A statistic over no values is None
(printed `n/a`), never a misleading 0.
"""

from __future__ import annotations

import collections

import numpy as np

from benchmarks.sse_client import RequestOutput

# (key, table heading, statistic name in the rows)
LATENCIES = (
    ("ttft", "Time to First Token", "TTFT"),
    ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
    ("itl", "Inter-token Latency", "ITL"),
    ("e2el", "End-to-end Latency", "E2EL"),
)
WIDTH = 50


def _tpot(out: RequestOutput) -> float | None:
    if out.num_output_tokens < 2:
        return None
    return (out.e2e - out.ttft) / (out.num_output_tokens - 1)


def _stats(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return dict(mean=None, median=None, p99=None)
    ms = np.asarray(seconds) * 1000
    return dict(mean=float(np.mean(ms)), median=float(np.median(ms)), p99=float(np.percentile(ms, 99)))


def compute_metrics(outputs: list[RequestOutput], duration: float) -> dict:
    """The flat metrics dict (vLLM's key names); duration is the benchmark's wall time in seconds."""
    ok = [o for o in outputs if o.success]
    num_input = sum(o.num_prompt_tokens for o in ok)
    num_output = sum(o.num_output_tokens for o in ok)
    metrics = dict(
        completed=len(ok), failed=len(outputs) - len(ok), duration=duration,
        total_input_tokens=num_input, total_output_tokens=num_output,
        request_throughput=len(ok) / duration, output_throughput=num_output / duration,
        total_token_throughput=(num_input + num_output) / duration,
    )
    values = dict(
        ttft=[o.ttft for o in ok], tpot=[t for t in map(_tpot, ok) if t is not None],
        itl=[gap for o in ok for gap in o.itls], e2el=[o.e2e for o in ok],
    )
    for key, _, _ in LATENCIES:
        for stat, value in _stats(values[key]).items():
            metrics[f"{stat}_{key}_ms"] = value
    return metrics


def error_counts(outputs: list[RequestOutput]) -> dict[str, int]:
    """Distinct error messages of the failed requests, most frequent first."""
    return dict(collections.Counter(o.error for o in outputs if not o.success).most_common())


def request_record(out: RequestOutput) -> dict:
    """One request, summarised for the JSON file (its ITLs as count and mean, not the list)."""
    tpot = _tpot(out)
    return dict(
        success=out.success, error=out.error, prompt_tokens=out.num_prompt_tokens,
        output_tokens=out.num_output_tokens, ttft_ms=out.ttft * 1000, e2el_ms=out.e2e * 1000,
        tpot_ms=None if tpot is None else tpot * 1000, num_itls=len(out.itls),
        mean_itl_ms=float(np.mean(out.itls)) * 1000 if out.itls else None,
    )


def _row(name: str, value, fmt: str = "") -> str:
    text = "n/a" if value is None else format(value, fmt)
    return f"{name:<40} {text}"


def format_table(metrics: dict, title: str = "Serving Benchmark Result") -> str:
    lines = [f" {title} ".center(WIDTH, "="),
             _row("Successful requests:", metrics["completed"]),
             _row("Failed requests:", metrics["failed"]),
             _row("Benchmark duration (s):", metrics["duration"], ".2f"),
             _row("Total input tokens:", metrics["total_input_tokens"]),
             _row("Total generated tokens:", metrics["total_output_tokens"]),
             _row("Request throughput (req/s):", metrics["request_throughput"], ".2f"),
             _row("Output token throughput (tok/s):", metrics["output_throughput"], ".2f"),
             _row("Total token throughput (tok/s):", metrics["total_token_throughput"], ".2f")]
    for key, heading, name in LATENCIES:
        lines.append(f" {heading} ".center(WIDTH, "-"))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            lines.append(_row(f"{label} {name} (ms):", metrics[f"{stat}_{key}_ms"], ".2f"))
    lines.append("=" * WIDTH)
    return "\n".join(lines)
