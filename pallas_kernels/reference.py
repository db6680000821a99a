"""Plain-jnp paged attention: the reference every kernel is tested against.

It is also the "xla" attention backend of the model on CPU. It gathers each token's whole
KV history through the block table, so it moves far more bytes than a kernel; it is meant
to be obviously right, not fast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Masked scores use a large finite value instead of -inf so that rows with nothing to attend
# to (padding tokens) stay finite; their outputs are zeroed afterwards.
_MASK_VALUE = -1e30


def ragged_paged_attention_reference(
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
    """Causal attention of a ragged batch of query tokens over a paged KV cache.

    Args:
      q: [T, N, H] query tokens of B sequences laid end to end; tokens at or past
        cu_q_lens[-1] are padding and get zeros.
      k_pages, v_pages: [NP, L, K, H] one layer's KV pool, this step's K/V already written.
      block_tables: int32 [B, P] page ids of each sequence (entries past its length unused).
      kv_lens: int32 [B] KV length of each sequence including this step's tokens.
      cu_q_lens: int32 [B + 1] cumulative query lengths (a sequence may have 0 tokens).
      scale: softmax scale, usually H ** -0.5.
      sliding_window: if set, a query at position i sees only positions > i - sliding_window.

    Returns:
      [T, N, H] in q.dtype. Query j of sequence b sits at position kv_lens[b] - q_len[b] + j
      and attends to positions 0..itself.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_seqs, pages_per_seq = block_tables.shape
    group = num_heads // num_kv_heads

    token = jnp.arange(num_tokens)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, token, side="right") - 1, 0, num_seqs - 1)  # [T]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    is_real = token < cu_q_lens[-1]
    query_pos = kv_lens[seq] - q_lens[seq] + (token - cu_q_lens[seq])  # [T]

    max_kv = pages_per_seq * page_size
    k_seq = k_pages[block_tables].reshape(num_seqs, max_kv, num_kv_heads, head_dim)
    v_seq = v_pages[block_tables].reshape(num_seqs, max_kv, num_kv_heads, head_dim)
    k_tok, v_tok = k_seq[seq], v_seq[seq]  # [T, S, K, H]

    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32)
    scores = jnp.einsum("tkgh,tskh->tkgs", qg, k_tok.astype(jnp.float32)) * scale
    kv_pos = jnp.arange(max_kv)
    visible = (kv_pos[None, :] <= query_pos[:, None]) & (kv_pos[None, :] < kv_lens[seq][:, None])
    if sliding_window is not None:
        visible &= kv_pos[None, :] > query_pos[:, None] - sliding_window
    scores = jnp.where(visible[:, None, None, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("tkgs,tskh->tkgh", probs, v_tok.astype(jnp.float32))
    out = jnp.where(is_real[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
