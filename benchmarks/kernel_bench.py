"""Paged-attention kernel benchmark: Pallas kernels vs the XLA reference at Llama-3-8B shapes.

Shapes: N=32 query heads, K=8 kv heads, H=128, bfloat16, page 16; batch 1..256 of decode
tokens at context 128..8192, plus a few prefill chunks. For each shape and implementation:
the time per call, the achieved bandwidth (K/V bytes the attention must read / time) next to
the device's measured copy bandwidth, and the attention FLOP rate.

Timing: each call runs `--repeat` times inside one jitted fori_loop (the query is perturbed by
the previous output times zero so XLA cannot hoist the call out of the loop), so host
dispatch is not measured; the median over `--samples` such loops, after a warm-up, with
block_until_ready, divided by `--repeat`.

    python -m benchmarks.kernel_bench --out benchmarks/results/kernels_h100.json     # on a GPU
    python -m benchmarks.kernel_bench --sweep --out benchmarks/results/kernels_h100.json  # + tuning knobs
    python -m benchmarks.kernel_bench --points gpu-run --out kernels.json          # a handful (gpu_run.py)
    python -m benchmarks.kernel_bench --quick --out /tmp/kernels_cpu.json             # CPU smoke test

Two XLA paths sit beside the kernels: `xla_model` is the model's own XLA attention
(jpaged/models/xla_attention.py, what `attn_backend="xla"` runs, at any size), `xla_reference`
the plain-jnp reference (gathers whole tables; skipped past `ref_max_tokens`). The JSON is
rewritten after every row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.models.xla_attention import ragged_paged_attention_xla
from pallas_kernels import paged_decode_attention, ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.decode import paged_decode_attention_pallas
from pallas_kernels.ragged import ragged_paged_attention_pallas


@dataclasses.dataclass(frozen=True)
class Shapes:
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    dtype: str = "bfloat16"


FULL = dict(
    shapes=Shapes(),
    decode=[(b, c) for b in (1, 8, 32, 64, 128, 256) for c in (128, 512, 2048, 8192)],
    prefill=[(1, 512, 512), (1, 512, 4096), (4, 512, 2048)],  # (sequences, chunk, context)
    ref_max_tokens=1 << 19,  # the XLA reference materialises [T, P*L, K, H] in f32: skip past this
    # --sweep: tuning knobs of the pallas_call wrappers at a few representative shapes.
    sweep_cases=[("decode", 1, 1, 8192), ("decode", 64, 1, 2048), ("decode", 256, 1, 512), ("prefill", 1, 2048, 2048)],
    sweep_decode=[dict(block_kv=b, num_splits=s, num_stages=st)
                  for b in (32, 64, 128) for s in (None, 1) for st in (2, 3)],
    sweep_ragged=[dict(rows_per_tile=r, block_kv=b, num_warps=w)
                  for r in (32, 64, 128) for b in (32, 64) for w in (4, 8)],
)
# gpu_run.py's step: a handful of decode points (batch 1-256, context 512-8192) and one prefill.
GPU_RUN = FULL | dict(
    decode=[(1, 512), (1, 8192), (16, 2048), (64, 4096), (256, 512), (256, 8192)],
    prefill=[(4, 512, 2048)],
)
QUICK = dict(
    shapes=Shapes(num_heads=8, num_kv_heads=2, head_dim=64),
    decode=[(1, 40), (4, 100)],
    prefill=[(2, 16, 40)],
    ref_max_tokens=1 << 19,
    sweep_cases=[("decode", 2, 1, 40)],
    sweep_decode=[dict(block_kv=32, num_splits=2), dict(block_kv=64, num_splits=1)],
    sweep_ragged=[dict(rows_per_tile=16, block_kv=32), dict(rows_per_tile=64, block_kv=64)],
)


def git_commit() -> str:
    if os.environ.get("JPAGED_GIT_COMMIT"):
        return os.environ["JPAGED_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def make_batch(rng: np.random.Generator, shapes: Shapes, q_lens: list[int], kv_lens: list[int]):
    """A paged pool holding exactly these sequences (shuffled pages, page 0 null) and their queries."""
    L = shapes.page_size
    dtype = jnp.dtype(shapes.dtype)
    pages_per_seq = max(-(-kv // L) for kv in kv_lens)
    num_pages = 1 + sum(-(-kv // L) for kv in kv_lens)
    perm = rng.permutation(np.arange(1, num_pages)).astype(np.int32)
    block_tables = np.zeros((len(kv_lens), pages_per_seq), np.int32)
    at = 0
    for s, kv in enumerate(kv_lens):
        n = -(-kv // L)
        block_tables[s, :n] = perm[at : at + n]
        at += n
    key = jax.random.PRNGKey(int(rng.integers(1 << 31)))
    kq, kk, kv_ = jax.random.split(key, 3)
    pool = (num_pages, L, shapes.num_kv_heads, shapes.head_dim)
    k_pages = jax.random.normal(kk, pool, dtype)
    v_pages = jax.random.normal(kv_, pool, dtype)
    q = jax.random.normal(kq, (sum(q_lens), shapes.num_heads, shapes.head_dim), dtype)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return q, k_pages, v_pages, jnp.asarray(block_tables), jnp.asarray(kv_lens, jnp.int32), jnp.asarray(cu)


def time_per_call(fn, q, *rest, repeat: int, samples: int) -> float:
    """Median seconds per call of fn(q, *rest), `repeat` calls per jitted loop."""

    @jax.jit
    def loop(q, *rest):
        def body(_, carry):
            out = fn(q + carry * 0, *rest)  # depends on the carry: not loop-invariant
            return out.astype(q.dtype)

        return jax.lax.fori_loop(0, repeat, body, jnp.zeros_like(q))

    loop(q, *rest).block_until_ready()  # compile + warm-up
    loop(q, *rest).block_until_ready()
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        loop(q, *rest).block_until_ready()
        times.append((time.perf_counter() - start) / repeat)
    return statistics.median(times)


def copy_bandwidth(num_bytes: int, samples: int) -> float:
    """Bytes moved per second (read + write) by an elementwise op over a large array."""
    x = jnp.zeros((num_bytes // 4,), jnp.uint32)
    f = jax.jit(lambda x: x + 1)
    f(x).block_until_ready()
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / statistics.median(times)


def kv_bytes(shapes: Shapes, kv_lens: list[int]) -> int:
    """Bytes of K and V the attention must read at least once."""
    return 2 * sum(kv_lens) * shapes.num_kv_heads * shapes.head_dim * jnp.dtype(shapes.dtype).itemsize


def attention_flops(shapes: Shapes, q_lens: list[int], kv_lens: list[int]) -> int:
    """2 matmuls x 2 flops per visible (query, key) pair per head and dimension."""
    pairs = sum(sum(kv - q + j + 1 for j in range(q)) for q, kv in zip(q_lens, kv_lens))
    return 4 * pairs * shapes.num_heads * shapes.head_dim


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON results path")
    parser.add_argument("--quick", action="store_true", help="tiny shapes in interpret mode (CPU smoke test)")
    parser.add_argument("--points", choices=["full", "gpu-run"], default="full",
                        help="which Llama-3-8B points (ignored with --quick): every one, or gpu_run.py's handful")
    parser.add_argument("--repeat", type=int, default=None, help="calls per timed loop")
    parser.add_argument("--samples", type=int, default=None, help="timed loops per measurement (median)")
    parser.add_argument("--sweep", action="store_true", help="also time the kernels' tuning knobs")
    args = parser.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    interpret = args.quick or not on_gpu
    plan = QUICK if args.quick else GPU_RUN if args.points == "gpu-run" else FULL
    repeat = args.repeat or (2 if args.quick else 20)
    samples = args.samples or (2 if args.quick else 15)
    shapes: Shapes = plan["shapes"]
    scale = shapes.head_dim**-0.5
    rng = np.random.default_rng(0)

    copy_bw = copy_bandwidth((1 << 20) if args.quick else (1 << 30), samples)
    print(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"interpret={interpret}, copy bandwidth {copy_bw / 1e9:.0f} GB/s")

    impls = {
        "pallas_decode": lambda q, k, v, bt, kv, cu: paged_decode_attention(
            q, k, v, bt, kv, scale=scale, interpret=interpret),
        "pallas_ragged": functools.partial(ragged_paged_attention, scale=scale, interpret=interpret),
        "xla_model": functools.partial(ragged_paged_attention_xla, scale=scale),
        "xla_reference": functools.partial(ragged_paged_attention_reference, scale=scale),
    }
    rows, sweep_rows = [], []
    result = dict(
        device=jax.devices()[0].device_kind,
        backend=jax.default_backend(),
        jax_version=jax.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git_commit(),
        interpret=interpret,
        quick=args.quick,
        shapes=dataclasses.asdict(shapes),
        repeat=repeat,
        samples=samples,
        copy_bandwidth_gbps=copy_bw / 1e9,
        rows=rows,
        sweep=sweep_rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:  # after every row: a run cut short keeps what it measured
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    cases = [("decode", b, 1, c) for b, c in plan["decode"]] + [("prefill", s, q, c) for s, q, c in plan["prefill"]]
    header = (f"{'kind':8s} {'seqs':>5s} {'q_len':>6s} {'ctx':>6s} {'impl':14s} {'us/call':>10s} "
              f"{'GB/s':>8s} {'%copy':>6s} {'TFLOP/s':>8s}")
    print(header)
    print("-" * len(header))
    for kind, num_seqs, q_len, ctx in cases:
        q_lens, kv_lens = [q_len] * num_seqs, [ctx] * num_seqs
        batch = make_batch(rng, shapes, q_lens, kv_lens)
        num_bytes, flops = kv_bytes(shapes, kv_lens), attention_flops(shapes, q_lens, kv_lens)
        for name, fn in impls.items():
            if name == "pallas_decode" and kind != "decode":
                continue
            if name == "xla_reference" and sum(q_lens) * batch[3].shape[1] * shapes.page_size > plan["ref_max_tokens"]:
                continue
            try:
                seconds = time_per_call(fn, *batch, repeat=repeat, samples=samples)
            except Exception as e:  # noqa: BLE001 - report and keep going (e.g. out of memory)
                print(f"{kind:8s} {num_seqs:5d} {q_len:6d} {ctx:6d} {name:14s} failed: {type(e).__name__}: {e}"[:200])
                continue
            row = dict(
                kind=kind, num_seqs=num_seqs, q_len=q_len, context=ctx, impl=name, us_per_call=seconds * 1e6,
                kv_bytes=num_bytes, gbps=num_bytes / seconds / 1e9, frac_of_copy=num_bytes / seconds / copy_bw,
                tflops=flops / seconds / 1e12,
            )
            rows.append(row)
            write()
            print(f"{kind:8s} {num_seqs:5d} {q_len:6d} {ctx:6d} {name:14s} {row['us_per_call']:10.1f} "
                  f"{row['gbps']:8.1f} {100 * row['frac_of_copy']:5.1f}% {row['tflops']:8.2f}")

    if args.sweep:
        print("\nsweep: tuning knobs (us per call)")
        for kind, num_seqs, q_len, ctx in plan["sweep_cases"]:
            batch = make_batch(rng, shapes, [q_len] * num_seqs, [ctx] * num_seqs)
            variants = [("ragged", knobs) for knobs in plan["sweep_ragged"]]
            if kind == "decode":
                variants += [("decode", knobs) for knobs in plan["sweep_decode"]]
            for which, knobs in variants:
                if which == "decode":
                    fn = lambda q, k, v, bt, kv, cu, kn=knobs: paged_decode_attention_pallas(  # noqa: E731
                        q, k, v, bt, kv, scale=scale, interpret=interpret, **kn)
                else:
                    fn = functools.partial(ragged_paged_attention_pallas, scale=scale, interpret=interpret, **knobs)
                try:
                    us = 1e6 * time_per_call(fn, *batch, repeat=repeat, samples=samples)
                except Exception as e:  # noqa: BLE001 - a knob Triton rejects is a result too
                    us = None
                    print(f"  {kind} {num_seqs}x{q_len}@{ctx} {which} {knobs}: failed {type(e).__name__}"[:200])
                sweep_rows.append(dict(kind=kind, num_seqs=num_seqs, q_len=q_len, context=ctx, kernel=which,
                                       knobs=knobs, us_per_call=us))
                write()
                if us is not None:
                    print(f"  {kind} {num_seqs}x{q_len}@{ctx} {which:6s} {knobs}: {us:.1f}")

    write()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
