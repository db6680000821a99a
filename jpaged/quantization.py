"""Quantization of whole parameter trees: the choices of `--quantization`, round-to-nearest
quantization of float kernels, and unpacking a packed checkpoint back to float.

A tree is flat here ({dotted name: host array}); `quant` maps module paths to PackedFormat
(jpaged/models/packed.py), as the checkpoint manifest records it.

    auto       keep the checkpoint as it is: a GGUF's packed tensors packed, float stays float
    none       float weights: packed tensors are unpacked at load (exactly gguf's values)
    int8       round-to-nearest, symmetric, 8 bits, groups of 32
    int4       round-to-nearest, asymmetric, 4 bits, groups of 32
    int4-g128  the same with groups of 128
"""

from __future__ import annotations

import collections
import re

import numpy as np

from jpaged.models.packed import LEAVES, PackedFormat, Quantization, quantize_rtn, unpack
CHOICES = ("auto", "none", "int8", "int4", "int4-g128")
# scheme -> (bits, group size, symmetric)
RTN_SCHEMES = {"int8": (8, 32, True), "int4": (4, 32, False), "int4-g128": (4, 128, False)}
# What RTN quantizes: the layers' projections. Embeddings, norms and lm_head stay float (the
# logits are the most sensitive to rounding, and lm_head is what a tied model shares with the embedding).
_RTN_KERNEL = re.compile(r"layers\.\d+\.(attn|mlp)\.\w+_proj\.kernel")


def check_choice(quantization: str) -> None:
    if quantization not in CHOICES:
        raise ValueError(f"quantization must be one of {'|'.join(CHOICES)}, got {quantization!r}")


def quant_from_json(d: dict | None) -> Quantization:
    return {path: PackedFormat.from_json(fmt) for path, fmt in (d or {}).items()}


def quant_to_json(quant: Quantization) -> dict:
    return {path: fmt.to_json() for path, fmt in sorted(quant.items())}


def packed_module(name: str) -> tuple[str, str] | None:
    """"layers.0.attn.q_proj.qweight" -> ("layers.0.attn.q_proj", "qweight"); None for a float leaf."""
    module, _, leaf = name.rpartition(".")
    return (module, leaf) if leaf in LEAVES else None


def float_name(module: str) -> str:
    """The float parameter a packed module stands for: its kernel, or the embedding itself."""
    return "embed" if module == "embed" else f"{module}.kernel"


def dequantize_flat(flat: dict[str, np.ndarray], quant: Quantization) -> dict[str, np.ndarray]:
    """Packed leaves -> float32 parameters of the float tree (kernels [in, out], embed [V, D])."""
    out = {name: x for name, x in flat.items() if packed_module(name) is None or packed_module(name)[0] not in quant}
    for module, fmt in quant.items():
        w = unpack(*(flat[f"{module}.{leaf}"] for leaf in LEAVES), fmt, np)  # [N, K]
        out[float_name(module)] = w if module == "embed" else np.ascontiguousarray(w.T)
    return out


def rtn_plan(shapes: dict[str, tuple[int, ...]], scheme: str) -> Quantization:
    """Which float kernels {name: shape} a round-to-nearest scheme packs, and how: the layers'
    projections whose input size the group divides."""
    bits, group, _ = RTN_SCHEMES[scheme]
    return {name.removesuffix(".kernel"): PackedFormat(bits, group)
            for name, shape in shapes.items() if _RTN_KERNEL.fullmatch(name) and shape[0] % group == 0}


def quantize_flat(flat: dict[str, np.ndarray], scheme: str) -> tuple[dict[str, np.ndarray], Quantization]:
    """Round-to-nearest quantization of the layers' float kernels; everything else as it was."""
    symmetric = RTN_SCHEMES[scheme][2]
    quant = rtn_plan({name: np.shape(x) for name, x in flat.items()}, scheme)
    out = {name: x for name, x in flat.items() if name.removesuffix(".kernel") not in quant}
    for module, fmt in quant.items():
        w = np.asarray(flat[float_name(module)], np.float32)
        out.update({f"{module}.{leaf}": v
                    for leaf, v in quantize_rtn(w, fmt.bits, fmt.group_size, symmetric=symmetric).items()})
    return out, quant


def describe(quant: Quantization) -> str:
    """"packed int4-g32 x 210, int8-g32 x 1" or "float"."""
    if not quant:
        return "float"
    counts = collections.Counter(fmt.name for fmt in quant.values())
    return "packed " + ", ".join(f"{name} x {n}" for name, n in sorted(counts.items()))


def weight_bytes(arrays) -> int:
    """Bytes of a tree's leaves (any objects with .nbytes or a shape and dtype)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in arrays)
