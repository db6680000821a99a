"""Shape buckets: every device call is padded to one of a few fixed sizes, so nothing compiles after warm-up."""

from __future__ import annotations

import bisect


def power_of_two_buckets(smallest: int, largest: int) -> tuple[int, ...]:
    """Powers of two from `smallest` up to and including `largest` (itself added if not a power of two)."""
    buckets, size = [], smallest
    while size < largest:
        buckets.append(size)
        size *= 2
    buckets.append(largest)
    return tuple(buckets)


def pick_bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]
