"""Rotary position embeddings in the HF layout (rotate halves, not interleaved pairs)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.models.config import ModelConfig


@functools.cache
def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """[H // 2] float32 inverse frequencies, with the config's rope scaling applied.

    Computed once on the host in float64 (then float32, as transformers does) so that every
    device call reuses the same constants.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = dict(config.rope_scaling)
    rope_type = config.rope_type
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_scaling(inv_freq, scaling)
    return inv_freq.astype(np.float32)


def _llama3_scaling(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly (transformers' _compute_llama3_parameters).
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin [T, 1, H/2] float32 of positions [T]'s angles: computed once a step for every layer.

    Materialized (optimization_barrier): left to XLA, each layer's rotation fused the cos and sin
    in and evaluated them per element of every head (profiled on 2 CPU cores: the rotations took
    ~22 ms of a ~370 ms 128-token prefill step, ~2 ms with the tables materialized).
    """
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, H/2]
    return jax.lax.optimization_barrier((jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [T, heads, H] by rope_tables' cos and sin [T, 1, H/2]; returns x's dtype."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
