"""The runner's tensor-parallel forward step built from abstract shapes, for any mesh.

Used to lower the step for 8 abstract H100s (tests/kernels/test_kernel_lowering.py) and to
compile the same shapes for host devices (tests/parallel/tp_job.py), with no weight allocated:
parameters are ShapeDtypeStructs carrying jpaged.parallel's NamedShardings, and the jitted
function is the runner's own forward_step with its donation and output shardings.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jpaged import parallel
from jpaged.models.config import ModelConfig
from jpaged.models.params import abstract_params, build_model, flatten, unflatten
from jpaged.runner.batch import BucketSpec, dummy_batch
from jpaged.runner.model_runner import forward_step

CONFIGS = Path(__file__).parents[2] / "benchmarks" / "configs"


def llama3_8b(num_layers: int | None = None) -> ModelConfig:
    """Llama-3-8B's shapes (benchmarks/configs/llama-3-8b.json), optionally with fewer layers."""
    config = ModelConfig.from_hf_dict(json.loads((CONFIGS / "llama-3-8b.json").read_text()))
    return config if num_layers is None else dataclasses.replace(config, num_layers=num_layers)


def sharded_step(config: ModelConfig, mesh, *, dtype, backend: str, tokens: int = 64, seqs: int = 8,
                 pages_per_seq: int = 64, num_pages: int = 1024, page_size: int = 16):
    """(jitted forward step, its abstract (state, kv pools, batch)) split over mesh's "tp" axis."""
    tp = mesh.shape[parallel.TP_AXIS]
    run_config = parallel.sharded_model_config(config, tp)
    flat = flatten(abstract_params(run_config, dtype))
    params = unflatten({
        name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, parallel.param_spec(name, x.shape, tp)))
        for name, x in flat.items()
    })
    model = build_model(run_config, params, backend=backend, linear="xla", dtype=dtype, mesh=mesh)
    graphdef, state = nnx.split(model)
    spec = BucketSpec((tokens,), seqs, (pages_per_seq,), page_size, num_pages)
    replicated = NamedSharding(mesh, P())
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=replicated),
                         dummy_batch(spec, tokens, seqs, pages_per_seq))
    pool_sharding = NamedSharding(mesh, parallel.KV_POOL_SPEC)
    pool = jax.ShapeDtypeStruct((run_config.num_layers * num_pages, page_size, run_config.num_kv_heads,
                                 run_config.head_dim), dtype, sharding=pool_sharding)  # every layer's pages
    kv = (pool, pool)
    logits = NamedSharding(mesh, parallel.logits_spec(run_config.vocab_size, tp))
    step = jax.jit(functools.partial(forward_step, graphdef), donate_argnums=(1,),
                   out_shardings=((pool_sharding, pool_sharding), logits))
    return step, (state, kv, batch)


def weight_shardings(config: ModelConfig, tp: int) -> dict[str, P]:
    """{dotted name: PartitionSpec} the table gives the KV-repeated model's parameters."""
    run_config = parallel.sharded_model_config(config, tp)
    return {name: parallel.param_spec(name, x.shape, tp) for name, x in flatten(abstract_params(run_config)).items()}
