"""Token sampling on device, per sequence, from arrays (no recompiles when settings change)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits: jax.Array, temperature: jax.Array, seeds: jax.Array, sample_index: jax.Array) -> jax.Array:
    """Picks one token per row of logits [B, V].

    temperature [B] (0 = greedy); each row's randomness depends only on its own seed and how many
    tokens it has sampled, so a request gives the same tokens whatever batch it lands in.
    Returns int32 [B].
    """
    greedy = jnp.argmax(logits, axis=-1)
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, sample_index)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    drawn = jax.vmap(jax.random.categorical)(keys, scaled)
    return jnp.where(temperature == 0, greedy, drawn).astype(jnp.int32)
