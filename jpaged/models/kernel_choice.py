"""What `auto` picks on a CPU, per operation: the C++ kernel or XLA's own ops, whichever this
machine runs faster.

The kernels' fastest code paths depend on the CPU (AVX-512 vs AVX2), and so does XLA's: on a
2-core Zen 3 the C++ linear kernel lost to XLA's dot (77 vs 100 tok/s) while on Zen 5 it won
3x. No rule of thumb holds on every machine, so the verdict is measured: one micro-benchmark
per operation at a decode-step and a prefill-step shape, run once per kernel library (whose
name hashes the sources and the CPU) and cached beside it as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu_build

logger = logging.getLogger("jpaged")

OPERATIONS = ("linear", "attention")
_VERSION = 1  # bump when the probe's shapes change, so old verdicts are measured again
_REPEATS = 7


def _median_seconds(fn: Callable, *args) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm
    times = []
    for _ in range(_REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _linear_cases():
    """A SmolLM2-sized MLP projection (D 576 -> F 1536) at decode (16 rows) and prefill (256) sizes."""
    from pallas_kernels.cpu_linear import linear_cpu, pack_columns

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((576, 1536), np.float32))
    packed = pack_columns(w)
    for rows in (16, 256):
        x = jnp.asarray(rng.standard_normal((rows, 576), np.float32))
        yield (jax.jit(lambda x, p: linear_cpu(x, p, 1536)), (x, packed)), (jax.jit(jnp.matmul), (x, w))


def _attention_cases():
    """Default-model heads (N 9, K 3, H 64, pages of 16): 16 decoding sequences at 512 tokens of
    context, and one 128-token prefill chunk after 256 tokens."""
    from jpaged.models.xla_attention import ragged_paged_attention_xla
    from pallas_kernels.cpu_attention import ragged_paged_attention_cpu

    rng = np.random.default_rng(0)
    n, k, h, page = 9, 3, 64, 16
    for q_lens, kv_lens in (([1] * 16, [512] * 16), ([128], [384])):
        pages_per_seq = -(-max(kv_lens) // page)
        num_pages = len(q_lens) * pages_per_seq + 1
        pools = [jnp.asarray(rng.standard_normal((num_pages, page, k, h), np.float32)) for _ in range(2)]
        tables = jnp.asarray(1 + rng.permutation(num_pages - 1).reshape(len(q_lens), pages_per_seq), jnp.int32)
        cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
        q = jnp.asarray(rng.standard_normal((int(sum(q_lens)), n, h), np.float32))
        args = (q, *pools, tables, jnp.asarray(kv_lens, jnp.int32), cu)
        yield ((jax.jit(lambda *a: ragged_paged_attention_cpu(*a, scale=0.125)), args),
               (jax.jit(lambda *a: ragged_paged_attention_xla(*a, scale=0.125)), args))


def measure() -> dict[str, dict[str, float]]:
    """{operation: {"cpu": seconds, "xla": seconds}}, each the sum over the operation's shapes."""
    result = {}
    for op, cases in (("linear", _linear_cases), ("attention", _attention_cases)):
        totals = {"cpu": 0.0, "xla": 0.0}
        for (kernel, kernel_args), (xla, xla_args) in cases():
            totals["cpu"] += _median_seconds(kernel, *kernel_args)
            totals["xla"] += _median_seconds(xla, *xla_args)
        result[op] = totals
    return result


def _verdict_path() -> Path | None:
    name = cpu_build.library_name()
    return None if name is None else cpu_build.cache_dir() / f"{Path(name).stem}.choice.json"


_verdict: dict | None = None


def cpu_kernel_verdict() -> dict:
    """{"linear": bool, "attention": bool, "seconds": measure()'s timings, "cpu": ...}: True when
    the C++ kernel is faster. Measured once per kernel library, then read from its cache."""
    global _verdict
    if _verdict is not None:
        return _verdict
    path = _verdict_path()
    try:
        cached = json.loads(path.read_text())
        if cached.get("version") == _VERSION and all(isinstance(cached.get(op), bool) for op in OPERATIONS):
            _verdict = cached
    except (OSError, ValueError, AttributeError):
        pass  # none yet, or unreadable: measure again
    if _verdict is None:
        seconds = measure()
        _verdict = {"version": _VERSION, "cpu": cpu_build.cpu_model(), "seconds": seconds,
                    **{op: seconds[op]["cpu"] < seconds[op]["xla"] for op in OPERATIONS}}
        _save(path, _verdict)
    logger.info("CPU kernels on %s: %s (measured once per kernel build; cached in %s)", _verdict["cpu"], ", ".join(
        f"{op} {'cpu' if _verdict[op] else 'xla'} ({_verdict['seconds'][op]['cpu'] * 1e3:.2f} ms C++ vs "
        f"{_verdict['seconds'][op]['xla'] * 1e3:.2f} ms XLA)" for op in OPERATIONS), path)
    return _verdict


def _save(path: Path, verdict: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as tmp:
            json.dump(verdict, tmp, indent=1)
        os.replace(tmp.name, path)
    except OSError as err:
        logger.warning("cannot cache the CPU kernel verdict in %s: %s", path, err)
