"""Top-k over logits split by vocabulary, without gathering the vocabulary.

XLA partitions the sampler's reductions over a split vocabulary by itself, but given lax.top_k
on a split axis it first all-gathers the whole [B, V] onto every device. Here each device takes
the top k of its own columns, and only those candidates cross devices:

    device d: x[:, d*W:(d+1)*W]  --top k-->  values, ids + d*W     [B, k] each  (W = V / tp)
    all-gather of the candidates, device-major                       [B, tp * k]
    top k of the candidates (the same on every device)              [B, k]

The result is exactly lax.top_k's, ties included: every global winner is among its device's
top k, and a candidate list ordered by device then rank puts equal values in vocabulary order,
so lax.top_k (which keeps the lowest index first) resolves them as it would on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jpaged.parallel.mesh import TP_AXIS, shard_map
from jpaged.parallel.shardings import vocab_parts


def vocab_parallel_top_k(mesh: Mesh, vocab_size: int):
    """A lax.top_k for float logits [B, V] split by vocabulary over `mesh` (the sampler's TopK).

    lax.top_k itself when the vocabulary is not split (one device, or V not a multiple of it).
    """
    parts = vocab_parts(vocab_size, mesh.shape[TP_AXIS])
    if parts == 1:
        return jax.lax.top_k
    width = vocab_size // parts

    def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
        local_k = min(k, width)  # a device has no more than W candidates to offer

        def local(x):  # x [B, W]: this device's columns
            values, ids = jax.lax.top_k(x, local_k)  # [B, k']
            ids = ids.astype(jnp.int32) + jax.lax.axis_index(TP_AXIS) * width
            values = jax.lax.all_gather(values, TP_AXIS, axis=1, tiled=True)  # [B, tp * k']
            ids = jax.lax.all_gather(ids, TP_AXIS, axis=1, tiled=True)
            best, picks = jax.lax.top_k(values, k)  # [B, k]
            return best, jnp.take_along_axis(ids, picks, axis=1)

        return shard_map(local, mesh, in_specs=P(None, TP_AXIS), out_specs=(P(), P()))(x)

    return top_k
