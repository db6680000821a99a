"""Tensor parallelism on one JAX device mesh: the mesh, the sharding table, KV-head repetition,
the vocabulary-parallel top-k, the start-up report, and several processes (jax.distributed)."""

from jpaged.parallel.distributed import DistributedConfig, agree_min, initialize, is_multiprocess
from jpaged.parallel.kv_heads import kv_head_repeats, repeat_kv_heads, sharded_model_config
from jpaged.parallel.mesh import TP_AXIS, make_mesh, shard_map
from jpaged.parallel.report import bytes_on_device, describe
from jpaged.parallel.vocab import vocab_parallel_top_k
from jpaged.parallel.shardings import (
    HEADS_SPEC, KV_POOL_SPEC, PARAM_SPECS, logits_spec, param_shardings, param_spec, validate, vocab_parts,
)

__all__ = [
    "DistributedConfig", "agree_min", "initialize", "is_multiprocess",
    "HEADS_SPEC", "KV_POOL_SPEC", "PARAM_SPECS", "TP_AXIS", "bytes_on_device", "describe", "kv_head_repeats", "logits_spec", "make_mesh",
    "param_shardings", "param_spec", "repeat_kv_heads", "shard_map", "sharded_model_config", "validate",
    "vocab_parallel_top_k", "vocab_parts",
]
