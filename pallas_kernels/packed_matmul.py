"""W4A16 / W8A16 matmul for GPUs: y = x @ w with w packed (jpaged/models/packed.py), a Pallas
kernel lowered through Triton that unpacks each group of the weights in registers.

The packed leaves are qweight [N, K * bits / 8] uint8, scales and mins [N, K / G]. 4-bit bytes
hold inputs 2j (low nibble) and 2j + 1 (high), so the kernel splits the contraction into the
even and the odd inputs rather than interleaving nibbles in registers (which Triton has no op
for); the wrapper hands it x's even and odd columns:

    y = x[:, 0::2] @ w_low.T + x[:, 1::2] @ w_high.T,   w_low[n, j] = scale * (q[n, j] & 15) + min

One program computes a [BM, BN] block of y, looping over the K / G groups: per group one scale
and minimum per output row ([BN, 1]), a [BN, G / 2] slab of bytes unpacked twice (or [BN, G]
once for 8 bits), and one or two dots accumulated in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common


def _kernel(*refs, bits: int, group: int, num_groups: int, block_m: int, block_n: int):
    if bits == 4:
        x_even_ref, x_odd_ref, q_ref, s_ref, m_ref, o_ref = refs
    else:
        x_ref, q_ref, s_ref, m_ref, o_ref = refs
    i, j = pl.program_id(0), pl.program_id(1)
    rows, cols = pl.ds(i * block_m, block_m), pl.ds(j * block_n, block_n)
    width = group // 2 if bits == 4 else group  # bytes of one group in a row of q

    def dot(a, b):  # a [BM, W] @ b [BN, W].T in float32
        return lax.dot_general(a, b.astype(a.dtype), (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32, precision=_common.dot_precision(a.dtype))

    def body(g, acc):
        scale = s_ref[cols, pl.ds(g, 1)].astype(jnp.float32)  # [BN, 1]
        low = m_ref[cols, pl.ds(g, 1)].astype(jnp.float32)
        q = q_ref[cols, pl.ds(g * width, width)].astype(jnp.int32)  # [BN, W]
        if bits == 4:
            w_even = (q & 0xF).astype(jnp.float32) * scale + low
            w_odd = (q >> 4).astype(jnp.float32) * scale + low
            x_even = x_even_ref[rows, pl.ds(g * width, width)]
            x_odd = x_odd_ref[rows, pl.ds(g * width, width)]
            return acc + dot(x_even, w_even) + dot(x_odd, w_odd)
        w = q.astype(jnp.float32) * scale + low
        return acc + dot(x_ref[rows, pl.ds(g * width, width)], w)

    acc = lax.fori_loop(0, num_groups, body, jnp.zeros((block_m, block_n), jnp.float32))
    o_ref[rows, cols] = acc.astype(o_ref.dtype)


def packed_matmul_pallas(x: jax.Array, qweight: jax.Array, scales: jax.Array, mins: jax.Array, *, bits: int,
                         group_size: int, block_m: int = 16, block_n: int = 64, num_warps: int = 4,
                         num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """The pallas_call, with tuning knobs; inputs are not validated. x [M, K] -> [M, N] in x's dtype."""
    m, k = x.shape
    n = qweight.shape[0]
    mp, np_ = -(-m // block_m) * block_m, -(-n // block_n) * block_n
    x = jnp.pad(x, ((0, mp - m), (0, 0)))
    pad_n = ((0, np_ - n), (0, 0))
    qweight, scales, mins = jnp.pad(qweight, pad_n), jnp.pad(scales, pad_n), jnp.pad(mins, pad_n)
    xs = (x[:, 0::2], x[:, 1::2]) if bits == 4 else (x,)
    operands = (*xs, qweight, scales, mins)
    kernel = functools.partial(_kernel, bits=bits, group=group_size, num_groups=k // group_size,
                               block_m=block_m, block_n=block_n)
    out = pl.pallas_call(
        kernel,
        grid=(mp // block_m, np_ // block_n),
        in_specs=[_common.whole(a.shape) for a in operands],
        out_specs=_common.whole((mp, np_)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
        compiler_params=_common.compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"packed_matmul_w{bits}g{group_size}",
    )(*operands)
    return out[:m, :n]


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "interpret"))
def packed_matmul(x: jax.Array, qweight: jax.Array, scales: jax.Array, mins: jax.Array, *, bits: int,
                  group_size: int, interpret: bool = False) -> jax.Array:
    """x [M, K] @ w [K, N], w packed as qweight [N, K * bits / 8], scales and mins [N, K / G].

    Args:
      bits: 4 or 8. group_size: 16 (8 bits only: a 4-bit group must give Triton's dots >= 16
        inputs per half), 32, 64 or 128.
      interpret: run the kernel in the Pallas interpreter (CPU tests).
    """
    m, k = x.shape
    n = qweight.shape[0]
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if group_size not in (16, 32, 64, 128) or (bits == 4 and group_size < 32):
        raise ValueError(f"group_size {group_size} is not supported with {bits} bits")
    if k % group_size or qweight.shape != (n, k * bits // 8) or scales.shape != (n, k // group_size) \
            or mins.shape != scales.shape or qweight.dtype != jnp.uint8:
        raise ValueError(f"x {x.shape}, qweight {qweight.shape} {qweight.dtype}, scales {scales.shape}, "
                         f"mins {mins.shape} do not fit a {bits}-bit, group-{group_size} packed matmul")
    return packed_matmul_pallas(x, qweight, scales, mins, bits=bits, group_size=group_size, interpret=interpret)


def packed_matmul_reference(x: jax.Array, qweight: jax.Array, scales: jax.Array, mins: jax.Array, *, bits: int,
                            group_size: int) -> jax.Array:
    """Plain jnp: unpack to float32, then one dot (jpaged.models.packed's XLA path)."""
    q = qweight if bits == 8 else jnp.stack([qweight & 0xF, qweight >> 4], axis=-1).reshape(qweight.shape[0], -1)
    w = (q.astype(jnp.float32).reshape(q.shape[0], -1, group_size) * scales[..., None] + mins[..., None])
    w = w.reshape(q.shape)  # [N, K]
    return jnp.dot(x.astype(jnp.float32), w.T, precision=lax.Precision.HIGHEST).astype(x.dtype)
