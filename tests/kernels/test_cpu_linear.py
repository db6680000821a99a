"""The C++ CPU linear kernel (pallas_kernels/cpu_linear.py) against a float64 numpy matmul."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.cpu_linear import PANEL, linear_cpu, pack_columns, unpack_columns
from tests.conftest import HAS_COMPILER

pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler to build the kernel")


def check(x: np.ndarray, w: np.ndarray):
    n = w.shape[1]
    y = jax.jit(lambda x, p: linear_cpu(x, p, n))(jnp.asarray(x), pack_columns(jnp.asarray(w)))
    ref = x.astype(np.float64) @ w.astype(np.float64)
    assert y.shape == ref.shape and y.dtype == jnp.float32
    # float32 sums of K products: error grows like sqrt(K) times the terms' size
    tol = 1e-5 * np.sqrt(x.shape[1]) * (np.abs(x).max(initial=1) * np.abs(w).max(initial=1))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=tol)


# (M, K, N): full 8-row blocks and every remainder 1-7 (AVX2: 6-row blocks, remainders 1-5), a
# partial last panel (N % 32 in 1..31; exactly 16, the AVX2 kernel's half panel), fewer columns
# than one panel, one column, many panels (shared over the threads)
@pytest.mark.parametrize("m,k,n", [(8, 64, 32), (64, 576, 960), (1, 576, 3072), (13, 100, 70), (7, 33, 31),
                                   (3, 5, 1), (29, 96, 1000), (512, 64, 96), (10, 7, 48)])
def test_matches_numpy(m, k, n):
    rng = np.random.default_rng(m * 1000 + n)
    check(rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32))


def test_random_shapes():
    rng = np.random.default_rng(7)
    for _ in range(12):
        m, k, n = int(rng.integers(1, 70)), int(rng.integers(1, 300)), int(rng.integers(1, 400))
        check(rng.uniform(-2, 2, (m, k)).astype(np.float32), rng.uniform(-2, 2, (k, n)).astype(np.float32))


def test_leading_dims_and_empty_rows():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 40)).astype(np.float32)
    w = rng.standard_normal((40, 50)).astype(np.float32)
    y = linear_cpu(jnp.asarray(x), pack_columns(jnp.asarray(w)), 50)
    np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-5, atol=1e-4)
    assert linear_cpu(jnp.zeros((0, 40)), pack_columns(jnp.asarray(w)), 50).shape == (0, 50)


def test_packing_layout_round_trips():
    w = jnp.arange(7 * 70, dtype=jnp.float32).reshape(7, 70)
    packed = pack_columns(w)
    assert packed.shape == (3, 7, PANEL)
    assert float(packed[1, 2, 5]) == float(w[2, PANEL + 5])  # panel 1 holds columns 32..63
    assert not np.asarray(packed[2, :, 70 - 2 * PANEL :]).any()  # zero past N
    np.testing.assert_array_equal(np.asarray(unpack_columns(packed, 70)), np.asarray(w))


def test_bad_inputs_name_the_problem():
    w = pack_columns(jnp.ones((16, 40)))
    with pytest.raises(TypeError, match="float32"):
        linear_cpu(jnp.ones((2, 16), jnp.bfloat16), w, 40)
    with pytest.raises(ValueError, match="does not fit"):
        linear_cpu(jnp.ones((2, 17)), w, 40)
    with pytest.raises(ValueError, match="does not fit"):
        linear_cpu(jnp.ones((2, 16)), w, 80)
