"""Pieces shared by the paged-attention kernels: the online-softmax walk over KV pages,
Triton compiler parameters across jax versions, and input validation.

Layout of the KV pool inside a kernel: [NP * L, K, H], the free row-major view of
[NP, L, K, H]. A KV position `pos` of sequence `s` lives at row

    block_tables[s, pos // L] * L + pos % L

so a block of BK positions is one integer-array gather `k_ref[rows, kv_head, :]` -> [BK, H],
whatever the page size (a block may span several pages, or part of one).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# Masked scores use a large finite value: -inf would turn `m_prev - m_new` into inf - inf = NaN
# for a row that has seen nothing yet. Probabilities of masked entries are also zeroed
# explicitly, so a row with nothing visible keeps l == 0 and yields zeros.
MASK_VALUE = -1e30
LOG2_E = math.log2(math.e)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# The Triton compiler-parameter class was called TritonCompilerParams before jax 0.7.
_CompilerParams = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")


def compiler_params(num_warps: int, num_stages: int):
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_block(name: str, value: int) -> None:
    """Triton blocks: powers of two, and >= 16 for the dot dimensions."""
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")


def whole(shape: tuple[int, ...]) -> pl.BlockSpec:
    """One block covering the whole array at every grid step (indexed inside the kernel).

    A per-program BlockSpec on the page pool would make interpret mode copy the pool every
    grid step; on the GPU a whole-array block is just the base pointer.
    """
    zeros = (0,) * len(shape)
    return pl.BlockSpec(shape, lambda *_: zeros)


def dot_precision(dtype) -> lax.Precision | None:
    # Pallas-Triton lowers the DEFAULT precision of an f32 dot to TF32 (~1e-3 relative
    # error); HIGHEST gives IEEE f32. 16-bit inputs need nothing.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def attend_blocks(
    q: jax.Array,  # [M, H] query rows of one kv head (any dtype; dots run in it)
    q_pos: jax.Array,  # int32 [M] position of each row's token
    k_ref,  # [NP * L, K, H]
    v_ref,  # [NP * L, K, H]
    bt_ref,  # int32 [S, P]
    seq,  # scalar: row of bt_ref
    kv_head,  # scalar
    kv_len,  # scalar: positions >= kv_len are never visible
    blk_lo,  # scalar: first KV block to visit
    blk_hi,  # scalar: one past the last KV block to visit
    *,
    block_kv: int,
    page_size: int,
    pages_per_seq: int,
    scale_log2: float,
    sliding_window: int | None,
):
    """Online softmax of q over KV blocks [blk_lo, blk_hi) of one sequence.

    Row r sees position p iff p <= q_pos[r], p < kv_len and (with a window)
    p > q_pos[r] - sliding_window. Scores are kept in the log2 domain (scale * log2 e folded
    in) so the exponentials are exp2.

    Returns (acc [M, H] f32 unnormalised, m [M] f32 running max, l [M] f32 running sum).
    A row that saw nothing has m == MASK_VALUE, l == 0, acc == 0.
    """
    num_rows, head_dim = q.shape
    precision = dot_precision(q.dtype)
    offsets = jnp.arange(block_kv, dtype=jnp.int32)

    def body(blk, carry):
        acc, m, l = carry
        pos = blk * block_kv + offsets  # [BK]
        # Clamp the table column: the last block may run past the table's width (its rows are
        # masked below, but the load must stay in bounds on the GPU).
        page_col = jnp.minimum(pos // page_size, pages_per_seq - 1)
        pages = bt_ref[seq, page_col]  # [BK]
        rows = pages * page_size + pos % page_size
        k = k_ref[rows, kv_head, :]  # [BK, H]
        v = v_ref[rows, kv_head, :]  # [BK, H]
        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )  # [M, BK]
        s = s * scale_log2
        visible = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] < kv_len)
        if sliding_window is not None:
            visible &= pos[None, :] > q_pos[:, None] - sliding_window
        s = jnp.where(visible, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        correction = jnp.exp2(m - m_new)
        p = jnp.where(visible, jnp.exp2(s - m_new[:, None]), 0.0)
        l = l * correction + jnp.sum(p, axis=1)
        # Positions past kv_len may sit on unused pages holding anything (NaN included):
        # 0 * NaN is NaN, so zero those V rows instead of trusting p == 0.
        v = jnp.where((pos < kv_len)[:, None], v, jnp.zeros_like(v))
        pv = lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
            preferred_element_type=jnp.float32,
        )  # [M, H]
        acc = acc * correction[:, None] + pv
        return acc, m_new, l

    init = (
        jnp.zeros((num_rows, head_dim), jnp.float32),
        jnp.full((num_rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((num_rows,), jnp.float32),
    )
    return lax.fori_loop(blk_lo, blk_hi, body, init)


def split_range(blk_lo, blk_hi, split, num_splits: int):
    """The share [lo, hi) of KV blocks [blk_lo, blk_hi) that split `split` of num_splits walks.

    Each sequence is split by its own length, so short and long sequences both spread over
    every split (flash-decoding). An empty share has lo >= hi.
    """
    if num_splits == 1:
        return blk_lo, blk_hi
    per_split = pl.cdiv(jnp.maximum(blk_hi - blk_lo, 0), num_splits)
    lo = blk_lo + split * per_split
    return lo, jnp.minimum(lo + per_split, blk_hi)


def combine_splits(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Merges per-split partial softmaxes (log2 domain): acc [S, ..., H], m, l [S, ...] -> [..., H] f32.

    Rows no split saw (l == 0 everywhere) come out as zeros.
    """
    m_max = jnp.max(m, axis=0)
    weight = jnp.exp2(m - m_max[None])  # [S, ...]
    l_sum = jnp.sum(l * weight, axis=0)
    acc_sum = jnp.sum(acc * weight[..., None], axis=0)
    return acc_sum / jnp.where(l_sum == 0.0, 1.0, l_sum)[..., None]


def check_pool(k_pages: jax.Array, v_pages: jax.Array, q: jax.Array, name_q: str = "q") -> None:
    """Shared shape/dtype checks of the query against the page pools; raises ValueError."""
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages must be [num_pages, page_size, num_kv_heads, head_dim], got shape {k_pages.shape}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages shape {v_pages.shape} != k_pages shape {k_pages.shape}")
    if q.ndim != 3:
        raise ValueError(f"{name_q} must be 3-D [*, num_heads, head_dim], got shape {q.shape}")
    for name, x in ((name_q, q), ("k_pages", k_pages), ("v_pages", v_pages)):
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} not supported; use float32, bfloat16 or float16")
    if not (q.dtype == k_pages.dtype == v_pages.dtype):
        raise ValueError(f"dtypes differ: {name_q} {q.dtype}, k_pages {k_pages.dtype}, v_pages {v_pages.dtype}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    _, page_size, num_kv_heads, kv_head_dim = k_pages.shape
    if kv_head_dim != head_dim:
        raise ValueError(f"head_dim of {name_q} ({head_dim}) != head_dim of k_pages ({kv_head_dim})")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16 (Triton block rule), got {head_dim}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")


def check_int_array(name: str, x: jax.Array, shape: tuple[int, ...]) -> None:
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {x.shape}")
    if x.dtype != jnp.int32:
        raise ValueError(f"{name} must be int32, got {x.dtype}")


def check_window(sliding_window: int | None) -> None:
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or a positive int, got {sliding_window!r}")
