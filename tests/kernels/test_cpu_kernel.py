"""The C++ CPU kernel (pallas_kernels/cpu_attention.py) against the float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import make_ragged_case, random_ragged_case, reference_f64, relative_error

from pallas_kernels.cpu_attention import ragged_paged_attention_cpu, unavailable_reason
from tests.conftest import HAS_COMPILER

pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler to build the kernel")


def test_kernel_builds_where_a_compiler_exists():
    assert unavailable_reason() is None


def run(case, window=None):
    fn = jax.jit(lambda *a: ragged_paged_attention_cpu(*a, scale=case.scale, sliding_window=window))
    return fn(*case.args)


# (num_heads, num_kv_heads, head_dim, page_size, window, q_lens, kv_lens)
CASES = [
    # decode batch around page boundaries, one sequence with no tokens, two padding sequences
    (9, 3, 64, 16, None, [1, 1, 1, 1, 0, 1], [1, 15, 16, 17, 7, 300]),
    # prefill tiles past 16 tokens (several items per sequence, transposed-K path), prefix chunk
    (8, 2, 64, 16, None, [40, 100, 1, 17], [40, 230, 65, 50]),
    (16, 2, 128, 32, 20, [33, 1, 5], [33, 99, 70]),  # G = 8, window
    (4, 4, 32, 8, 7, [1, 12, 3], [9, 12, 200]),  # G = 1, window shorter than a page
    (12, 4, 128, 16, None, [3, 1, 64], [130, 129, 64]),  # head_dim 128, blocks of 64 positions
    # one sequence decoding (or a short tile): its items split by KV position across threads
    # (merged after): one KV head, a window, two tokens, a context ending on a block boundary,
    # parts meeting inside a page and inside a block of 64
    (9, 3, 64, 16, None, [1], [200]),
    (4, 2, 32, 8, 5, [2], [37]),
    (4, 1, 64, 16, None, [1], [300]),
    (9, 3, 64, 16, 100, [1], [333]),
    (9, 3, 64, 16, None, [2], [500]),
    (8, 2, 128, 32, None, [1], [128]),
    (9, 3, 64, 32, None, [1], [90]),
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,page_size,window,q_lens,kv_lens", CASES)
def test_matches_reference(num_heads, num_kv_heads, head_dim, page_size, window, q_lens, kv_lens):
    rng = np.random.default_rng(num_heads + head_dim + page_size)
    num_real = sum(q_lens)
    # poison: unused pages, page tails and padding tokens are NaN; any stray read shows up
    case = make_ragged_case(
        rng, q_lens, kv_lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        page_size=page_size, dtype=jnp.float32, num_tokens=num_real + 5, num_seqs=len(q_lens) + 2,
    )
    out = run(case, window)
    assert out.shape == case.q.shape and out.dtype == jnp.float32
    assert relative_error(out, reference_f64(case, window)) < 1e-5
    assert np.all(np.asarray(out[num_real:]) == 0.0), "padding tokens must be zeros"


@pytest.mark.parametrize("seed", range(6))
def test_random_batches(seed):
    # wider than the Pallas tests: more sequences, longer contexts, 3 KV heads, small pages
    case, window = random_ragged_case(np.random.default_rng(500 + seed), kv_heads=(1, 2, 3), page_sizes=(8, 16, 32),
                                      head_dims=(32, 64, 128), max_seqs=11, max_pages=10, pages_per_seq=10)
    assert relative_error(run(case, window), reference_f64(case, window)) < 1e-5


def test_rejects_other_dtypes():
    case = make_ragged_case(np.random.default_rng(0), [1], [5], num_heads=2, num_kv_heads=1, head_dim=32,
                            page_size=8, dtype=jnp.bfloat16)
    with pytest.raises(TypeError, match="float32"):
        ragged_paged_attention_cpu(*case.args, scale=case.scale)
