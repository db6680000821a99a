"""GGUF block types -> jpaged's packed format (jpaged/models/packed.py), exactly.

Each decoder reads one type's blocks [num_blocks, block bytes] into integers q [num_blocks, B]
(B weights a block) in [0, 2**bits) and a float32 scale and minimum per group, such that
scale * q + min is bit-identical to gguf's dequantize:

    Q4_0  d * (q - 8)           -> 4 bits, g32: scale d, min -8d
    Q4_1  d * q + m             -> 4 bits, g32
    Q5_0  d * (q - 16)          -> 8 bits, g32 (5-bit values stored a byte each)
    Q5_1  d * q + m             -> 8 bits, g32
    Q8_0  d * q, q signed       -> 8 bits, g32: q + 128, min -128d
    Q4_K  d*sc * q - dmin*m     -> 4 bits, g32: super-block scales folded into per-group scales
    Q5_K  d*sc * q - dmin*m     -> 8 bits, g32
    Q6_K  d*sc * (q - 32)       -> 8 bits, g16

The products are exact in float32 (an f16 scale's 11 bits times at most 13 more), so moving a
constant into the minimum changes no bit. Other types (IQ*, Q2_K, Q3_K, ...) return None and
are dequantized to float as before.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from jpaged.models.packed import PackedFormat, pack_ints

QK_K = 256


def _f16(b: np.ndarray) -> np.ndarray:
    """[n, 2] bytes -> [n, 1] float32."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, span: int) -> np.ndarray:
    """[n, m] bytes -> [n, 2m]: per run of `span` bytes, its low nibbles then its high ones (ggml's order)."""
    n = qs.shape[0]
    qs = qs.reshape(n, -1, 1, span) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (qs & 0x0F).reshape(n, -1)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """[n, 4] bytes of one little-endian uint32 -> [n, count] of its bits 0..count-1."""
    bits = np.ascontiguousarray(qh).view(np.uint32).reshape(-1, 1) >> np.arange(count, dtype=np.uint32)
    return (bits & 1).astype(np.uint8)


def _q4_0(b):
    d, qs = _f16(b[:, :2]), _nibbles(b[:, 2:], 16)
    return qs, d, -8 * d


def _q4_1(b):
    return _nibbles(b[:, 4:], 16), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q5_0(b):
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 6:], 16) | (_high_bits(b[:, 2:6], 32) << 4)
    return q, d, -16 * d


def _q5_1(b):
    q = _nibbles(b[:, 8:], 16) | (_high_bits(b[:, 4:8], 32) << 4)
    return q, _f16(b[:, :2]), _f16(b[:, 2:4])


def _q8_0(b):
    d = _f16(b[:, :2])
    q = (np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return q, d, -128 * d


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and mins (ggml's get_scale_min_k4)."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_scale_min(b):
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    return d * sc, -(dmin * mn)  # [n, 8] each


def _q4_k(b):
    scale, low = _k_scale_min(b)
    return _nibbles(b[:, 16:], 32), scale, low


def _q5_k(b):
    scale, low = _k_scale_min(b)
    qh = b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    q = _nibbles(b[:, 48:], 32) | ((qh & 1).reshape(-1, QK_K) << 4)
    return q, scale, low


def _q6_k(b):
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    scale = _f16(b[:, 208:210]) * sc  # [n, 16]
    low = _nibbles(ql, 64).reshape(n, -1, 32)
    high = (qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 0x03
    q = low | (high.reshape(n, -1, 32) << 4)
    return q.reshape(n, QK_K), scale, -32 * scale


# type name -> (decoder, block size in weights, format)
DECODERS: dict[str, tuple[Callable, int, PackedFormat]] = {
    "Q4_0": (_q4_0, 32, PackedFormat(4, 32)),
    "Q4_1": (_q4_1, 32, PackedFormat(4, 32)),
    "Q5_0": (_q5_0, 32, PackedFormat(8, 32)),
    "Q5_1": (_q5_1, 32, PackedFormat(8, 32)),
    "Q8_0": (_q8_0, 32, PackedFormat(8, 32)),
    "Q4_K": (_q4_k, QK_K, PackedFormat(4, 32)),
    "Q5_K": (_q5_k, QK_K, PackedFormat(8, 32)),
    "Q6_K": (_q6_k, QK_K, PackedFormat(8, 16)),
}


def to_packed(data: np.ndarray, type_name: str) -> tuple[dict[str, np.ndarray], PackedFormat] | None:
    """A GGUF tensor's raw bytes [N, row bytes] (rows = outputs) -> ({qweight, scales, mins}, format),
    or None when the type has no exact packed form."""
    if type_name not in DECODERS:
        return None
    decode, block, fmt = DECODERS[type_name]
    data = np.asarray(data, np.uint8)
    data = data.reshape(-1, data.shape[-1])  # [N, row bytes]
    rows = data.shape[0]
    num_blocks = rows * (data.shape[-1] // _block_bytes(type_name))
    q, scale, low = decode(data.reshape(num_blocks, -1))
    k = num_blocks // rows * block
    return {
        "qweight": pack_ints(q.reshape(rows, k), fmt.bits),
        "scales": np.ascontiguousarray(scale, np.float32).reshape(rows, k // fmt.group_size),
        "mins": np.ascontiguousarray(low, np.float32).reshape(rows, k // fmt.group_size),
    }, fmt


def _block_bytes(type_name: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][1]
