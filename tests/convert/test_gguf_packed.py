"""GGUF block types -> packed format: unpacking must equal the gguf package's own dequantization."""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from convert.gguf_packed import DECODERS, to_packed
from jpaged.models.packed import unpack

# Byte offsets of each type's float16 block scales: random bytes there could be NaN or infinity.
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
              "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def _random_blocks(name: str, rows: int, k: int, rng) -> np.ndarray:
    """Every bit of every quant field random; only the f16 scales kept finite. [rows, row bytes]."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    data = rng.integers(0, 256, (rows * k // block, size), dtype=np.uint8)
    for offset in F16_FIELDS[name]:
        scales = (rng.standard_normal(len(data)) * 0.02).astype(np.float16)
        data[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, -1)


def _assert_identical(got: np.ndarray, ref: np.ndarray):
    """Bit-identical, except that d * (q - c) with q == c is -0.0 in gguf where d < 0 and +0.0 here
    (x + (-x) rounds to +0.0): the same value in every sum and product that follows."""
    ref = np.asarray(ref, np.float32)
    assert got.shape == ref.shape and got.dtype == np.float32
    nonzero = ref != 0
    np.testing.assert_array_equal(got[nonzero].view(np.uint32), ref[nonzero].view(np.uint32))
    np.testing.assert_array_equal(got[~nonzero], 0.0)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_hand_packed_blocks_unpack_exactly(name):
    rng = np.random.default_rng(len(name) + ord(name[1]))
    data = _random_blocks(name, rows=6, k=512, rng=rng)
    leaves, fmt = to_packed(data, name)
    assert leaves["qweight"].shape == (6, 512 * fmt.bits // 8)
    assert leaves["scales"].shape == leaves["mins"].shape == (6, 512 // fmt.group_size)
    got = unpack(leaves["qweight"], leaves["scales"], leaves["mins"], fmt, np)
    _assert_identical(got, dequantize(data, GGMLQuantizationType[name]))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_gguf_quantized_tensors_unpack_exactly(name):
    """gguf's own quantizer (it has one for these types) on Gaussian weights."""
    w = np.random.default_rng(1).standard_normal((5, 256)).astype(np.float32)
    data = quantize(w, GGMLQuantizationType[name])
    leaves, fmt = to_packed(data, name)
    got = unpack(leaves["qweight"], leaves["scales"], leaves["mins"], fmt, np)
    _assert_identical(got, dequantize(data, GGMLQuantizationType[name]))


def test_unmapped_types_have_no_packed_form():
    data = np.zeros((2, GGML_QUANT_SIZES[GGMLQuantizationType.Q2_K][1]), np.uint8)
    assert to_packed(data, "Q2_K") is None
    assert to_packed(data, "IQ4_NL") is None
