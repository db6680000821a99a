"""The start-up line of tensor parallelism: the mesh, and what each device holds."""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from jpaged.models.config import ModelConfig


def bytes_on_device(tree, device: jax.Device) -> int:
    """Bytes of a pytree of jax arrays that live on `device` (its shards only)."""
    return sum(shard.data.nbytes for x in jax.tree.leaves(tree) for shard in x.addressable_shards
               if shard.device == device)


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.2f} MiB"


def describe(mesh: Mesh, params, kv_pools, config: ModelConfig, run_config: ModelConfig, kv_capacity_tokens: int) -> str:
    """e.g. "tensor parallel: mesh {'tp': 4} over 4 gpu devices (NVIDIA H100); per device:
    weights 3.74 of 14.96 GiB, KV cache 2 of 8 KV heads = 9.10 GiB, 74,752 tokens"."""
    tp = mesh.shape["tp"]
    # This process's first device: with several processes the others' shards are not readable here.
    device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
    procs = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    repeated = "" if run_config.num_kv_heads == config.num_kv_heads else f" (repeated to {run_config.num_kv_heads})"
    return (
        f"tensor parallel: mesh {dict(mesh.shape)} over {tp} {device.platform} devices ({device.device_kind}){procs}; "
        f"per device: weights {_size(bytes_on_device(params, device))} of {_size(total)}, "
        f"KV cache {run_config.num_kv_heads // tp} of {config.num_kv_heads} KV heads{repeated} = "
        f"{_size(bytes_on_device(kv_pools, device))}, {kv_capacity_tokens:,} tokens"
    )
