"""Paged attention in plain XLA that is fast enough for CPUs: the "xla" backend.

The reference (pallas_kernels/reference.py) gathers every token's whole KV history into one
buffer, which costs T x S x K x H copies. Here, as in the ragged Pallas kernel, the flat tokens
are cut into query tiles of TILE tokens that each lie inside one sequence, and a loop walks the
pages with an online softmax, so each iteration gathers one page per tile:

    tokens  | s0 s0 s0 s0 s0 | s1 | s2 s2 |      cu_q_lens = [0, 5, 6, 8]
    tiles   | s0[0:4] | s0[4:5] | s1[0:1] | s2[0:2] | unused ...      (TILE = 4 here)

The loop runs to the longest context in the batch (a dynamic trip count), so block tables
wider than needed cost nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TILE = 16
# KV positions per loop iteration for one-token tiles (decode-shaped steps).
DECODE_SPAN = 128
# Pages gathered per loop iteration for multi-token tiles: fewer, larger iterations amortize the
# loop's overhead (2x faster on prefill and mixed steps here); one-token decode tiles are fastest
# one page at a time (measured on a 2-core CPU).
PAGES_PER_STEP = 8
_MASK_VALUE = -1e30


def _tile_table(cu_q_lens: jax.Array, num_tiles: int, tile: int):
    """For each of num_tiles tiles: (sequence, first token, valid tokens); unused tiles have 0 valid."""
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # [B]
    tiles_per_seq = (q_lens + tile - 1) // tile
    tile_start = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(tiles_per_seq).astype(jnp.int32)])
    w = jnp.arange(num_tiles)
    seq = jnp.clip(jnp.searchsorted(tile_start, w, side="right") - 1, 0, q_lens.shape[0] - 1)
    local = w - tile_start[seq]
    valid = jnp.clip(q_lens[seq] - local * tile, 0, tile)
    valid = jnp.where(w < tile_start[-1], valid, 0)
    return seq, cu_q_lens[seq] + local * tile, valid


def ragged_paged_attention_xla(
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
    """Same contract as ragged_paged_attention_reference: q [T, N, H] -> [T, N, H]; padding tokens get 0."""
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_seqs, pages_per_seq = block_tables.shape
    group = num_heads // num_kv_heads
    if num_tokens <= num_seqs:
        # Decode-shaped steps (at most one token per sequence on average): one-token tiles,
        # one per token, so no rows are wasted.
        tile, num_tiles = 1, num_tokens
    else:
        tile, num_tiles = TILE, -(-num_tokens // TILE) + num_seqs  # enough for any split of T among B

    seq, first, valid = _tile_table(cu_q_lens, num_tiles, tile)  # [W]
    if tile == 1:
        return _one_token_tiles(q, k_pages, v_pages, block_tables, kv_lens, cu_q_lens, seq, first, valid,
                                scale=scale, sliding_window=sliding_window)
    row = jnp.arange(tile)
    is_row = row[None, :] < valid[:, None]  # [W, tile]
    token = jnp.where(is_row, first[:, None] + row[None, :], num_tokens)  # num_tokens = "nowhere"
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    pos = kv_lens[seq][:, None] - q_lens[seq][:, None] + (token - cu_q_lens[seq][:, None])  # [W, tile]
    pos = jnp.where(is_row, pos, -1)
    qt = q[jnp.minimum(token, num_tokens - 1)].astype(jnp.float32) * scale  # [W, tile, N, H]
    qt = qt.reshape(num_tiles, tile, num_kv_heads, group, head_dim)
    tables = block_tables[seq]  # [W, P]
    step = 1 if tile == 1 else min(PAGES_PER_STEP, pages_per_seq)
    span = step * page_size  # KV positions per iteration
    num_steps = (jnp.max(kv_lens) + span - 1) // span

    def body(j, carry):
        m, l, acc = carry  # [W, K, tile*G], same, [W, K, tile*G, H]
        page_idx = jnp.minimum(j * step + jnp.arange(step), pages_per_seq - 1)  # clamped: masked below
        page = tables[:, page_idx]  # [W, step]
        kv_pos = j * span + jnp.arange(span)
        in_seq = kv_pos[None, :] < kv_lens[seq][:, None]  # [W, span]
        k = k_pages[page].astype(jnp.float32).reshape(num_tiles, span, num_kv_heads, head_dim)
        # V rows past a sequence's end (null or stale pages) are zeroed: 0 * NaN would leak
        v = v_pages[page].astype(jnp.float32).reshape(num_tiles, span, num_kv_heads, head_dim)
        v = jnp.where(in_seq[:, :, None, None], v, 0.0)
        s = jnp.einsum("wtkgh,wlkh->wktgl", qt, k).reshape(num_tiles, num_kv_heads, tile * group, span)
        seen = (kv_pos[None, None, :] <= pos[:, :, None]) & in_seq[:, None, :]
        if sliding_window is not None:
            seen &= kv_pos[None, None, :] > pos[:, :, None] - sliding_window
        seen = jnp.repeat(seen, group, axis=1)[:, None]  # [W, 1, tile*G, L]
        s = jnp.where(seen, s, _MASK_VALUE)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(seen, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("wkrl,wlkh->wkrh", p, v)
        return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

    rows = tile * group
    init = (
        jnp.full((num_tiles, num_kv_heads, rows), _MASK_VALUE, jnp.float32),
        jnp.zeros((num_tiles, num_kv_heads, rows), jnp.float32),
        jnp.zeros((num_tiles, num_kv_heads, rows, head_dim), jnp.float32),
    )
    _, l, acc = jax.lax.fori_loop(0, num_steps, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # rows that saw nothing (padding) stay 0
    out = out.reshape(num_tiles, num_kv_heads, tile, group, head_dim).transpose(0, 2, 1, 3, 4)
    out = out.reshape(num_tiles * tile, num_heads, head_dim)
    result = jnp.zeros((num_tokens, num_heads, head_dim), jnp.float32)
    result = result.at[token.reshape(-1)].set(out, mode="drop")
    return result.astype(q.dtype)


def _one_token_tiles(q, k_pages, v_pages, block_tables, kv_lens, cu_q_lens, seq, first, valid, *, scale, sliding_window):
    """The decode path: one query token per tile, its K/V gathered slot by slot.

    Batched dots of one query row (G rows per KV head) run far below the CPU's speed, so the
    scores are a multiply-and-reduce over H that XLA fuses with the slot gather: no K/V copy
    is materialized and no tiny matmuls are dispatched (1.4x faster than a per-page loop of
    einsums at B=32 on a 2-core CPU).

    The slots are gathered as (page, offset) of the 4-D pools, not through a flat view: a
    reshaped pool read inside the loop made XLA copy every pool each step (see write_kv).
    """
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    pages_per_seq = block_tables.shape[1]
    group = num_heads // num_kv_heads
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    pos = jnp.where(valid > 0, kv_lens[seq] - q_lens[seq] + (first - cu_q_lens[seq]), -1)  # [W]
    qq = (q.astype(jnp.float32) * scale).reshape(num_tokens, 1, num_kv_heads, group, head_dim)
    tables = block_tables[seq]  # [W, P]
    span = DECODE_SPAN
    num_steps = (jnp.max(jnp.where(valid > 0, pos + 1, 0)) + span - 1) // span

    def body(j, carry):
        m, l, acc = carry  # [W, K, G], same, [W, K, G, H]
        kv_pos = j * span + jnp.arange(span)
        page = tables[:, jnp.minimum(kv_pos // page_size, pages_per_seq - 1)]  # [W, span]
        offset = (kv_pos % page_size)[None, :]  # [1, span]
        seen = kv_pos[None, :] <= pos[:, None]  # [W, span]; pos < kv_len, so never past the sequence
        if sliding_window is not None:
            seen &= kv_pos[None, :] > pos[:, None] - sliding_window
        seen = seen[:, :, None, None]
        k = k_pages[page, offset].astype(jnp.float32)[:, :, :, None, :]  # [W, span, K, 1, H]
        s = jnp.where(seen, jnp.sum(qq * k, axis=-1), _MASK_VALUE)  # [W, span, K, G]
        m_new = jnp.maximum(m, s.max(1))
        p = jnp.where(seen, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        # V rows not seen (null or stale pages) are zeroed: 0 * NaN would leak
        v = jnp.where(seen[..., None], v_pages[page, offset].astype(jnp.float32)[:, :, :, None, :], 0.0)
        pv = jnp.sum(p[..., None] * v, axis=1)  # [W, K, G, H]
        return m_new, alpha * l + p.sum(1), alpha[..., None] * acc + pv

    shape = (num_tokens, num_kv_heads, group)
    init = (jnp.full(shape, _MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, num_steps, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # padding tokens saw nothing and stay 0
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
