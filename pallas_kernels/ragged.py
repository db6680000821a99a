"""Ragged paged attention: prefill chunks and decode tokens of many sequences in one kernel.

The flat token axis holds S sequences end to end (cu_q_lens); a decode token is a
sequence of length 1. The work is cut into *query tiles*: tile (s, j) is tokens
[j * BQ, (j + 1) * BQ) of sequence s, so a tile never mixes sequences:

    cu_q_lens = [0, 5, 6, 6, 9], BQ = 4, tokens T = 16 (7..15 padding)
    tokens    0 1 2 3 | 4 | 5 | 6 7 8
    tiles     (0,0)     (0,1) (1,0) (3,0)     (sequence 2 has no tokens, no tile)

The tile table (sequence, tile index) is computed inside the jitted wrapper with jnp and has
the static size W = ceil(T / BQ) + S, an upper bound on the number of tiles; unused
entries hold sequence -1 and their programs exit at once (pl.when).

Grid (W, K, num_splits). Program (w, h, split) packs the BQ tokens x GP query heads of kv head
h into M = BQ * GP rows (GP = next_pow2(G), M >= 16 for the MMA):

    row r -> token j * BQ + r // GP of the sequence, query head h * G + r % GP (r % GP < G)

and walks its share of the KV blocks that any of its rows can see, causal per row. Rows
that are padding (past the sequence's end or r % GP >= G) are stored to a trash row T of the
output, which is sliced away: stores need no masks and never race with real rows.

With one split the kernel writes the normalised output in q.dtype; with more (small token
buckets, i.e. decode-heavy steps) each split writes partial (acc, m, l) in float32 and a
plain-JAX reduction combines them, as in flash-decoding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common
from pallas_kernels.reference import ragged_paged_attention_reference

_ROWS_PER_TILE = 64  # M = BQ * GP query rows per program
_MAX_SPLITS = 16
# Splits are worth their float32 partials only while the token bucket is small.
_SPLIT_TOKEN_BUDGET = 1024


def _ragged_kernel(
    tile_seq_ref,  # int32 [W] sequence of each tile, -1 if unused
    tile_idx_ref,  # int32 [W] index of the tile within its sequence
    cu_ref,  # int32 [S + 1]
    lens_ref,  # int32 [S] kv lengths
    q_ref,  # [T, N, H]
    k_ref,  # [NP * L, K, H]
    v_ref,  # [NP * L, K, H]
    bt_ref,  # int32 [S, P]
    *out_refs,  # o [T + 1, N, H]; or acc [splits, T + 1, N, H], m, l [splits, T + 1, N] (f32)
    num_splits: int,
    block_q: int,
    group: int,
    group_pad: int,
    block_kv: int,
    page_size: int,
    pages_per_seq: int,
    scale_log2: float,
    sliding_window: int | None,
):
    w, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    seq = tile_seq_ref[w]
    num_tokens = q_ref.shape[0]

    @pl.when(seq >= 0)
    def _():
        tile = tile_idx_ref[w]
        q_start = cu_ref[seq]
        q_len = cu_ref[seq + 1] - q_start
        kv_len = lens_ref[seq]
        rows = jnp.arange(block_q * group_pad, dtype=jnp.int32)
        tok = tile * block_q + rows // group_pad  # [M] token index within the sequence
        g = rows % group_pad
        is_row = (tok < q_len) & (g < group)
        head = h * group + jnp.minimum(g, group - 1)
        q = q_ref[jnp.minimum(q_start + tok, num_tokens - 1), head, :]  # [M, H]
        q_pos = kv_len - q_len + tok  # [M]

        # KV blocks any row of the tile can see: up to the tile's last query, and from the
        # first query's window start.
        first_pos = kv_len - q_len + tile * block_q
        last_pos = kv_len - q_len + jnp.minimum(tile * block_q + block_q, q_len) - 1
        blk_hi = pl.cdiv(last_pos + 1, block_kv)
        blk_lo = 0
        if sliding_window is not None:
            blk_lo = jnp.maximum(first_pos - sliding_window + 1, 0) // block_kv
        lo, hi = _common.split_range(blk_lo, blk_hi, split, num_splits)
        acc, m, l = _common.attend_blocks(
            q, q_pos, k_ref, v_ref, bt_ref, seq, h, kv_len, lo, hi,
            block_kv=block_kv, page_size=page_size, pages_per_seq=pages_per_seq,
            scale_log2=scale_log2, sliding_window=sliding_window,
        )
        out_tok = jnp.where(is_row, q_start + tok, num_tokens)  # padding rows -> trash row T
        if num_splits == 1:
            (o_ref,) = out_refs
            o_ref[out_tok, head, :] = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)
        else:
            acc_ref, m_ref, l_ref = out_refs
            acc_ref[split, out_tok, head, :] = acc
            m_ref[split, out_tok, head] = m
            l_ref[split, out_tok, head] = l


def tile_table(cu_q_lens: jax.Array, block_q: int, num_tiles: int) -> tuple[jax.Array, jax.Array]:
    """(sequence, tile index within it) of each of num_tiles query tiles; unused -> (-1, 0)."""
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    tiles_per_seq = (q_lens + block_q - 1) // block_q  # [S]
    tiles_end = jnp.cumsum(tiles_per_seq)  # [S]
    tile = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.searchsorted(tiles_end, tile, side="right").astype(jnp.int32)
    is_used = tile < tiles_end[-1]
    seq_c = jnp.minimum(seq, q_lens.shape[0] - 1)
    idx = tile - (tiles_end[seq_c] - tiles_per_seq[seq_c])
    return jnp.where(is_used, seq_c, -1).astype(jnp.int32), jnp.where(is_used, idx, 0).astype(jnp.int32)


def default_num_splits(num_tokens: int) -> int:
    return max(1, min(_MAX_SPLITS, _SPLIT_TOKEN_BUDGET // num_tokens))


def ragged_paged_attention_pallas(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    kv_lens: jax.Array,
    cu_q_lens: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    rows_per_tile: int = _ROWS_PER_TILE,
    block_kv: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """The pallas_call, tile table and split combine, with tuning knobs; inputs are not validated."""
    num_tokens, num_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    num_seqs, pages_per_seq = block_tables.shape
    group = num_heads // num_kv_heads
    group_pad = _common.next_pow2(group)
    rows = max(16, rows_per_tile, group_pad)  # Triton dots need M >= 16
    block_q = rows // group_pad
    block_kv = block_kv or (64 if head_dim >= 128 else 128)
    _common.check_block("rows_per_tile", rows)
    _common.check_block("block_kv", block_kv)
    if num_splits is None:
        num_splits = default_num_splits(num_tokens)
    if num_warps is None:  # the f32 accumulator [M, H] must fit in registers
        num_warps = 4 if rows * head_dim <= 64 * 128 else 8
    num_tiles = pl.cdiv(num_tokens, block_q) + num_seqs

    tile_seq, tile_idx = tile_table(cu_q_lens, block_q, num_tiles)
    flat = (num_pages * page_size, num_kv_heads, head_dim)
    k_flat, v_flat = k_pages.reshape(flat), v_pages.reshape(flat)

    kernel = functools.partial(
        _ragged_kernel,
        num_splits=num_splits,
        block_q=block_q,
        group=group,
        group_pad=group_pad,
        block_kv=block_kv,
        page_size=page_size,
        pages_per_seq=pages_per_seq,
        scale_log2=float(scale) * _common.LOG2_E,
        sliding_window=sliding_window,
    )
    rows_out = num_tokens + 1  # + the trash row
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((rows_out, num_heads, head_dim), q.dtype)]
    else:
        part = (num_splits, rows_out, num_heads)
        out_shape = [
            jax.ShapeDtypeStruct(part + (head_dim,), jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
        ]
    outs = pl.pallas_call(
        kernel,
        grid=(num_tiles, num_kv_heads, num_splits),
        in_specs=[
            _common.whole(tile_seq.shape),
            _common.whole(tile_idx.shape),
            _common.whole(cu_q_lens.shape),
            _common.whole(kv_lens.shape),
            _common.whole(q.shape),
            _common.whole(flat),
            _common.whole(flat),
            _common.whole(block_tables.shape),
        ],
        out_specs=[_common.whole(s.shape) for s in out_shape],
        out_shape=out_shape,
        compiler_params=_common.compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"ragged_paged_attention_m{rows}_bkv{block_kv}_s{num_splits}",
    )(tile_seq, tile_idx, cu_q_lens, kv_lens, q, k_flat, v_flat, block_tables)
    if num_splits == 1:
        out = outs[0]
    else:
        out = _common.combine_splits(*outs)  # [T + 1, N, H] f32
    # Tokens of no tile (padding past cu_q_lens[-1]) were never written.
    is_real = jnp.arange(num_tokens) < cu_q_lens[-1]
    return jnp.where(is_real[:, None, None], out[:num_tokens], 0).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "sliding_window"))
def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    kv_lens: jax.Array,
    cu_q_lens: jax.Array,
    *,
    scale: float,
    interpret: bool = False,
    sliding_window: int | None = None,
) -> jax.Array:
    """Causal attention of a ragged batch of query tokens over a paged KV cache.

    Same contract as reference.ragged_paged_attention_reference.

    Args:
      q: [T, N, H] query tokens of S sequences laid end to end; tokens at or past
        cu_q_lens[-1] are padding and get zeros.
      k_pages, v_pages: [NP, L, K, H] one layer's KV pool with this step's K/V written
        (N % K == 0, H a power of two >= 16), same dtype as q (float32, bfloat16, float16).
      block_tables: int32 [S, P] page ids per sequence; every entry must be a valid page id
        (unused entries: the null page 0), since a block may read past a sequence's end.
      kv_lens: int32 [S] KV length of each sequence including this step's tokens.
      cu_q_lens: int32 [S + 1] cumulative query lengths, non-decreasing, cu_q_lens[0] == 0,
        cu_q_lens[-1] <= T (a sequence may have 0 tokens).
      scale: softmax scale, usually H ** -0.5.
      interpret: run the kernel in the Pallas interpreter (CPU tests).
      sliding_window: if set, a query at position i sees only positions > i - sliding_window.

    Returns:
      [T, N, H] in q.dtype. Query j of sequence s sits at position kv_lens[s] - q_len[s] + j
      and attends to positions 0..itself.
    """
    _common.check_pool(k_pages, v_pages, q)
    _common.check_window(sliding_window)
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables must be [S, max_pages], got shape {block_tables.shape}")
    num_seqs = block_tables.shape[0]
    if num_seqs < 1 or q.shape[0] < 1:
        raise ValueError(
            f"need at least one sequence and one token, got block_tables {block_tables.shape}, q {q.shape}"
        )
    _common.check_int_array("block_tables", block_tables, block_tables.shape)
    _common.check_int_array("kv_lens", kv_lens, (num_seqs,))
    _common.check_int_array("cu_q_lens", cu_q_lens, (num_seqs + 1,))
    return ragged_paged_attention_pallas(
        q, k_pages, v_pages, block_tables, kv_lens, cu_q_lens,
        scale=scale, sliding_window=sliding_window, interpret=interpret,
    )


# The fourth layer: the plain-jnp reference lives in reference.py (the model's XLA backend).
__all__ = ["ragged_paged_attention", "ragged_paged_attention_pallas", "ragged_paged_attention_reference", "tile_table"]
