"""y = x @ w on CPUs with both cores: a C++ kernel (cpu/linear.cc) behind the XLA FFI, float32.

XLA:CPU runs the dots of a decode step (a few dozen rows against a large weight) on one core;
the kernel splits the weight's column panels over XLA's intra-op threads. It reads the weight
in a packed layout, made once at load time by `pack_columns`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.cpu_build import require

PANEL = 32  # columns per packed panel (cpu/linear.cc: kPanel)
_TARGET = "jpaged_linear_f32"


def pack_columns(w: jax.Array) -> jax.Array:
    """w [K, N] -> [ceil(N / PANEL), K, PANEL]: panel p holds columns p*PANEL.., zero past N."""
    k, n = w.shape
    panels = -(-n // PANEL)
    w = jnp.pad(w, ((0, 0), (0, panels * PANEL - n)))
    return w.reshape(k, panels, PANEL).transpose(1, 0, 2)


def unpack_columns(packed: jax.Array, n: int) -> jax.Array:
    """The inverse of pack_columns: [P, K, PANEL] -> [K, n]."""
    panels, k, _ = packed.shape
    return packed.transpose(1, 0, 2).reshape(k, panels * PANEL)[:, :n]


def linear_cpu(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    """x [..., K] @ w [K, n] with w given as pack_columns(w) [P, K, PANEL] -> [..., n], float32."""
    require("linear")
    if x.dtype != jnp.float32 or packed.dtype != jnp.float32:
        raise TypeError(f"the CPU linear kernel takes float32, not {x.dtype} x {packed.dtype}")
    if packed.ndim != 3 or packed.shape[2] != PANEL or packed.shape[1] != x.shape[-1] or -(-n // PANEL) != packed.shape[0]:
        raise ValueError(f"packed weight {packed.shape} does not fit x {x.shape} and n={n}")
    rows = x.reshape(-1, x.shape[-1])
    y = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32))(rows, packed)
    return y.reshape(*x.shape[:-1], n)
