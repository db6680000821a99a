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


def pick_bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]
