"""The public kernel functions reject bad shapes and dtypes with a ValueError naming the values."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import pallas_kernels

B, N, K, H, L, NP, P = 2, 8, 2, 64, 16, 8, 4


def decode_inputs(**overrides):
    x = dict(
        q=jnp.zeros((B, N, H), jnp.bfloat16),
        k_pages=jnp.zeros((NP, L, K, H), jnp.bfloat16),
        v_pages=jnp.zeros((NP, L, K, H), jnp.bfloat16),
        block_tables=jnp.zeros((B, P), jnp.int32),
        context_lens=jnp.ones((B,), jnp.int32),
    )
    x.update(overrides)
    return x


def ragged_inputs(**overrides):
    x = dict(
        q=jnp.zeros((16, N, H), jnp.bfloat16),
        k_pages=jnp.zeros((NP, L, K, H), jnp.bfloat16),
        v_pages=jnp.zeros((NP, L, K, H), jnp.bfloat16),
        block_tables=jnp.zeros((B, P), jnp.int32),
        kv_lens=jnp.ones((B,), jnp.int32),
        cu_q_lens=jnp.array([0, 1, 2], jnp.int32),
    )
    x.update(overrides)
    return x


BAD_POOL_OR_QUERY = [
    (dict(q=jnp.zeros((B, N), jnp.bfloat16)), r"q must be 3-D .*\(2, 8\)"),
    (dict(k_pages=jnp.zeros((NP, L, K * H), jnp.bfloat16)), r"k_pages must be .*\(8, 16, 128\)"),
    (dict(v_pages=jnp.zeros((NP, L, K, 32), jnp.bfloat16)), r"v_pages shape \(8, 16, 2, 32\) != k_pages shape"),
    (dict(q=jnp.zeros((B, N, H), jnp.float32)), r"dtypes differ: q float32, k_pages bfloat16"),
    (dict(k_pages=jnp.zeros((NP, L, K, H), jnp.int8), v_pages=jnp.zeros((NP, L, K, H), jnp.int8)), r"int8"),
    (dict(q=jnp.zeros((B, 7, H), jnp.bfloat16)), r"num_heads \(7\) must be a multiple of num_kv_heads \(2\)"),
    (
        dict(q=jnp.zeros((B, N, 96), jnp.bfloat16), k_pages=jnp.zeros((NP, L, K, 96), jnp.bfloat16),
             v_pages=jnp.zeros((NP, L, K, 96), jnp.bfloat16)),
        r"power of two >= 16.*96",
    ),
    (dict(q=jnp.zeros((B, N, 128), jnp.bfloat16)), r"head_dim of q \(128\) != head_dim of k_pages \(64\)"),
]


@pytest.mark.parametrize("overrides,message", BAD_POOL_OR_QUERY)
def test_decode_rejects_bad_pool_or_query(overrides, message):
    with pytest.raises(ValueError, match=message):
        pallas_kernels.paged_decode_attention(**decode_inputs(**overrides), scale=0.1, interpret=True)


@pytest.mark.parametrize("overrides,message", BAD_POOL_OR_QUERY)
def test_ragged_rejects_bad_pool_or_query(overrides, message):
    if "q" in overrides:  # ragged q is [T, N, H]: give it the same flaw with T = 16 tokens
        q = overrides["q"]
        overrides = dict(overrides, q=jnp.zeros((16,) + q.shape[1:], q.dtype))
        message = message.replace(r"\(2, 8\)", r"\(16, 8\)")
    with pytest.raises(ValueError, match=message):
        pallas_kernels.ragged_paged_attention(**ragged_inputs(**overrides), scale=0.1, interpret=True)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            dict(block_tables=jnp.zeros((B + 1, P), jnp.int32)),
            r"block_tables must be \[B=2, max_pages\], got shape \(3, 4\)",
        ),
        (dict(block_tables=jnp.zeros((B, P), jnp.uint32)), r"block_tables must be int32, got uint32"),
        (dict(context_lens=jnp.ones((B, 1), jnp.int32)), r"context_lens must have shape \(2,\), got \(2, 1\)"),
        (dict(context_lens=jnp.ones((B,), jnp.float32)), r"context_lens must be int32, got float32"),
    ],
)
def test_decode_rejects_bad_metadata(overrides, message):
    with pytest.raises(ValueError, match=message):
        pallas_kernels.paged_decode_attention(**decode_inputs(**overrides), scale=0.1, interpret=True)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(block_tables=jnp.zeros((B * P,), jnp.int32)), r"block_tables must be \[S, max_pages\], got shape \(8,\)"),
        (dict(kv_lens=jnp.ones((B + 1,), jnp.int32)), r"kv_lens must have shape \(2,\), got \(3,\)"),
        (dict(cu_q_lens=jnp.array([0, 2], jnp.int32)), r"cu_q_lens must have shape \(3,\), got \(2,\)"),
        (dict(cu_q_lens=jnp.array([0, 1, 2], jnp.uint32)), r"cu_q_lens must be int32, got uint32"),
    ],
)
def test_ragged_rejects_bad_metadata(overrides, message):
    with pytest.raises(ValueError, match=message):
        pallas_kernels.ragged_paged_attention(**ragged_inputs(**overrides), scale=0.1, interpret=True)


@pytest.mark.parametrize("window", [0, -3])
def test_rejects_bad_sliding_window(window):
    with pytest.raises(ValueError, match=rf"sliding_window must be None or a positive int, got {window}"):
        pallas_kernels.ragged_paged_attention(**ragged_inputs(), scale=0.1, interpret=True, sliding_window=window)
    with pytest.raises(ValueError, match=rf"sliding_window must be None or a positive int, got {window}"):
        pallas_kernels.paged_decode_attention(**decode_inputs(), scale=0.1, interpret=True, sliding_window=window)


def test_tuning_knobs_must_be_triton_blocks():
    from pallas_kernels.decode import paged_decode_attention_pallas
    from pallas_kernels.ragged import ragged_paged_attention_pallas

    with pytest.raises(ValueError, match=r"block_kv must be a power of two >= 16, got 48"):
        paged_decode_attention_pallas(*decode_inputs().values(), scale=0.1, block_kv=48, interpret=True)
    with pytest.raises(ValueError, match=r"rows_per_tile must be a power of two >= 16, got 96"):
        ragged_paged_attention_pallas(*ragged_inputs().values(), scale=0.1, rows_per_tile=96, interpret=True)


def test_rejects_empty_batch():
    with pytest.raises(ValueError, match=r"at least one sequence.*\(0, 4\)"):
        pallas_kernels.ragged_paged_attention(
            **ragged_inputs(block_tables=jnp.zeros((0, P), jnp.int32), kv_lens=jnp.zeros((0,), jnp.int32),
                            cu_q_lens=jnp.zeros((1,), jnp.int32)),
            scale=0.1, interpret=True,
        )
    with pytest.raises(ValueError, match=r"at least one sequence.*\(0, 8, 64\)"):
        pallas_kernels.paged_decode_attention(
            **decode_inputs(q=jnp.zeros((0, N, H), jnp.bfloat16), block_tables=jnp.zeros((0, P), jnp.int32),
                            context_lens=jnp.zeros((0,), jnp.int32)),
            scale=0.1, interpret=True,
        )
