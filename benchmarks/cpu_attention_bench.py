"""The C++ paged-attention kernel (pallas_kernels/cpu/paged_attention.cc) on decode steps, per call.

A decode step calls it once a layer, each time on another layer's K/V pools, which a step reads
from memory, not from cache. So each timed function runs one call on each of `--layers` pairs
of pools (the default model's: 9 query heads, 3 KV heads of 64, pages of 16, 30 layers) and
divides by the layers; the best of `--samples` such runs. Batches of one sequence (one
stream: the kernel splits its positions across threads) and of several, at a few context lengths.
Each shape's output is checked against the plain-jnp reference before it is timed.

    python -m benchmarks.cpu_attention_bench --out benchmarks/results/DATE-cpu-attention.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.throughput import device_info
from pallas_kernels.cpu_attention import ragged_paged_attention_cpu
from pallas_kernels.reference import ragged_paged_attention_reference

HEADS, KV_HEADS, HEAD_DIM, PAGE = 9, 3, 64, 16


def bench_point(batch: int, context: int, layers: int, samples: int, rng: np.random.Generator) -> dict:
    pages_per_seq = -(-context // PAGE)
    num_pages = batch * pages_per_seq + 1
    shape = (num_pages, PAGE, KV_HEADS, HEAD_DIM)
    pools = [tuple(jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(2)) for _ in range(layers)]
    tables = jnp.asarray(rng.permutation(num_pages)[: batch * pages_per_seq].reshape(batch, pages_per_seq), jnp.int32)
    kv_lens = jnp.full((batch,), context, jnp.int32)
    cu_q_lens = jnp.arange(batch + 1, dtype=jnp.int32)
    q = jnp.asarray(rng.standard_normal((batch, HEADS, HEAD_DIM), np.float32))
    args = dict(block_tables=tables, kv_lens=kv_lens, cu_q_lens=cu_q_lens, scale=HEAD_DIM**-0.5)

    got = ragged_paged_attention_cpu(q, *pools[0], **args)
    want = ragged_paged_attention_reference(q, *pools[0], **args)
    err = float(jnp.abs(got - want).max())
    if err > 1e-4:
        raise AssertionError(f"batch {batch}, context {context}: max error {err} against the reference")

    @jax.jit
    def run(q, pools):
        for k, v in pools:  # each call's output feeds the next, as layers do
            q = q + 1e-3 * ragged_paged_attention_cpu(q, k, v, **args)
        return q

    jax.block_until_ready(run(q, pools))
    best = float("inf")
    for _ in range(samples):
        t0 = time.perf_counter()
        jax.block_until_ready(run(q, pools))
        best = min(best, time.perf_counter() - t0)
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * 4
    return dict(batch=batch, context=context, layers=layers, us_per_call=best / layers * 1e6,
                kv_gbytes_per_s=kv_bytes * layers / best / 1e9, max_abs_error=err)


def table(rows: list[dict]) -> str:
    out = [f"{'batch':>5} {'context':>7} {'us/call':>9} {'KV GB/s':>8}"]
    out += [f"{r['batch']:5d} {r['context']:7d} {r['us_per_call']:9.1f} {r['kv_gbytes_per_s']:8.1f}" for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 256, 512, 2048])
    p.add_argument("--layers", type=int, default=30, help="pool pairs a timed run goes through")
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--out", default=None, help="results JSON")
    args = p.parse_args(argv)
    if jax.default_backend() != "cpu":
        p.error("this benchmark measures the CPU kernel; run it with JAX on the CPU")
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            rows.append(bench_point(batch, context, args.layers, args.samples, rng))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(dict(meta=device_info(), rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
