"""paged_decode_attention against a float64 reference: interpreter on CPU, compiled on a GPU."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from kernel_cases import DTYPES, INTERPRET_MODES, TOLERANCE, make_ragged_case, reference_f64, relative_error
from pallas_kernels.decode import paged_decode_attention_pallas


def decode_case(rng, context_lens, *, num_padding_seqs=0, **kwargs):
    """One query token per sequence; padding sequences have context length 0 (and NaN queries)."""
    num_seqs = len(context_lens) + num_padding_seqs
    return make_ragged_case(
        rng, [1] * len(context_lens), list(context_lens), num_tokens=num_seqs, num_seqs=num_seqs, **kwargs
    )


def boundary_lens(page_size: int) -> list[int]:
    L = page_size
    return [1, L - 1, L, L + 1, 2 * L + 5, 6 * L + 3, 9 * L]


# (num_heads, num_kv_heads, head_dim, page_size, dtype, sliding_window)
CONFIGS = [
    (4, 4, 64, 16, "float32", None),  # G = 1
    (6, 2, 128, 16, "bfloat16", None),  # G = 3
    (8, 2, 64, 32, "float16", None),  # G = 4
    (16, 2, 128, 32, "float32", 40),  # G = 8, window
    (32, 4, 64, 16, "bfloat16", 17),  # G = 8, window
]


@pytest.mark.parametrize("interpret", INTERPRET_MODES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,page_size,dtype,window", CONFIGS)
def test_decode_matches_reference(interpret, num_heads, num_kv_heads, head_dim, page_size, dtype, window):
    rng = np.random.default_rng(num_heads * 1000 + head_dim + page_size)
    case = decode_case(
        rng, boundary_lens(page_size), num_padding_seqs=2, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, page_size=page_size, dtype=DTYPES[dtype],
    )
    out = pallas_kernels.paged_decode_attention(
        case.q, case.k_pages, case.v_pages, case.block_tables, case.kv_lens,
        scale=case.scale, interpret=interpret, sliding_window=window,
    )
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    assert relative_error(out, reference_f64(case, window)) < TOLERANCE[dtype]
    assert np.all(np.asarray(out[-2:], np.float32) == 0.0), "context length 0 must give zeros"


@pytest.mark.parametrize("interpret", INTERPRET_MODES)
@pytest.mark.parametrize("num_splits,block_kv", [(1, 64), (2, 16), (5, 32)])
def test_decode_splits(interpret, num_splits, block_kv):
    """One split (normalised in the kernel) and several (combined in JAX) give the same answer."""
    rng = np.random.default_rng(11)
    case = decode_case(
        rng, boundary_lens(16), num_heads=8, num_kv_heads=2, head_dim=64, page_size=16, dtype=jnp.float32
    )
    out = paged_decode_attention_pallas(
        case.q, case.k_pages, case.v_pages, case.block_tables, case.kv_lens,
        scale=case.scale, num_splits=num_splits, block_kv=block_kv, interpret=interpret,
    )
    assert relative_error(out, reference_f64(case)) < TOLERANCE["float32"]


@pytest.mark.parametrize("interpret", INTERPRET_MODES)
def test_decode_random_batch(interpret):
    rng = np.random.default_rng(5)
    lens = [int(x) for x in rng.integers(1, 200, 6)]
    case = decode_case(
        rng, lens, num_heads=12, num_kv_heads=4, head_dim=64, page_size=32, dtype=jnp.bfloat16, pages_per_seq=8
    )
    out = pallas_kernels.paged_decode_attention(
        case.q, case.k_pages, case.v_pages, case.block_tables, case.kv_lens, scale=case.scale, interpret=interpret
    )
    assert relative_error(out, reference_f64(case)) < TOLERANCE["bfloat16"]


def test_decode_matches_ragged_and_reference():
    """Decode is the ragged kernel's all-length-1 special case, and the plain-jnp reference agrees."""
    rng = np.random.default_rng(9)
    case = decode_case(
        rng, boundary_lens(16), num_heads=8, num_kv_heads=2, head_dim=64, page_size=16,
        dtype=jnp.float32, poison=False,
    )
    decode_args = (case.q, case.k_pages, case.v_pages, case.block_tables, case.kv_lens)
    decode = pallas_kernels.paged_decode_attention(*decode_args, scale=case.scale, interpret=True)
    ragged = pallas_kernels.ragged_paged_attention(*case.args, scale=case.scale, interpret=True)
    ref = pallas_kernels.paged_decode_attention_reference(*decode_args, scale=case.scale)
    assert relative_error(decode, np.asarray(ragged, np.float64)) < 1e-5
    assert relative_error(ref, reference_f64(case)) < 1e-5
