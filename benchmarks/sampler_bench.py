"""The sampler's cost per step on this device, against a textbook sort-and-categorical sampler.

    python -m benchmarks.sampler_bench --out benchmarks/results/DATE-cpu-sampler.json

The baseline is what most JAX samplers do (and jpaged's did): jnp.argmax,
jax.random.categorical (a Gumbel draw per vocabulary entry) and a full descending sort for
top-k / top-p, each skipped when no row needs it. Ours (jpaged/runner/sampler.py) avoids all
three. Both run on the same random logits, per batch size and setting.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.runner.sampler import SamplingArrays, sample
from jpaged.sampling_params import MAX_LOGIT_BIAS

SETTINGS = {
    "greedy": {},
    "temperature 1": dict(temperature=1.0),
    "top_p 0.9": dict(temperature=1.0, top_p=0.9),
    "top_k 50 + top_p 0.9": dict(temperature=1.0, top_k=50, top_p=0.9),
    "logprobs 5": dict(num_logprobs=5),
}


def arrays(batch: int, history_len: int = 512, vocab_size: int = 49152, **values) -> SamplingArrays:
    base = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, presence_penalty=0.0, frequency_penalty=0.0,
                repetition_penalty=1.0, num_logprobs=-1) | values
    dtypes = dict(top_k=np.int32, num_logprobs=np.int32)
    fields = {k: np.full(batch, v, dtypes.get(k, np.float32)) for k, v in base.items()}
    return SamplingArrays(**fields, seeds=np.arange(batch, dtype=np.uint32), sample_index=np.zeros(batch, np.int32),
                          history=np.full((batch, history_len), -1, np.int32), prompt_lens=np.zeros(batch, np.int32),
                          token_bitmask=np.full((batch, -(-vocab_size // 32)), -1, np.int32),
                          bias_ids=np.zeros((batch, MAX_LOGIT_BIAS), np.int32),
                          bias_values=np.zeros((batch, MAX_LOGIT_BIAS), np.float32))


def baseline(logits, s: SamplingArrays):
    """jnp.argmax, a full sort for top-k / top-p and a Gumbel-max draw over the vocabulary, each
    skipped (as in ours) when no row needs it."""
    greedy = jnp.argmax(logits, axis=-1)

    def sort_filter(scaled):
        sorted_logits = -jnp.sort(-scaled, axis=-1)
        k = jnp.where(s.top_k > 0, s.top_k, logits.shape[-1])
        kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < s.top_p[:, None]
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(scaled >= jnp.maximum(kth, cutoff), scaled, -jnp.inf)

    def draw(logits):
        scaled = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
        scaled = jax.lax.cond(jnp.any((s.top_k > 0) | (s.top_p < 1)), sort_filter, lambda x: x, scaled)
        keys = jax.vmap(lambda seed, i: jax.random.fold_in(jax.random.key(seed), i))(s.seeds, s.sample_index)
        return jnp.where(s.temperature == 0, greedy, jax.vmap(jax.random.categorical)(keys, scaled))

    tokens = jax.lax.cond(jnp.all(s.temperature == 0), lambda x: greedy, draw, logits)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    top = jax.lax.cond(jnp.any(s.num_logprobs >= 0), lambda lp: tuple(jax.lax.top_k(lp, 20)),
                       lambda lp: (lp[:, :20], jnp.zeros((lp.shape[0], 20), jnp.int32)), logprobs)
    return tokens, top


def time_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    ours, theirs = jax.jit(sample), jax.jit(baseline)
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'batch':>5} {'setting':22} {'jpaged ms':>10} {'sort+categorical ms':>20} {'speed-up':>9}")
    for batch in args.batch:
        # logits shaped like a language model's: a few likely tokens over a long flat tail
        logits = jnp.asarray(rng.standard_normal((batch, args.vocab)) * 2 + rng.exponential(2, (batch, 1))
                             * (rng.random((batch, args.vocab)) < 0.001) * 8, jnp.float32)
        for name, values in SETTINGS.items():
            s = arrays(batch, **values)
            row = dict(batch=batch, setting=name, jpaged_ms=time_ms(ours, logits, s, repeats=args.repeats),
                       baseline_ms=time_ms(theirs, logits, s, repeats=args.repeats))
            rows.append(row)
            print(f"{batch:5} {name:22} {row['jpaged_ms']:10.1f} {row['baseline_ms']:20.1f} "
                  f"{row['baseline_ms'] / row['jpaged_ms']:8.1f}x", flush=True)
    if args.out:
        from benchmarks.throughput import device_info

        with open(args.out, "w") as f:
            json.dump(dict(meta=device_info() | dict(vocab=args.vocab), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
