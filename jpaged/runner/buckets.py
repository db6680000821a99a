"""Shape buckets: every device call is padded to one of a few fixed sizes, so nothing compiles after warm-up."""

from __future__ import annotations

import bisect


def power_of_two_buckets(smallest: int, largest: int, factor: int = 2) -> tuple[int, ...]:
    """smallest * factor**i up to and including `largest` (itself added if not on the ladder)."""
    buckets, size = [], smallest
    while size < largest:
        buckets.append(size)
        size *= factor
    buckets.append(largest)
    return tuple(buckets)


def token_buckets(max_tokens: int, max_seqs: int) -> tuple[int, ...]:
    """Powers of two from 1 to max_tokens, plus in-between sizes up to max_seqs: 24, then
    quarter steps of each octave from 32 (40, 48, 56, 80, 96, 112, ...), as vLLM's batch sizes.

    A decode step has one token per sequence, so T follows the batch as requests finish; with
    the CPU kernels its cost is close to linear in T, and a batch of 33 padded to 64 pays for
    64. The extra sizes stop at max_seqs: beyond it only prefill chunks go, which fill their bucket.
    """
    limit = min(max_seqs, max_tokens)
    extra = [24] + [base * j // 4 for base in power_of_two_buckets(32, limit) for j in (5, 6, 7)]
    return tuple(sorted({*power_of_two_buckets(1, max_tokens), *(size for size in extra if size <= limit)}))


def pick_bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]
