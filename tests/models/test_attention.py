"""Every layer's KV pages in one pair of arrays: writes and reads stay within their layer."""

import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.models.attention import AttentionMetadata, alloc_kv_pools, write_and_attend, write_kv
from pallas_kernels.reference import ragged_paged_attention_reference
from tests.conftest import HAS_COMPILER

LAYERS, NP, L, K, H, N = 3, 4, 2, 1, 16, 2


def test_a_layers_write_lands_in_its_pages_and_padding_nowhere():
    k_pages, v_pages = alloc_kv_pools(LAYERS, NP, L, K, H, jnp.float32)
    assert k_pages.shape == (LAYERS * NP, L, K, H)
    k = jnp.arange(3 * K * H, dtype=jnp.float32).reshape(3, K, H) + 1
    slots = jnp.array([0 * L + 1, 3 * L + 0, NP * L], jnp.int32)  # page 0 offset 1, page 3 offset 0, padding
    new_k, new_v = write_kv(k_pages, v_pages, k, -k, slots, first_page=1 * NP, num_pages=NP)
    expected = np.zeros((LAYERS * NP, L, K, H), np.float32)
    expected[NP + 0, 1] = k[0]
    expected[NP + 3, 0] = k[1]  # the padding token (k[2]) is dropped: not layer 2's null page
    np.testing.assert_array_equal(np.asarray(new_k), expected)
    np.testing.assert_array_equal(np.asarray(new_v), -expected)


@pytest.mark.parametrize("backend", ["xla", "pallas", pytest.param(
    "cpu", marks=pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler"))])
@pytest.mark.parametrize("layer", [0, 2])
def test_attention_reads_only_its_layers_pages(backend, layer):
    """Pools full of other layers' values: layer `layer` attends exactly as over its own pool."""
    rng = np.random.default_rng(layer)
    k_pages = jnp.asarray(rng.standard_normal((LAYERS * NP, L, K, H)), jnp.float32)
    v_pages = jnp.asarray(rng.standard_normal((LAYERS * NP, L, K, H)), jnp.float32)
    # Two sequences: 3 tokens already cached + 1 new, and a 2-token prompt; one padding token.
    q = jnp.asarray(rng.standard_normal((4, N, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((4, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((4, K, H)), jnp.float32)
    meta = AttentionMetadata(
        slot_mapping=jnp.array([2 * L + 1, 3 * L + 0, 3 * L + 1, NP * L], jnp.int32),
        block_tables=jnp.array([[1, 2], [3, 0]], jnp.int32),
        kv_lens=jnp.array([4, 2], jnp.int32),
        cu_q_lens=jnp.array([0, 1, 3], jnp.int32),
    )
    out, (new_k, new_v) = write_and_attend(q, k, v, (k_pages, v_pages), meta, layer=layer, num_layers=LAYERS,
                                           scale=H**-0.5, backend=backend)
    own = slice(layer * NP, (layer + 1) * NP)
    others = np.ones(LAYERS * NP, bool)
    others[own] = False
    np.testing.assert_array_equal(np.asarray(new_k)[others], np.asarray(k_pages)[others])
    np.testing.assert_array_equal(np.asarray(new_v)[others], np.asarray(v_pages)[others])
    expected = ragged_paged_attention_reference(q, new_k[own], new_v[own], meta.block_tables, meta.kv_lens,
                                                meta.cu_q_lens, scale=H**-0.5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)
