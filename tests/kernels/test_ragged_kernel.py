"""ragged_paged_attention against a float64 reference: interpreter on CPU, compiled on a GPU."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from kernel_cases import (
    DTYPES,
    INTERPRET_MODES,
    TOLERANCE,
    make_ragged_case,
    random_ragged_case,
    reference_f64,
    relative_error,
)
from pallas_kernels.ragged import ragged_paged_attention_pallas, tile_table


def mixed_lengths(page_size: int) -> tuple[list[int], list[int]]:
    """Decode tokens around page boundaries, a fresh prefill, a prefill chunk, a sequence
    with no tokens this step, and long decodes."""
    L = page_size
    q_lens = [1, 1, 1, 1, L + 3, 5, 0, 1, 3]
    kv_lens = [1, L - 1, L, L + 1, L + 3, 2 * L + 5, 7, 6 * L + 3, 9 * L]
    return q_lens, kv_lens


# (num_heads, num_kv_heads, head_dim, page_size, dtype, sliding_window)
CONFIGS = [
    (4, 4, 64, 16, "float32", None),  # G = 1
    (6, 2, 64, 32, "bfloat16", None),  # G = 3 (group padded to 4)
    (8, 2, 128, 16, "float16", None),  # G = 4
    (16, 2, 128, 32, "float32", 20),  # G = 8, window
    (8, 1, 64, 16, "bfloat16", 7),  # G = 8, single kv head, window
    (12, 4, 128, 16, "bfloat16", None),  # G = 3, head_dim 128
]


@pytest.mark.parametrize("interpret", INTERPRET_MODES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,page_size,dtype,window", CONFIGS)
def test_ragged_matches_reference(interpret, num_heads, num_kv_heads, head_dim, page_size, dtype, window):
    rng = np.random.default_rng(num_heads * 1000 + head_dim + page_size)
    q_lens, kv_lens = mixed_lengths(page_size)
    num_tokens = sum(q_lens) + 5  # padding tokens
    case = make_ragged_case(
        rng, q_lens, kv_lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        page_size=page_size, dtype=DTYPES[dtype], num_tokens=num_tokens, num_seqs=len(q_lens) + 2,
    )
    out = pallas_kernels.ragged_paged_attention(
        *case.args, scale=case.scale, interpret=interpret, sliding_window=window
    )
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    assert relative_error(out, reference_f64(case, window)) < TOLERANCE[dtype]
    assert np.all(np.asarray(out[sum(q_lens) :], np.float32) == 0.0), "padding tokens must be zeros"


@pytest.mark.parametrize("interpret", INTERPRET_MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ragged_random_batches(interpret, seed):
    case, window = random_ragged_case(np.random.default_rng(100 + seed))
    out = pallas_kernels.ragged_paged_attention(
        *case.args, scale=case.scale, interpret=interpret, sliding_window=window
    )
    assert relative_error(out, reference_f64(case, window)) < TOLERANCE["float32"]


@pytest.mark.parametrize("interpret", INTERPRET_MODES)
@pytest.mark.parametrize(
    "rows_per_tile,block_kv,num_splits",
    [(16, 16, 1), (64, 32, 1), (128, 64, 3)],  # block_kv 16 < page 32: a block is part of a page
)
def test_ragged_tilings(interpret, rows_per_tile, block_kv, num_splits):
    rng = np.random.default_rng(7)
    q_lens, kv_lens = mixed_lengths(32)
    case = make_ragged_case(
        rng, q_lens, kv_lens, num_heads=8, num_kv_heads=2, head_dim=64, page_size=32,
        dtype=jnp.float32, num_tokens=sum(q_lens) + 3, num_seqs=len(q_lens) + 1,
    )
    out = ragged_paged_attention_pallas(
        *case.args, scale=case.scale, rows_per_tile=rows_per_tile, block_kv=block_kv,
        num_splits=num_splits, interpret=interpret,
    )
    assert relative_error(out, reference_f64(case)) < TOLERANCE["float32"]


def test_ragged_agrees_with_model_reference():
    """The XLA backend the model uses and the kernel implement the same contract."""
    rng = np.random.default_rng(3)
    q_lens, kv_lens = mixed_lengths(16)
    case = make_ragged_case(
        rng, q_lens, kv_lens, num_heads=8, num_kv_heads=2, head_dim=64, page_size=16,
        dtype=jnp.float32, num_tokens=sum(q_lens) + 4, num_seqs=len(q_lens) + 1, poison=False,
    )
    for window in (None, 10):
        ref = pallas_kernels.ragged_paged_attention_reference(*case.args, scale=case.scale, sliding_window=window)
        out = pallas_kernels.ragged_paged_attention(*case.args, scale=case.scale, interpret=True, sliding_window=window)
        assert relative_error(ref, reference_f64(case, window)) < 1e-5
        assert relative_error(out, np.asarray(ref, np.float64)) < 1e-5


def test_tile_table():
    cu_q_lens = jnp.array([0, 5, 6, 6, 9], jnp.int32)
    seq, idx = tile_table(cu_q_lens, block_q=4, num_tiles=16 // 4 + 4)
    np.testing.assert_array_equal(seq, [0, 0, 1, 3, -1, -1, -1, -1])
    np.testing.assert_array_equal(idx, [0, 1, 0, 0, 0, 0, 0, 0])
