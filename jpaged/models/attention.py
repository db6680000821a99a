"""Paged attention for the model: KV writes into the page pool and the backend behind one signature."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jpaged.models.xla_attention import ragged_paged_attention_xla
from pallas_kernels import ragged_paged_attention
from jpaged.parallel.mesh import shard_map
from jpaged.parallel.shardings import HEADS_SPEC, KV_POOL_SPEC
from jpaged.typing import KVCache
from pallas_kernels.cpu_attention import ragged_paged_attention_cpu


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where this step's tokens go in the KV pool and what each sequence attends to.

    Passed explicitly down the model (never a global). All fields are device arrays padded to
    the step's buckets; padding tokens have slot_mapping == NP * L (past the pool, dropped).
    """

    slot_mapping: jax.Array  # int32 [T] flat slot (page * L + offset) each token's K/V is written to
    block_tables: jax.Array  # int32 [B, P] page ids per sequence; padding entries are page 0
    kv_lens: jax.Array  # int32 [B] KV length per sequence after this step's tokens
    cu_q_lens: jax.Array  # int32 [B + 1] cumulative query lengths over the flat token axis


# backend(q [T, N, H], k_pages, v_pages, metadata, scale, sliding_window) -> [T, N, H]
AttentionBackend = Callable[[jax.Array, jax.Array, jax.Array, AttentionMetadata, float, int | None], jax.Array]


def _xla_backend(q, k_pages, v_pages, meta: AttentionMetadata, scale: float, sliding_window: int | None) -> jax.Array:
    return ragged_paged_attention_xla(
        q, k_pages, v_pages, meta.block_tables, meta.kv_lens, meta.cu_q_lens, scale=scale, sliding_window=sliding_window
    )


def _targets_gpu() -> bool:
    """Whether the program being traced is for a GPU: the abstract mesh's device when one is in
    context (lowering for abstract H100s on a CPU machine, tests/kernels), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if device is not None:
        return device.platform in ("cuda", "rocm", "gpu")
    return jax.default_backend() == "gpu"


def _pallas_backend(q, k_pages, v_pages, meta: AttentionMetadata, scale: float, sliding_window: int | None) -> jax.Array:
    # Off a GPU the kernel runs in the Pallas interpreter: correct but slow, for tests only.
    out = ragged_paged_attention(
        q.astype(k_pages.dtype), k_pages, v_pages, meta.block_tables, meta.kv_lens, meta.cu_q_lens,
        scale=scale, sliding_window=sliding_window, interpret=not _targets_gpu(),
    )
    return out.astype(q.dtype)


def _cpu_backend(q, k_pages, v_pages, meta: AttentionMetadata, scale: float, sliding_window: int | None) -> jax.Array:
    return ragged_paged_attention_cpu(
        q, k_pages, v_pages, meta.block_tables, meta.kv_lens, meta.cu_q_lens, scale=scale, sliding_window=sliding_window
    )


BACKENDS: dict[str, AttentionBackend] = {"xla": _xla_backend, "pallas": _pallas_backend, "cpu": _cpu_backend}


def write_kv(
    k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array, first_page: int,
    num_pages: int,
) -> tuple[jax.Array, jax.Array]:
    """Scatters k, v [T, K, H] into one layer's pages of the pools [Y * NP, L, K, H] (pages
    first_page .. first_page + NP) at slot_mapping [T] (page * L + offset within the layer).

    Padding slots point one past the layer's pages; they go one past the pools and are dropped
    (JAX would wrap a negative index), never into the next layer's null page. The scatter
    indexes (page, offset) of the 4-D pools: through a flat [Y * NP * L, K, H] view, a one-token
    step's scatter (a dynamic-update-slice) became a copy of the whole pool each step wherever a
    loop read the pool afterwards (the XLA backend's decode; XLA CPU, measured).
    """
    page_size = k_pages.shape[1]
    page, offset = slot_mapping // page_size, slot_mapping % page_size
    page = jnp.where(page < num_pages, page + first_page, k_pages.shape[0])
    k_pages = k_pages.at[page, offset].set(k.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[page, offset].set(v.astype(v_pages.dtype), mode="drop")
    return k_pages, v_pages


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    meta: AttentionMetadata,
    *,
    scale: float,
    backend: str,
    sliding_window: int | None = None,
) -> jax.Array:
    """q [T, N, H] attending through meta's block tables -> [T, N, H]."""
    return BACKENDS[backend](q, k_pages, v_pages, meta, scale, sliding_window)


def write_and_attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv: KVCache,
    meta: AttentionMetadata,
    *,
    layer: int,
    num_layers: int,
    scale: float,
    backend: str,
    sliding_window: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, KVCache]:
    """Writes this step's k, v [T, K, H] into layer `layer`'s pages of the pools (pages
    layer * NP .. (layer + 1) * NP of num_layers * NP), then attends q [T, N, H] through them:
    the block tables, numbered within a layer, shifted to that layer's pages.

    Returns the attention output [T, N, H] and the new pools. With a mesh (tensor parallelism)
    both run once per device under shard_map on that device's heads: q, k, v and the output
    split on their head axis, the pools [Y * NP, L, K, H] on K, the metadata whole. Every device
    holds the same pages for every block id, so block tables and slots need no translation,
    the scatter stays local and the donated pools never move.
    """

    def local(q, k, v, k_pages, v_pages, meta):
        num_pages = k_pages.shape[0] // num_layers
        k_pages, v_pages = write_kv(k_pages, v_pages, k, v, meta.slot_mapping, layer * num_pages, num_pages)
        # Padding table entries (0) land on the layer's own null page.
        meta = dataclasses.replace(meta, block_tables=meta.block_tables + jnp.int32(layer * num_pages))
        out = paged_attention(q, k_pages, v_pages, meta, scale=scale, backend=backend, sliding_window=sliding_window)
        return out, k_pages, v_pages

    if mesh is not None:
        local = shard_map(local, mesh, in_specs=(HEADS_SPEC,) * 3 + (KV_POOL_SPEC,) * 2 + (PartitionSpec(),),
                          out_specs=(HEADS_SPEC, KV_POOL_SPEC, KV_POOL_SPEC))
    out, k_pages, v_pages = local(q, k, v, kv[0], kv[1], meta)
    return out, (k_pages, v_pages)


def alloc_kv_pools(
    num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype,
    sharding: jax.sharding.Sharding | None = None,
) -> KVCache:
    """Zeroed (k_pages, v_pages) [Y * NP, L, K, H]: layer i's pages are i * NP .. (i + 1) * NP,
    the first of them its null page.

    With a sharding each pool is made in place, every device zeroing only its shard (a full
    pool is never on one device).
    """
    shape = (num_layers * num_pages, page_size, num_kv_heads, head_dim)
    if sharding is None:
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return zeros(), zeros()
