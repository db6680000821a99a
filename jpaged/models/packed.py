"""Packed weights: group-wise 4- or 8-bit unsigned integers with a float scale and minimum per group.

A linear kernel of logical shape [K, N] (in, out) is held in GGUF's orientation, one row per
output column, groups of G consecutive inputs along the row:

    qweight [N, K * bits / 8] uint8   4 bits: byte j holds input 2j (low nibble) and 2j + 1 (high)
    scales  [N, K / G]        float32
    mins    [N, K / G]        float32
    w[k, n] = scales[n, k // G] * q[n, k] + mins[n, k // G]

Every GGUF block type we read maps onto this exactly (convert/gguf_packed.py): its products
scale * q have at most 24 significant bits, so float32 holds them exactly and the sum rounds as
gguf's own dequantization does. The embedding [V, D] is the same structure with N = V, K = D: a
token's row is a row of qweight, and a tied lm_head reads the embedding's packed rows as its kernel.

Parameter names: a packed module's `kernel` (or the model's `embed`) becomes three leaves,
`<module>.qweight`, `<module>.scales`, `<module>.mins`; the manifest's "quantization" maps each
module path to its PackedFormat.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

BITS = (4, 8)
GROUP_SIZES = (16, 32, 64, 128)
LEAVES = ("qweight", "scales", "mins")


@dataclasses.dataclass(frozen=True)
class PackedFormat:
    bits: int
    """Bits per stored integer: 4 (two a byte) or 8."""
    group_size: int
    """Inputs sharing one scale and minimum: 16, 32, 64 or 128."""

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits!r}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {self.group_size!r}")

    @property
    def name(self) -> str:
        return f"int{self.bits}-g{self.group_size}"

    def shapes(self, k: int, n: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{leaf: (shape, dtype)} of a logical [K, N] kernel. K must be a multiple of the group."""
        if k % self.group_size:
            raise ValueError(f"input size {k} is not a multiple of group_size {self.group_size}")
        return {
            "qweight": ((n, k * self.bits // 8), np.dtype(np.uint8)),
            "scales": ((n, k // self.group_size), np.dtype(np.float32)),
            "mins": ((n, k // self.group_size), np.dtype(np.float32)),
        }

    def nbytes(self, k: int, n: int) -> int:
        return sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in self.shapes(k, n).values())

    def to_json(self) -> dict[str, int]:
        return {"bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_json(cls, d: dict) -> "PackedFormat":
        return cls(bits=int(d["bits"]), group_size=int(d["group_size"]))


# Module path ("layers.0.attn.q_proj", "embed", "lm_head") -> its packed format; absent: float.
Quantization = dict[str, PackedFormat]


def pack_ints(q: np.ndarray, bits: int) -> np.ndarray:
    """q [N, K] integers in [0, 2**bits) -> qweight [N, K * bits / 8] uint8."""
    q = np.asarray(q, np.uint8)
    if bits == 8:
        return q
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)


def unpack_ints(qweight, bits: int, xp=jnp):
    """qweight [..., K * bits / 8] uint8 -> q [..., K] uint8 (numpy with xp=np)."""
    if bits == 8:
        return qweight
    low, high = qweight & 0x0F, qweight >> 4
    return xp.stack([low, high], axis=-1).reshape(*qweight.shape[:-1], qweight.shape[-1] * 2)


def unpack(qweight, scales, mins, fmt: PackedFormat, xp=jnp):
    """The float32 weights in GGUF orientation: [..., N, K] (rows of the logical [K, N] kernel's transpose)."""
    q = unpack_ints(qweight, fmt.bits, xp).astype(xp.float32)  # [..., N, K]
    grouped = q.reshape(*q.shape[:-1], -1, fmt.group_size)  # [..., N, K/G, G]
    w = grouped * scales[..., None] + mins[..., None]
    return w.reshape(q.shape)


def unpack_kernel(leaves: dict, fmt: PackedFormat, xp=np):
    """The logical float32 kernel [K, N] of a packed module's leaves {qweight, scales, mins}."""
    return unpack(leaves["qweight"], leaves["scales"], leaves["mins"], fmt, xp).T


def packed_matmul_xla(x: jax.Array, qweight: jax.Array, scales: jax.Array, mins: jax.Array,
                      fmt: PackedFormat) -> jax.Array:
    """x [..., K] @ w [K, N] with w packed ([N, ...] leaves) -> [..., N] in x's dtype.

    Unpacked inside the jitted step (XLA fuses the unpack into the dot's operand where it can);
    the float weights never exist outside it.
    """
    w = unpack(qweight, scales, mins, fmt).astype(x.dtype)  # [N, K]
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))


def packed_rows(qweight: jax.Array, scales: jax.Array, mins: jax.Array, fmt: PackedFormat,
                ids: jax.Array, dtype) -> jax.Array:
    """Rows `ids` [T] of a packed [V, D] table (the embedding) as floats [T, D]."""
    return unpack(qweight[ids], scales[ids], mins[ids], fmt).astype(dtype)


def quantize_rtn(w: np.ndarray, bits: int, group_size: int, *, symmetric: bool) -> dict[str, np.ndarray]:
    """Round-to-nearest group quantization of a float kernel w [K, N] -> packed leaves.

    symmetric (int8): scale = max|w| / (2**(bits-1) - 1), q = round(w / scale) + 2**(bits-1), so
    zero stays exact; asymmetric (int4): scale = (max - min) / (2**bits - 1), minimum = min. Each
    weight is then within scale / 2 of its original (tests check this bound).
    """
    k, n = w.shape
    fmt = PackedFormat(bits, group_size)
    fmt.shapes(k, n)  # validates K
    rows = np.asarray(w, np.float64).T.reshape(n, k // group_size, group_size)  # [N, K/G, G]
    if symmetric:
        half = 2 ** (bits - 1)
        scale = np.abs(rows).max(axis=-1) / (half - 1)
        low = -half * scale
    else:
        low = rows.min(axis=-1)
        scale = (rows.max(axis=-1) - low) / (2**bits - 1)
    scale32, low32 = scale.astype(np.float32), low.astype(np.float32)
    safe = np.where(scale32 == 0, 1.0, scale32.astype(np.float64))[..., None]
    q = np.clip(np.rint((rows - low32[..., None]) / safe), 0, 2**bits - 1).astype(np.uint8)
    return {"qweight": pack_ints(q.reshape(n, k), bits), "scales": scale32, "mins": low32}
