"""HF AWQ and GPTQ int4 checkpoints -> jpaged's packed format (jpaged/models/packed.py), exactly.

Both store a linear layer's logical kernel w [K, N] (in, out) as 4-bit integers, eight to an
int32 word, with a float16 scale and an integer zero point per group of G inputs and output:

    w[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]

AWQ (AutoAWQ, version "gemm"): packed along outputs, in AWQ's interleaved order

    qweight int32 [K, N / 8]      nibble j (bits 4j..4j+3) of word c holds column 8c + AWQ_ORDER[j]
    qzeros  int32 [K / G, N / 8]  packed the same way; z as stored
    scales  fp16  [K / G, N]

GPTQ (AutoGPTQ / GPTQModel): weights packed along inputs, zero points along outputs

    qweight int32 [K / 8, N]      nibble j of row r holds input 8r + j
    qzeros  int32 [K / G, N / 8]  nibble j of word c holds column 8c + j, as z - 1 ("gptq", the
                                  v1 format on the hub; a stored 15 means z = 16) or z ("gptq_v2")
    scales  fp16  [K / G, N]
    g_idx   int32 [K]             each input's group; only k // G is read (no act-order reordering)

jpaged keeps one row per output with w = scale * q + min, so per group and output

    scales = float32(s)        mins = -z * float32(s)

and both are exact: z has at most 5 significant bits and an fp16 scale 11, so -z * s fits
float32's 24, and so does every scale * q + min = (q - z) * s (|q - z| <= 16). Unpacking thus
gives the exact (q - z) * s bit for bit; a float16 kernel computes that value rounded once to
float16. A group jpaged does not have (256, or -1: one group over all K inputs) becomes groups of
the largest size jpaged has that divides it, each with its group's scale and minimum repeated.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from convert.errors import ConversionError
from convert.packed_tensor import PackedTensor
from jpaged.models.packed import GROUP_SIZES, PackedFormat, pack_ints

BITS = 4
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Nibble j of a word sits at bits 4j..4j+3.
_SHIFTS = np.arange(0, 32, BITS, dtype=np.uint32)
# checkpoint_format -> what reading adds to a stored GPTQ zero point.
GPTQ_ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}
# A quantized module's tensors besides its qweight (g_idx: GPTQ's, optional).
PARTS = ("qweight", "qzeros", "scales", "g_idx")


@dataclasses.dataclass(frozen=True)
class QuantizedCheckpoint:
    """How an AWQ or GPTQ checkpoint stores its quantized linear layers."""

    method: str
    """"awq" or "gptq"."""
    group_size: int
    """Inputs sharing a scale and zero point: a multiple of 16, or -1 for all of a layer's inputs."""
    zero_offset: int
    """Added to every stored zero point: 1 for GPTQ's v1 format, else 0."""

    def tensors(self, names: list[str], read: Callable[[str], np.ndarray], *,
                packed: bool) -> Iterator[tuple[str, np.ndarray | PackedTensor]]:
        """(HF name, tensor) of a checkpoint's tensors `names`, read with `read`: each quantized
        module once, as `<module>.weight`, a PackedTensor (packed=True) or its float32 [out, in];
        every other tensor as it is."""
        present = set(names)
        for name in names:
            if not _is_part(name, present):
                yield name, read(name)
            elif name.endswith(".qweight"):
                module = name.removesuffix(".qweight")
                parts = {p: read(f"{module}.{p}") for p in PARTS if f"{module}.{p}" in present}
                tensor = self.to_packed(module, parts)
                yield f"{module}.weight", tensor if packed else tensor.to_float()

    def num_tensors(self, names: list[str]) -> int:
        """How many tensors `tensors` yields for these names."""
        present = set(names)
        return sum(1 for name in names if not _is_part(name, present) or name.endswith(".qweight"))

    def to_packed(self, module: str, parts: dict[str, np.ndarray]) -> PackedTensor:
        """One module's {qweight, qzeros, scales[, g_idx]} as jpaged's packed leaves, exactly."""
        for part in ("qzeros", "scales"):
            if part not in parts:
                raise ConversionError(f"quantized module {module} has a qweight but no {module}.{part}")
        scales = parts["scales"]
        if scales.dtype != np.float16 or scales.ndim != 2:
            raise ConversionError(f"{module}.scales is {scales.dtype} {tuple(scales.shape)}; "
                                  "expected float16 [in / group, out]")
        num_groups, n = scales.shape
        qweight = parts["qweight"]
        k = qweight.shape[0] * (1 if self.method == "awq" else 8)
        group = k if self.group_size == -1 else self.group_size
        if n % 8 or group % 16:
            raise ConversionError(f"{module}: {n} outputs in groups of {group} inputs cannot be read "
                                  "(outputs must be a multiple of 8, groups of 16)")
        expected = f"from {module}.scales {tuple(scales.shape)} in groups of {group}"
        _check(f"{module}.qzeros", parts["qzeros"], (num_groups, n // 8), "[in / group, out / 8]", expected)
        if self.method == "awq":
            _check(f"{module}.qweight", qweight, (num_groups * group, n // 8), "[in, out / 8]", expected)
            q = _unpack_columns(qweight, AWQ_ORDER).T  # [N, K]
            zeros = _unpack_columns(parts["qzeros"], AWQ_ORDER)  # [K/G, N]
        else:
            _check(f"{module}.qweight", qweight, (num_groups * group // 8, n), "[in / 8, out]", expected)
            _check_g_idx(module, parts.get("g_idx"), k, group)
            q = _nibbles(qweight).transpose(1, 0, 2).reshape(n, k)  # [K/8, N, 8] -> [N, K/8, 8] -> [N, K]
            zeros = _unpack_columns(parts["qzeros"], tuple(range(8)))  # [K/G, N]
        scale = scales.astype(np.float32).T  # [N, K/G]
        low = -(zeros.T.astype(np.float32) + self.zero_offset) * scale  # exact: see the module docstring
        fmt = PackedFormat(BITS, max(g for g in GROUP_SIZES if group % g == 0))
        repeat = group // fmt.group_size
        return PackedTensor({"qweight": pack_ints(q, BITS), "scales": np.repeat(scale, repeat, axis=1),
                             "mins": np.repeat(low, repeat, axis=1)}, fmt, self.method)


def _is_part(name: str, present: set[str]) -> bool:
    """Whether `name` is one of PARTS of a quantized module (one with a qweight)."""
    module, _, part = name.rpartition(".")
    return part in PARTS and f"{module}.qweight" in present


def _check(name: str, x: np.ndarray, shape: tuple[int, int], layout: str, expected: str) -> None:
    if x.dtype not in (np.int32, np.uint32) or tuple(x.shape) != shape:
        raise ConversionError(f"{name} is {x.dtype} {tuple(x.shape)}; expected int32 {layout} = {shape} {expected}")


def _check_g_idx(module: str, g_idx: np.ndarray | None, k: int, group: int) -> None:
    """Groups of consecutive inputs only: act-order checkpoints (desc_act) permute them."""
    if g_idx is not None and not np.array_equal(g_idx, np.arange(k) // group):
        raise ConversionError(f"{module}.g_idx is not input // group_size (act-order, desc_act=true); "
                              "only GPTQ checkpoints without act-order can be read")


def _nibbles(words: np.ndarray) -> np.ndarray:
    """int32 words [R, C] -> their nibbles [R, C, 8] uint8, nibble j (bits 4j..4j+3) at [..., j]."""
    w = np.ascontiguousarray(words).view(np.uint32)
    return ((w[..., None] >> _SHIFTS) & 0xF).astype(np.uint8)


def _unpack_columns(words: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
    """Words [R, C / 8] packed along columns, nibble j of word c holding column 8c + order[j],
    -> integers [R, C]."""
    nibbles = _nibbles(words)
    return nibbles[..., np.argsort(order)].reshape(words.shape[0], -1)


def read_quantization(hf_config: dict, folder: Path) -> QuantizedCheckpoint | None:
    """The quantization a checkpoint's config declares (config.json's quantization_config, or the
    quantize_config.json of AutoGPTQ before transformers read it), or None for a float checkpoint.
    Raises ConversionError naming the field it cannot read."""
    config, where = hf_config.get("quantization_config"), "quantization_config"
    legacy = folder / "quantize_config.json"
    if config is None and legacy.is_file():
        config, where = {"quant_method": "gptq", **json.loads(legacy.read_text())}, legacy.name
    if config is None:
        return None

    def refuse(field: str, value, expected: str) -> ConversionError:
        return ConversionError(f"{folder.name}: {where}.{field} is {json.dumps(value)}; {expected}")

    method = str(config.get("quant_method", "")).lower()
    if method not in ("awq", "gptq"):
        raise refuse("quant_method", config.get("quant_method"), "supported: awq, gptq")
    bits = config.get("bits", config.get("w_bit"))  # AutoAWQ's own quant_config says w_bit
    if bits != BITS:
        raise refuse("bits", bits, f"only 4-bit {method.upper()} is supported")
    group = config.get("group_size", config.get("q_group_size", 128))
    if not isinstance(group, int) or not (group == -1 or (group > 0 and group % 16 == 0)):
        raise refuse("group_size", group, "expected -1 or a multiple of 16")
    if method == "awq":
        if str(config.get("version", "gemm")).lower() != "gemm":
            raise refuse("version", config["version"], "only AWQ's gemm layout is supported")
        if not config.get("zero_point", True):
            raise refuse("zero_point", config["zero_point"], "only AWQ with zero points is supported")
        return QuantizedCheckpoint("awq", group, zero_offset=0)
    if config.get("is_marlin_format"):  # AutoGPTQ's Marlin repacking
        raise refuse("is_marlin_format", config["is_marlin_format"], "only GPTQ's own layout is supported")
    fmt = str(config.get("checkpoint_format", config.get("format", "gptq"))).lower()
    if fmt not in GPTQ_ZERO_OFFSETS:
        raise refuse("checkpoint_format", fmt, f"supported: {', '.join(GPTQ_ZERO_OFFSETS)}")
    return QuantizedCheckpoint("gptq", group, zero_offset=GPTQ_ZERO_OFFSETS[fmt])
