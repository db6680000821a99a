"""The tiled XLA attention against the plain reference on randomized ragged batches."""

import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.models.xla_attention import ragged_paged_attention_xla
from pallas_kernels.reference import ragged_paged_attention_reference


def case(rng, q_lens, kv_extra, num_heads, num_kv_heads, head_dim=32, page_size=4, num_pages=96, pad_tokens=5):
    num_seqs = len(q_lens)
    kv_lens = np.array([q + e for q, e in zip(q_lens, kv_extra)], np.int32)
    pages_per_seq = int(-(-kv_lens.max() // page_size)) + 2  # wider than needed, as buckets are
    perm = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((num_seqs, pages_per_seq), np.int32)
    for b in range(num_seqs):
        need = -(-kv_lens[b] // page_size)
        tables[b, :need] = perm[: need]
        perm = perm[need:]
    k = rng.normal(size=(num_pages, page_size, num_kv_heads, head_dim)).astype(np.float32)
    v = rng.normal(size=k.shape).astype(np.float32)
    k[0] = v[0] = np.nan  # the null page must never be read into a result
    total = int(sum(q_lens))
    q = rng.normal(size=(total + pad_tokens, num_heads, head_dim)).astype(np.float32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return [jnp.asarray(x) for x in (q, k, v, tables, kv_lens, cu)]


def assert_matches_reference(args, window):
    ours = np.asarray(ragged_paged_attention_xla(*args, scale=0.3, sliding_window=window))
    # the reference clamps its gathers to valid pages; give it a NaN-free pool
    ref_args = list(args)
    ref_args[1] = jnp.nan_to_num(args[1])
    ref_args[2] = jnp.nan_to_num(args[2])
    ref = np.asarray(ragged_paged_attention_reference(*ref_args, scale=0.3, sliding_window=window))
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (8, 1)])
def test_matches_reference(seed, heads):
    rng = np.random.default_rng(seed)
    num_seqs = int(rng.integers(1, 7))
    q_lens = rng.choice([0, 1, 1, 3, 4, 5, 17, 33], size=num_seqs)
    kv_extra = rng.integers(0, 30, size=num_seqs)
    kv_extra[q_lens == 0] = np.maximum(kv_extra[q_lens == 0], 1)
    args = case(rng, q_lens, kv_extra, *heads)
    window = [None, 7][seed % 2]
    assert_matches_reference(args, window)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (8, 1)])
def test_decode_shaped_steps_match_reference(seed, heads):
    """At most one token per sequence on average (T <= B) takes the one-token-tile path."""
    rng = np.random.default_rng(100 + seed)
    num_seqs = int(rng.integers(4, 12))
    q_lens = rng.choice([0, 1, 1, 1, 2], size=num_seqs)
    kv_extra = rng.integers(0, 300, size=num_seqs)  # several loop spans
    kv_extra[q_lens == 0] = np.maximum(kv_extra[q_lens == 0], 1)
    pad = num_seqs - int(q_lens.sum())
    if pad < 0:
        q_lens[:] = 1
        pad = 0
    args = case(rng, q_lens, kv_extra, *heads, page_size=8, num_pages=512, pad_tokens=pad)
    assert args[0].shape[0] <= num_seqs
    window = [None, 40][seed % 2]
    assert_matches_reference(args, window)
