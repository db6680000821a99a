"""Owns the device state (parameters, KV pools) and the jitted step."""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from jpaged.models.attention import alloc_kv_pools
from jpaged.models.llama import CausalLM
from jpaged.runner.batch import BatchInputs
from jpaged.runner.sampler import sample


def _forward(graphdef, state, kv_caches, batch: BatchInputs):
    model = nnx.merge(graphdef, state)
    hidden, kv_caches = model(batch.token_ids, batch.positions, kv_caches, batch.meta)  # [T, D]
    return kv_caches, model.logits(hidden[batch.logits_indices])  # [B, V]


def _step(graphdef, state, kv_caches, batch: BatchInputs):
    kv_caches, logits = _forward(graphdef, state, kv_caches, batch)
    return kv_caches, sample(logits, batch.temperature, batch.seeds, batch.sample_index)


class ModelRunner:
    """Runs padded batches through one jitted function; the KV pools are donated and replaced each call."""

    def __init__(self, model: CausalLM, *, num_pages: int, page_size: int, kv_dtype):
        config = model.config
        self.graphdef, self.state = nnx.split(model)
        self.kv_caches = alloc_kv_pools(
            config.num_layers, num_pages, page_size, config.num_kv_heads, config.head_dim, kv_dtype
        )
        self._step = jax.jit(functools.partial(_step, self.graphdef), donate_argnums=(1,))
        self._logits = jax.jit(functools.partial(_forward, self.graphdef), donate_argnums=(1,))

    def step(self, batch: BatchInputs) -> np.ndarray:
        """Runs one step; returns int32 [B] sampled tokens (rows past the real sequences are padding)."""
        self.kv_caches, tokens = self._step(self.state, self.kv_caches, batch)
        return np.asarray(tokens)

    def logits(self, batch: BatchInputs) -> np.ndarray:
        """Like step, but returns float32 logits [B, V] at batch.logits_indices (tests, scoring)."""
        self.kv_caches, logits = self._logits(self.state, self.kv_caches, batch)
        return np.asarray(logits)
