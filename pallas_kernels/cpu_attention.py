"""Ragged paged attention for CPUs: a C++ kernel (cpu/paged_attention.cc) behind the XLA FFI.

Built on first use (pallas_kernels/cpu_build.py); `unavailable_reason()` says why it cannot be
used here, or None (no compiler: the caller falls back to the XLA formulation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu_build import require, unavailable_reason

__all__ = ["ragged_paged_attention_cpu", "unavailable_reason"]

_TARGET = "jpaged_paged_attention_f32"


def ragged_paged_attention_cpu(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    kv_lens: jax.Array,
    cu_q_lens: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
) -> jax.Array:
    """Same contract as ragged_paged_attention_reference, float32: q [T, N, H] -> [T, N, H]."""
    require("paged-attention")
    if k_pages.dtype != jnp.float32:
        raise TypeError(f"the CPU paged-attention kernel takes float32 KV pages, not {k_pages.dtype}")
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    out = call(
        q.astype(jnp.float32), k_pages, v_pages,
        block_tables.astype(jnp.int32), kv_lens.astype(jnp.int32), cu_q_lens.astype(jnp.int32),
        scale=np.float32(scale), sliding_window=np.int64(sliding_window or 0),
    )
    return out.astype(q.dtype)
