"""Paged decode attention: one query token per sequence, flash-decoding over KV splits.

Grid (B, K, num_splits). Program (b, h, s) loads the query group of kv head h of sequence
b once (G rows, zero-padded to GP = max(16, next_pow2(G)) rows for the MMA), walks its share
of the sequence's KV blocks through the block table, and keeps m / l / acc in float32.

    sequence b, kv_len = 300, block_kv = 64, num_splits = 2
    blocks:  [0 ,64) [64,128) [128,192) [192,256) [256,300)
    split 0: ^^^^^^^^^^^^^^^^^^^^^^^^^^                      (3 blocks = ceil(5 / 2))
    split 1:                            ^^^^^^^^^^^^^^^^^^^^^^

Every sequence is split by its own length. With one split the kernel writes the normalised
output in q.dtype; with more, each split writes its partial (acc, m, l) in float32 and a
plain-JAX reduction combines them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common
from pallas_kernels.reference import ragged_paged_attention_reference

# Enough programs to fill an H100 (132 SMs) several times over; splitting further only adds
# partial outputs to combine.
_TARGET_PROGRAMS = 512
_MAX_SPLITS = 32


def _decode_kernel(
    q_ref,  # [GP, H] this program's query group
    k_ref,  # [NP * L, K, H]
    v_ref,  # [NP * L, K, H]
    bt_ref,  # int32 [B, P]
    lens_ref,  # int32 [B]
    *out_refs,  # normalised o [GP, H]; or acc [GP, H], m [GP], l [GP] (f32)
    num_splits: int,
    block_kv: int,
    page_size: int,
    pages_per_seq: int,
    scale_log2: float,
    sliding_window: int | None,
):
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kv_len = lens_ref[b]
    q = q_ref[...]
    q_pos = jnp.full((q.shape[0],), kv_len - 1, jnp.int32)
    blk_hi = pl.cdiv(kv_len, block_kv)
    blk_lo = 0
    if sliding_window is not None:
        blk_lo = jnp.maximum(kv_len - sliding_window, 0) // block_kv
    lo, hi = _common.split_range(blk_lo, blk_hi, split, num_splits)
    acc, m, l = _common.attend_blocks(
        q, q_pos, k_ref, v_ref, bt_ref, b, h, kv_len, lo, hi,
        block_kv=block_kv, page_size=page_size, pages_per_seq=pages_per_seq,
        scale_log2=scale_log2, sliding_window=sliding_window,
    )
    if num_splits == 1:
        (o_ref,) = out_refs
        o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)
    else:
        acc_ref, m_ref, l_ref = out_refs
        acc_ref[...] = acc
        m_ref[...] = m
        l_ref[...] = l


def default_num_splits(batch: int, num_kv_heads: int, max_kv: int, block_kv: int) -> int:
    """Enough KV splits to give about _TARGET_PROGRAMS programs, never more than there are blocks."""
    wanted = pl.cdiv(_TARGET_PROGRAMS, batch * num_kv_heads)
    return max(1, min(_common.next_pow2(wanted), _MAX_SPLITS, pl.cdiv(max_kv, block_kv)))


def default_block_kv(head_dim: int) -> int:
    # 16 KiB of bf16 K (and as much V) per step at either head_dim.
    return 64 if head_dim >= 128 else 128


def paged_decode_attention_pallas(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    context_lens: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    block_kv: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """The pallas_call and the split combine, with tuning knobs; inputs are not validated."""
    batch, num_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    pages_per_seq = block_tables.shape[1]
    group = num_heads // num_kv_heads
    group_pad = max(16, _common.next_pow2(group))  # Triton dots need M >= 16
    block_kv = block_kv or default_block_kv(head_dim)
    _common.check_block("block_kv", block_kv)
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, pages_per_seq * page_size, block_kv)

    q_groups = q.reshape(batch, num_kv_heads, group, head_dim)
    q_groups = jnp.pad(q_groups, ((0, 0), (0, 0), (0, group_pad - group), (0, 0)))  # [B, K, GP, H]
    flat = (num_pages * page_size, num_kv_heads, head_dim)
    k_flat, v_flat = k_pages.reshape(flat), v_pages.reshape(flat)

    kernel = functools.partial(
        _decode_kernel,
        num_splits=num_splits,
        block_kv=block_kv,
        page_size=page_size,
        pages_per_seq=pages_per_seq,
        scale_log2=float(scale) * _common.LOG2_E,
        sliding_window=sliding_window,
    )
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((batch, num_kv_heads, group_pad, head_dim), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, group_pad, head_dim), lambda b, h, s: (b, h, 0, 0))]
    else:
        part = (num_splits, batch, num_kv_heads, group_pad)
        out_shape = [
            jax.ShapeDtypeStruct(part + (head_dim,), jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
        ]
        out_specs = [
            pl.BlockSpec((None, None, None, group_pad, head_dim), lambda b, h, s: (s, b, h, 0, 0)),
            pl.BlockSpec((None, None, None, group_pad), lambda b, h, s: (s, b, h, 0)),
            pl.BlockSpec((None, None, None, group_pad), lambda b, h, s: (s, b, h, 0)),
        ]
    outs = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_splits),
        in_specs=[
            pl.BlockSpec((None, None, group_pad, head_dim), lambda b, h, s: (b, h, 0, 0)),
            _common.whole(flat),
            _common.whole(flat),
            _common.whole(block_tables.shape),
            _common.whole(context_lens.shape),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_common.compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"paged_decode_attention_bkv{block_kv}_s{num_splits}",
    )(q_groups, k_flat, v_flat, block_tables, context_lens)
    if num_splits == 1:
        out = outs[0]
    else:
        out = _common.combine_splits(*outs)  # [B, K, GP, H] f32
    return out[:, :, :group, :].reshape(batch, num_heads, head_dim).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "sliding_window"))
def paged_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    context_lens: jax.Array,
    *,
    scale: float,
    interpret: bool = False,
    sliding_window: int | None = None,
) -> jax.Array:
    """Attention of one new query token per sequence over a paged KV cache.

    Args:
      q: [B, N, H] the query of each sequence, at position context_lens[b] - 1.
      k_pages, v_pages: [NP, L, K, H] one layer's KV pool (N % K == 0, H a power of two >= 16),
        same dtype as q (float32, bfloat16 or float16).
      block_tables: int32 [B, P] page ids of each sequence; every entry must be a valid page
        id (unused entries: the null page 0), since a block may read past the sequence's end.
      context_lens: int32 [B] KV length of each sequence including the new token (>= 1;
        a sequence with 0 gets zeros).
      scale: softmax scale, usually H ** -0.5.
      interpret: run the kernel in the Pallas interpreter (CPU tests).
      sliding_window: if set, the query at position i sees only positions > i - sliding_window.

    Returns:
      [B, N, H] in q.dtype.
    """
    _common.check_pool(k_pages, v_pages, q)
    _common.check_window(sliding_window)
    batch = q.shape[0]
    if batch < 1:
        raise ValueError(f"need at least one sequence, got q {q.shape}")
    if block_tables.ndim != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [B={batch}, max_pages], got shape {block_tables.shape}")
    _common.check_int_array("block_tables", block_tables, block_tables.shape)
    _common.check_int_array("context_lens", context_lens, (batch,))
    return paged_decode_attention_pallas(
        q, k_pages, v_pages, block_tables, context_lens,
        scale=scale, sliding_window=sliding_window, interpret=interpret,
    )


def paged_decode_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    context_lens: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
) -> jax.Array:
    """Plain-jnp decode attention: the ragged reference with one query token per sequence."""
    batch = q.shape[0]
    cu_q_lens = jnp.arange(batch + 1, dtype=jnp.int32)
    out = ragged_paged_attention_reference(
        q, k_pages, v_pages, block_tables, context_lens, cu_q_lens, scale=scale, sliding_window=sliding_window
    )
    # The ragged reference treats kv_len 0 with one query as position -1 (nothing visible).
    return jnp.where((context_lens > 0)[:, None, None], out, 0).astype(q.dtype)
