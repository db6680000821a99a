"""CPU projection kernels at a model's shapes: the packed C++ kernel (pallas_kernels/cpu/linear_packed.cc)
next to the float32 one (cpu/linear.cc), per call, in weights a second and bytes a second.

Shapes are the default model's (SmolLM2-135M: hidden 576, intermediate 1536, 9 + 2 x 3 heads of
64, vocabulary 49152): the fused q/k/v, o, fused gate/up and down projections as 4-bit group-32
with float16 scales and minimums (Q4_1), the lm_head as 8-bit symmetric (Q8_0), as the engine
holds them. Two placements of the weights:
  stream  every call reads another copy of the weight (as many as fill `--stream-mib`, more than
          the caches hold), as a decode step does, layer after layer;
  cached  every call reads the same copy: the kernel's arithmetic alone.
Each row runs `--calls` calls (or one per copy, if more) inside one jitted function (no host
dispatch between them); the best of `--samples` such runs, divided by the calls. Each kernel's output is checked against
a float64 numpy product of the exact weights before it is timed.

    python -m benchmarks.cpu_linear_bench --out benchmarks/results/DATE-cpu-linear-kernels.json
    python -m benchmarks.cpu_linear_bench --quick --out /tmp/cpu_linear.json      # smoke test
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
from jpaged.models.packed import PackedFormat, pack_ints, unpack
from pallas_kernels.cpu_linear import linear_cpu, pack_columns
from pallas_kernels.cpu_linear_packed import best_isa, join_panels, linear_cpu_packed, narrow_panels, pack_panels

# name: (K, N, bits, symmetric)
SHAPES = {"qkv": (576, 960, 4, False), "o": (576, 576, 4, False), "gate_up": (576, 3072, 4, False),
          "down": (1536, 576, 4, False), "lm_head": (576, 49152, 8, True)}
QUICK = {"small": (128, 96, 4, False), "small-8bit": (128, 64, 8, True)}


def make_weight(k: int, n: int, bits: int, symmetric: bool, rng: np.random.Generator):
    """A packed weight as the engine holds it and its exact float32 values [K, N]."""
    fmt = PackedFormat(bits, 32)
    q = pack_ints(rng.integers(0, 2**bits, (n, k), dtype=np.uint8), bits)
    scales = rng.uniform(0.001, 0.02, (n, k // 32)).astype(np.float16).astype(np.float32)
    mins = (np.float32(-(2 ** (bits - 1))) * scales if symmetric
            else rng.uniform(-0.1, 0.0, (n, k // 32)).astype(np.float16).astype(np.float32))
    words, s32, m32 = pack_panels(jnp.asarray(q), jnp.asarray(scales), jnp.asarray(mins), bits)
    panels = jnp.asarray(join_panels(words, *narrow_panels(s32, m32, bits)))
    return fmt, panels, unpack(q, scales, mins, fmt, np).astype(np.float32).T


def time_calls(call, x, weights: list, samples: int) -> float:
    """Seconds a call: `call(x, w)` for each of `weights` inside one jitted function, best of samples."""
    run = jax.jit(lambda x, ws: [call(x, w) for w in ws])
    jax.block_until_ready(run(x, weights))
    best = float("inf")
    for _ in range(samples):
        t0 = time.perf_counter()
        jax.block_until_ready(run(x, weights))
        best = min(best, time.perf_counter() - t0)
    return best / len(weights)


def bench(shapes: dict, rows: list[int], stream_bytes: int, calls: int, samples: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for name, (k, n, bits, symmetric) in shapes.items():
        fmt, panels, w = make_weight(k, n, bits, symmetric, rng)
        formats = {
            "packed": (panels, lambda x, p: linear_cpu_packed(x, p, fmt, n)),
            "float32": (pack_columns(jnp.asarray(w)), lambda x, p: linear_cpu(x, p, n)),
        }
        for m in rows:
            x = rng.standard_normal((m, k)).astype(np.float32)
            ref = x.astype(np.float64) @ w.astype(np.float64)
            for fmt_name, (weight, call) in formats.items():
                err = float(np.abs(np.asarray(jax.jit(call)(jnp.asarray(x), weight)) - ref).max())
                if err > 1e-4 * np.sqrt(k) * max(1.0, float(np.abs(ref).max())):
                    raise AssertionError(f"{name} {fmt_name} M={m}: max error {err} against float64")
                copies = max(2, -(-stream_bytes // weight.nbytes))
                stream = [jnp.array(weight, copy=True) for _ in range(copies)]
                cycled = [stream[i % copies] for i in range(max(calls, copies))]
                for placement, ws in (("stream", cycled), ("cached", [weight] * calls)):
                    sec = time_calls(call, jnp.asarray(x), ws, samples)
                    out.append(dict(shape=name, K=k, N=n, bits=bits if fmt_name == "packed" else 32, format=fmt_name,
                                    rows=m, placement=placement, calls=len(ws), us_per_call=sec * 1e6,
                                    gweights_per_s=k * n / sec / 1e9, gbytes_per_s=weight.nbytes / sec / 1e9,
                                    max_abs_error=err))
                    print(table(out[-1:]).splitlines()[-1], flush=True)
                del stream
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'shape':8} {'K':>5} {'N':>6} {'format':8} {'rows':>4} {'weights':8} {'us/call':>9} "
             f"{'G w/s':>7} {'GB/s':>6}"]
    for r in rows:
        lines.append(f"{r['shape']:8} {r['K']:5d} {r['N']:6d} {r['format']:8} {r['rows']:4d} {r['placement']:8} "
                     f"{r['us_per_call']:9.1f} {r['gweights_per_s']:7.1f} {r['gbytes_per_s']:6.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 32], help="activation rows (a decode batch)")
    p.add_argument("--stream-mib", type=int, default=96,
                   help="bytes of weight copies the stream placement cycles through (several times the L3)")
    p.add_argument("--calls", type=int, default=30, help="calls in one timed jitted function")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="two tiny shapes, few samples (a smoke test)")
    p.add_argument("--out", default=None, help="results JSON")
    args = p.parse_args(argv)
    if jax.default_backend() != "cpu":
        p.error("this benchmark measures the CPU kernels; run it with JAX on the CPU")
    shapes = QUICK if args.quick else SHAPES
    if args.quick:
        args.stream_mib, args.calls, args.samples = 0, 4, 2
    rows = bench(shapes, args.rows, args.stream_mib * 2**20, args.calls, args.samples)
    print(table(rows))
    result = dict(meta={**device_info(), "isa": best_isa()}, rows=rows)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
