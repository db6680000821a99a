"""KV heads repeated when there are fewer than devices, as vLLM does: the one place that knows.

With K < tp KV heads, each head's k/v projection columns (and biases) are repeated tp // K
times at load, so every device holds exactly one KV head and its pool one head's pages:

    original K=2, tp=4:  kv0       kv1
    repeated K'=4:       kv0 kv0   kv1 kv1        device d holds repeated head d = original d // (tp // K)

Query head h on device d = h // (N / tp) uses repeated head h // (N / K') = h // (N / tp), which
is original head h // (N / tp) // (tp / K) = h // (N / K): the GQA mapping is unchanged. The
model, its KV pools and their sizing all see sharded_model_config()'s K' heads.
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np

from jpaged.models.config import ModelConfig

_KV_PROJ = re.compile(r"layers\.\d+\.attn\.[kv]_proj\.(kernel|bias)")
# Packed k/v projections (jpaged.models.packed) hold one row per output column: heads on axis 0.
_KV_PACKED = re.compile(r"layers\.\d+\.attn\.[kv]_proj\.(qweight|scales|mins)")


def kv_head_repeats(config: ModelConfig, tensor_parallel_size: int) -> int:
    """How many copies of each KV head the model holds (1 when the heads split evenly)."""
    k = config.num_kv_heads
    return tensor_parallel_size // k if k < tensor_parallel_size else 1


def sharded_model_config(config: ModelConfig, tensor_parallel_size: int) -> ModelConfig:
    """The config the model and KV pools are built from: K' = K * repeats KV heads."""
    repeats = kv_head_repeats(config, tensor_parallel_size)
    return config if repeats == 1 else dataclasses.replace(config, num_kv_heads=config.num_kv_heads * repeats)


def repeat_kv_heads(name: str, x, config: ModelConfig, tensor_parallel_size: int):
    """A parameter with its KV heads repeated (k/v kernels [D, K*H] -> [D, K'*H], biases [K*H] ->
    [K'*H]); every other parameter as it is. numpy in, numpy out (host loads); jax in, jax out."""
    repeats = kv_head_repeats(config, tensor_parallel_size)
    xp = np if isinstance(x, np.ndarray) else jnp
    if repeats > 1 and _KV_PACKED.fullmatch(name):
        rows, *rest = x.shape
        heads = x.reshape(config.num_kv_heads, config.head_dim, *rest)  # [K, H, ...]
        return xp.repeat(heads, repeats, axis=0).reshape(rows * repeats, *rest)
    if repeats == 1 or not _KV_PROJ.fullmatch(name):
        return x
    *lead, cols = x.shape
    heads = x.reshape(*lead, config.num_kv_heads, config.head_dim)  # [..., K, H]
    return xp.repeat(heads, repeats, axis=-2).reshape(*lead, cols * repeats)  # [..., K'*H], copies adjacent
