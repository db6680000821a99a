"""The packed format's arithmetic: round-to-nearest bounds, the XLA unpack + dot, packed row lookup."""

import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.models.packed import PackedFormat, pack_ints, packed_matmul_xla, packed_rows, quantize_rtn, unpack, unpack_ints


def test_pack_ints_round_trips():
    q = np.random.default_rng(0).integers(0, 16, (3, 64), dtype=np.uint8)
    np.testing.assert_array_equal(unpack_ints(pack_ints(q, 4), 4, np), q)
    np.testing.assert_array_equal(unpack_ints(jnp.asarray(pack_ints(q, 4)), 4), q)


@pytest.mark.parametrize("bits,group,symmetric", [(8, 32, True), (4, 32, False), (4, 128, False)])
def test_rtn_error_within_half_a_step_per_group(bits, group, symmetric):
    rng = np.random.default_rng(bits + group)
    w = (rng.standard_normal((256, 48)) * rng.uniform(0.01, 1, (1, 48))).astype(np.float32)  # [K, N]
    leaves = quantize_rtn(w, bits, group, symmetric=symmetric)
    fmt = PackedFormat(bits, group)
    got = unpack(leaves["qweight"], leaves["scales"], leaves["mins"], fmt, np)  # [N, K]
    err = np.abs(got.T.astype(np.float64) - w).reshape(256 // group, group, 48)
    bound = leaves["scales"].T[:, None, :] / 2  # [K/G, 1, N]
    assert (err <= bound * (1 + 1e-5) + 1e-7).all()
    if symmetric:  # zero is a grid point: a zero weight stays exactly zero
        w[:group, 0] = 0
        z = quantize_rtn(w, bits, group, symmetric=True)
        assert (unpack(z["qweight"], z["scales"], z["mins"], fmt, np)[0, :group] == 0).all()


def _random_packed(bits, group, n, k, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2**bits, (n, k), dtype=np.uint8)
    scales = rng.uniform(-0.1, 0.1, (n, k // group)).astype(np.float32)
    mins = rng.uniform(-0.5, 0.5, (n, k // group)).astype(np.float32)
    return pack_ints(q, bits), scales, mins


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 16), (4, 64), (8, 128)])
def test_xla_packed_matmul_matches_float64(bits, group):
    fmt = PackedFormat(bits, group)
    qweight, scales, mins = _random_packed(bits, group, 40, 256)
    w = unpack(qweight, scales, mins, fmt, np).astype(np.float64)  # [N, K]
    x = np.random.default_rng(1).standard_normal((5, 256)).astype(np.float32)
    y = packed_matmul_xla(jnp.asarray(x), jnp.asarray(qweight), jnp.asarray(scales), jnp.asarray(mins), fmt)
    np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-4)


def test_packed_rows_are_the_unpacked_table_rows():
    fmt = PackedFormat(8, 32)
    qweight, scales, mins = _random_packed(8, 32, 50, 64)
    ids = np.array([3, 0, 49, 3])
    got = packed_rows(jnp.asarray(qweight), jnp.asarray(scales), jnp.asarray(mins), fmt, jnp.asarray(ids), jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), unpack(qweight, scales, mins, fmt, np)[ids])


def test_format_validation():
    with pytest.raises(ValueError, match="bits must be one of"):
        PackedFormat(3, 32)
    with pytest.raises(ValueError, match="group_size must be one of"):
        PackedFormat(4, 48)
    with pytest.raises(ValueError, match="input size 40 is not a multiple of group_size 32"):
        PackedFormat(4, 32).shapes(40, 8)
