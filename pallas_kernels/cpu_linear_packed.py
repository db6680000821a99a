"""y = x @ w on CPUs with w packed (jpaged/models/packed.py): a C++ kernel (cpu/linear_packed.cc)
behind the XLA FFI that dequantizes in registers and accumulates in float32.

The checkpoint's packed leaves (rows = output columns) are rearranged once at load time by
`pack_panels` into column panels of 32, the layout the float kernel (cpu_linear.py) uses too,
then `narrow_panels` and `join_panels` make them one array of a panel's rows.
Which vector code runs is decided from the CPU's flags (`best_isa`), never assumed.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu_build import require

PANEL = 32  # columns per panel (cpu/linear_packed.cc: kPanel)
ISAS = {"portable": 1, "avx2": 2, "avx512": 3}
_TARGET = "jpaged_linear_packed_f32"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def supported_isas() -> list[str]:
    """The kernel's code paths this CPU can run, best last."""
    flags = _cpu_flags()
    isas = ["portable"]
    if {"avx2", "fma", "f16c"} <= flags:
        isas.append("avx2")
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        isas.append("avx512")
    return isas


@functools.cache
def best_isa() -> str:
    return supported_isas()[-1]


def pack_panels(qweight: jax.Array, scales: jax.Array, mins: jax.Array, bits: int):
    """Packed leaves [N, K*bits/8], [N, K/G], [N, K/G] -> the kernel's panels:
    q [P, K*bits/32, 32] uint32, word [o, c] holding column c's integers for k = o*per .. o*per + per - 1
    (per = 32 / bits; the i-th in bits [bits*i, bits*(i+1))), scales and mins [P, K/G, 32];
    P = ceil(N / 32), columns past N zero. One column's integers a 32-bit lane: the kernel
    unpacks with a shift and a mask inside each vector lane."""
    n = qweight.shape[0]
    panels = -(-n // PANEL)
    pad = ((0, panels * PANEL - n), (0, 0))
    per = 32 // bits
    q = jnp.stack([qweight & 0x0F, qweight >> 4], axis=-1).reshape(n, -1) if bits == 4 else qweight  # [N, K]
    q = q.astype(jnp.uint32).reshape(n, -1, per)  # [N, K/per, per]
    words = jnp.zeros(q.shape[:2], jnp.uint32)
    for i in range(per):
        words = words | (q[..., i] << (bits * i))
    words = jnp.pad(words, pad).reshape(panels, PANEL, -1).transpose(0, 2, 1)  # [P, K/per, 32]

    def per_group(t):
        return jnp.pad(t, pad).reshape(panels, PANEL, -1).transpose(0, 2, 1)  # [P, K/G, 32]

    return words, per_group(scales), per_group(mins)


def narrow_panels(scales: jax.Array, mins: jax.Array, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """pack_panels' float32 scales and mins [P, K/G, 32] in the fewest bytes that hold them exactly:
    float16 where every value survives the round trip (GGUF's Q4_0/Q4_1/Q5_x/Q8_0 store float16;
    K-quants' folded scales and AWQ/GPTQ's minimums need float32), and mins dropped ([P, 0, 32])
    where they are all -2**(bits-1) * scale (symmetric formats: Q4_0, Q8_0, int8 RTN, symmetric
    GPTQ), which the kernel computes exactly. At decode the kernel is bound by the bytes it
    reads: this takes a 4-bit weight from 0.75 bytes to 0.625 and Q8_0 from 1.25 to 1.06."""
    scales, mins = np.asarray(scales), np.asarray(mins)
    if np.array_equal(mins, np.float32(-(2 ** (bits - 1))) * scales):
        mins = mins[:, :0]
    with np.errstate(over="ignore"):
        half = all(np.array_equal(t.astype(np.float16).astype(np.float32), t) for t in (scales, mins))
    return (scales.astype(np.float16), mins.astype(np.float16)) if half else (scales, mins)


def join_panels(q: jax.Array, scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """pack_panels' q [P, K*bits/32, 32] uint32 and (narrow_panels') scales and mins [P, K/G or 0, 32]
    -> panels [P, X]: each panel's words, scales and minimums back to back, uint32 for float32
    scales, uint16 for float16. One array a projection: a step's dispatch costs per array, and
    a panel streams from one place."""
    scales, mins = np.asarray(scales), np.asarray(mins)
    unit = np.uint16 if scales.dtype == np.float16 else np.uint32
    parts = [np.asarray(q).view(unit), scales.view(unit), mins.view(unit)]
    return np.concatenate([t.reshape(t.shape[0], -1) for t in parts], axis=1)


def linear_cpu_packed(x: jax.Array, panels: jax.Array, fmt, n: int, *, isa: str | None = None) -> jax.Array:
    """x [..., K] @ w [K, n], w given as join_panels' panels [ceil(n / 32), X] -> [..., n] float32.

    isa: "portable", "avx2" or "avx512"; None picks the best this CPU has.
    """
    require("packed linear")
    isa = isa or best_isa()
    if isa not in supported_isas():
        raise ValueError(f"isa {isa!r} is not supported by this CPU (it has {', '.join(supported_isas())})")
    if x.dtype != jnp.float32:
        raise TypeError(f"the CPU packed linear kernel takes float32 activations, not {x.dtype}")
    if panels.dtype not in (jnp.uint32, jnp.uint16):
        raise TypeError(f"packed panels must be uint32 (float32 scales) or uint16 (float16 scales), not {panels.dtype}")
    k = x.shape[-1]
    q = k * fmt.bits // 32 * PANEL * 4 // panels.dtype.itemsize  # a panel's integers, in panels' elements
    sm = k // fmt.group_size * PANEL
    if k % fmt.group_size or panels.ndim != 2 or panels.shape[0] != -(-n // PANEL) or panels.shape[1] not in (q + sm, q + 2 * sm):
        raise ValueError(f"packed panels {panels.shape} do not fit x {x.shape}, n={n} and {fmt}")
    rows = x.reshape(-1, k)
    y = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32))(
        rows, panels, isa=np.int32(ISAS[isa]), bits=np.int32(fmt.bits), group_size=np.int32(fmt.group_size))
    return y.reshape(*x.shape[:-1], n)
