"""The Pallas W4A16/W8A16 matmul: interpret mode against a float64 numpy reference of the
unpacked weights (and the jnp reference), and cross-lowered for an H100 (the Triton custom call)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as pltriton

from jpaged.models.packed import PackedFormat, pack_ints, unpack
from kernel_cases import INTERPRET_MODES, lower_for_cuda
from pallas_kernels.packed_matmul import packed_matmul, packed_matmul_reference


def _case(bits, group, m, k, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2**bits, (n, k), dtype=np.uint8)
    scales = rng.uniform(-0.05, 0.05, (n, k // group)).astype(np.float32)
    mins = rng.uniform(-0.3, 0.3, (n, k // group)).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    return x, pack_ints(q, bits), scales, mins


# The interpreter takes seconds a case: each width and dtype once, not every combination.
@pytest.mark.parametrize("interpret", INTERPRET_MODES)
@pytest.mark.parametrize("bits,group,dtype,tol", [(4, 32, jnp.float32, 1e-5), (4, 128, jnp.bfloat16, 1e-2),
                                                  (8, 16, jnp.bfloat16, 1e-2), (8, 64, jnp.float32, 1e-5)])
def test_matches_float64_reference(bits, group, dtype, tol, interpret):
    x, qweight, scales, mins = _case(bits, group, m=5, k=256, n=80, dtype=dtype)  # M and N not block multiples
    y = packed_matmul(x, jnp.asarray(qweight), jnp.asarray(scales), jnp.asarray(mins), bits=bits,
                      group_size=group, interpret=interpret)
    w = unpack(qweight, scales, mins, PackedFormat(bits, group), np).astype(np.float64)  # [N, K]
    ref = np.asarray(x.astype(jnp.float32), np.float64) @ w.T
    got = np.asarray(y.astype(jnp.float32), np.float64)
    assert y.shape == (5, 80) and y.dtype == dtype
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < tol
    jnp_ref = packed_matmul_reference(x, jnp.asarray(qweight), jnp.asarray(scales), jnp.asarray(mins), bits=bits,
                                      group_size=group)
    assert np.linalg.norm(np.asarray(jnp_ref, np.float64) - ref) / np.linalg.norm(ref) < tol


def test_bad_inputs_are_refused_with_the_shapes():
    x, qweight, scales, mins = _case(4, 32, m=2, k=64, n=32, dtype=jnp.float32)
    with pytest.raises(ValueError, match="group_size 16 is not supported with 4 bits"):
        packed_matmul(x, qweight, scales, mins, bits=4, group_size=16)
    with pytest.raises(ValueError, match=r"qweight \(32, 32\)"):
        packed_matmul(x, qweight, scales, mins, bits=8, group_size=32)


@pytest.mark.parametrize("bits,group,m", [(4, 32, 1), (4, 128, 64), (8, 32, 16)])
def test_lowers_to_triton(bits, group, m):
    S = jax.ShapeDtypeStruct
    k, n = 4096, 1024
    args = (S((m, k), jnp.bfloat16), S((n, k * bits // 8), jnp.uint8), S((n, k // group), jnp.float32),
            S((n, k // group), jnp.float32))
    text = lower_for_cuda(functools.partial(packed_matmul, bits=bits, group_size=group), *args)
    assert pltriton.CUSTOM_CALL_TARGET_NAME in text


def test_model_linear_with_pallas_backend_lowers_to_triton():
    """The model's packed projection with linear backend "pallas" calls this kernel."""
    from flax import nnx

    from jpaged.models.llama import Linear

    layer = Linear(256, 96, bias=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), backend="pallas",
                   packed=PackedFormat(4, 32))
    text = lower_for_cuda(lambda x: layer(x), jax.ShapeDtypeStruct((3, 256), jnp.bfloat16))
    assert pltriton.CUSTOM_CALL_TARGET_NAME in text
