"""Owns the device state (parameters, KV pools) and the jitted step."""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

from jpaged.models.attention import alloc_kv_pools
from jpaged.models.llama import CausalLM
from jpaged.runner.batch import BatchInputs, BucketSpec, dummy_batch
from jpaged.runner.sampler import SamplerOutput, sample


class ModelRunner:
    """Runs padded batches through one jitted function; the KV pools are donated and replaced each call."""

    def __init__(self, model: CausalLM, spec: BucketSpec, *, kv_dtype):
        config = model.config
        self.spec = spec
        self.graphdef, self.state = nnx.split(model)
        self.kv_caches = alloc_kv_pools(
            config.num_layers, spec.num_pages, spec.page_size, config.num_kv_heads, config.head_dim, kv_dtype
        )
        # Python in a jitted function runs only while tracing: this counts compilations.
        self.num_compiles = 0
        # Two jitted functions: the model varies with (T, B, P), the sampler only with B, so
        # keeping them apart compiles the sampler a few times instead of once per model shape.
        # The logits stay on the device between them.
        self._forward = jax.jit(self._traced_forward, donate_argnums=(1,))
        self._sample = jax.jit(self._traced_sample)

    def _traced_forward(self, state, kv_caches, batch: BatchInputs):
        self.num_compiles += 1
        model = nnx.merge(self.graphdef, state)
        hidden, kv_caches = model(batch.token_ids, batch.positions, kv_caches, batch.meta)  # [T, D]
        return kv_caches, model.logits(hidden[batch.logits_indices])  # [B, V]

    def _traced_sample(self, logits, sampling):
        self.num_compiles += 1
        return sample(logits, sampling)

    def step(self, batch: BatchInputs) -> SamplerOutput:
        """Runs one step; returns the sampler's output as numpy arrays (rows past the real sequences are padding)."""
        self.kv_caches, logits = self._forward(self.state, self.kv_caches, batch)
        return jax.tree_util.tree_map(np.asarray, self._sample(logits, batch.sampling))

    def logits(self, batch: BatchInputs) -> np.ndarray:
        """Like step, but returns float32 logits [B, V] at batch.logits_indices (tests, scoring)."""
        self.kv_caches, logits = self._forward(self.state, self.kv_caches, batch)
        return np.asarray(logits)

    def warm_up(self) -> float:
        """Compiles every bucket shape by running it once; returns the seconds it took."""
        start = time.perf_counter()
        for t_pad, b_pad, p_pad in self.spec.shapes():
            self.step(dummy_batch(self.spec, t_pad, b_pad, p_pad))
        return time.perf_counter() - start
