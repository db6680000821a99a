"""The C++ packed linear kernel against a float64 numpy reference of the unpacked weights, on
every code path this CPU can run (the portable one forced too); AVX-512 skips where the CPU lacks it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.models.packed import PackedFormat, pack_ints, unpack
from pallas_kernels.cpu_build import cpu_model, unavailable_reason
from pallas_kernels.cpu_linear_packed import join_panels, linear_cpu_packed, narrow_panels, pack_panels, supported_isas

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu" or unavailable_reason() is not None,
                                reason=f"needs the CPU kernels: {unavailable_reason()}")


def _isa(name):
    return pytest.param(name, marks=pytest.mark.skipif(
        name not in supported_isas(), reason=f"{cpu_model()} lacks {name}"))


K, N = 256, 80  # 80: two full panels of 32 and a partial one


def _case(bits, group, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2**bits, (N, K), dtype=np.uint8)
    scales = rng.uniform(-0.05, 0.05, (N, K // group)).astype(np.float32)
    mins = rng.uniform(-0.3, 0.3, (N, K // group)).astype(np.float32)
    return pack_ints(q, bits), scales, mins


@pytest.mark.parametrize("isa", [_isa("portable"), _isa("avx2"), _isa("avx512")])
@pytest.mark.parametrize("bits,group", [(4, 32), (8, 16), (4, 128)])
def test_matches_float64_reference(isa, bits, group):
    fmt = PackedFormat(bits, group)
    qweight, scales, mins = _case(bits, group)
    w = unpack(qweight, scales, mins, fmt, np).astype(np.float64).T  # [K, N]
    panels = jnp.asarray(join_panels(*pack_panels(jnp.asarray(qweight), jnp.asarray(scales), jnp.asarray(mins), bits)))
    run = jax.jit(lambda x, p: linear_cpu_packed(x, p, fmt, N, isa=isa))
    rng = np.random.default_rng(1)
    for m in (1, 4, 32, 256, 512):
        x = rng.standard_normal((m, K)).astype(np.float32)
        y = np.asarray(run(jnp.asarray(x), panels))
        np.testing.assert_allclose(y, x.astype(np.float64) @ w, rtol=1e-5, atol=2e-5 * np.sqrt(K), err_msg=f"M={m}")


def _narrowed_case(bits, half, symmetric):
    qweight, scales, mins = _case(bits, 32, seed=2)
    if half:
        scales[0, :4] = [6e-8, 1e-5, -3e-6, 0.0]  # float16 subnormals and zero
        scales = scales.astype(np.float16).astype(np.float32)
        mins = mins.astype(np.float16).astype(np.float32)
    if symmetric:
        mins = np.float32(-(2 ** (bits - 1))) * scales
    return qweight, scales, mins


@pytest.mark.parametrize("isa", [_isa("portable"), _isa("avx2"), _isa("avx512")])
@pytest.mark.parametrize("bits,half,symmetric", [(4, True, False), (4, True, True), (8, True, True), (8, False, True)])
def test_narrowed_panels_match_float64_reference(isa, bits, half, symmetric):
    """float16 scales/mins and dropped symmetric mins (narrow_panels) compute the same weights."""
    fmt = PackedFormat(bits, 32)
    qweight, scales, mins = _narrowed_case(bits, half, symmetric)
    q, s32, m32 = pack_panels(jnp.asarray(qweight), jnp.asarray(scales), jnp.asarray(mins), bits)
    s, m = narrow_panels(s32, m32, bits)
    assert s.dtype == m.dtype == (np.float16 if half else np.float32)
    assert m.shape[1] == (0 if symmetric else s.shape[1])
    w = unpack(qweight, scales, mins, fmt, np).astype(np.float64).T
    panels = join_panels(q, s, m)
    assert panels.dtype == (np.uint16 if half else np.uint32)
    run = jax.jit(lambda x, p: linear_cpu_packed(x, p, fmt, N, isa=isa))
    rng = np.random.default_rng(3)
    for m_rows in (1, 4, 32):  # 32: the dequantize-then-multiply path
        x = rng.standard_normal((m_rows, K)).astype(np.float32)
        y = np.asarray(run(jnp.asarray(x), jnp.asarray(panels)))
        np.testing.assert_allclose(y, x.astype(np.float64) @ w, rtol=1e-5, atol=2e-5 * np.sqrt(K), err_msg=f"M={m_rows}")


def test_narrow_panels_keeps_what_is_not_exact():
    qweight, scales, mins = _case(4, 32)  # float32 values that float16 would round
    _, s32, m32 = pack_panels(jnp.asarray(qweight), jnp.asarray(scales), jnp.asarray(mins), 4)
    s, m = narrow_panels(s32, m32, 4)
    assert s.dtype == m.dtype == np.float32 and m.shape == m32.shape
    np.testing.assert_array_equal(s, s32)
    np.testing.assert_array_equal(m, m32)
    # One minimum off the symmetric value keeps them all.
    sym = np.float32(-8) * np.asarray(s32)
    sym[0, 0, 0] += 1.0
    assert narrow_panels(s32, jnp.asarray(sym), 4)[1].shape == m32.shape


def test_unsupported_isa_and_shapes_are_refused():
    fmt = PackedFormat(4, 32)
    panels = jnp.asarray(join_panels(*pack_panels(*(jnp.asarray(a) for a in _case(4, 32)), 4)))
    with pytest.raises(ValueError, match="isa 'sse9'"):
        linear_cpu_packed(jnp.ones((1, K)), panels, fmt, N, isa="sse9")
    with pytest.raises(ValueError, match="do not fit"):
        linear_cpu_packed(jnp.ones((1, K + 32)), panels, fmt, N)
    with pytest.raises(ValueError, match="do not fit"):  # a panel row one scale short
        linear_cpu_packed(jnp.ones((1, K)), panels[:, :-1], fmt, N)
    with pytest.raises(TypeError, match="uint32"):
        linear_cpu_packed(jnp.ones((1, K)), panels.view(jnp.float32), fmt, N)
