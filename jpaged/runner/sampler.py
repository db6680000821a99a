"""Token sampling on device, per sequence, from arrays (changing settings never recompiles).

Order, as in vLLM: penalties on the raw logits, temperature, then top-k / top-p / min-p
filtering, then a draw from each row's own random stream. Log-probabilities are those of the
raw model distribution.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

MAX_LOGPROBS = 20  # top alternatives computed every step; requests ask for 0..20


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """Per-sequence settings, padded to the step's B bucket."""

    temperature: jax.Array  # float32 [B]; 0 = greedy
    top_k: jax.Array  # int32 [B]; 0 = off
    top_p: jax.Array  # float32 [B]; 1 = off
    min_p: jax.Array  # float32 [B]; 0 = off
    presence_penalty: jax.Array  # float32 [B]
    frequency_penalty: jax.Array  # float32 [B]
    repetition_penalty: jax.Array  # float32 [B]; 1 = off
    seeds: jax.Array  # uint32 [B]
    sample_index: jax.Array  # int32 [B] tokens sampled so far: the position in the random stream
    history: jax.Array  # int32 [B, max_model_len] prompt + output tokens so far; -1 past the end
    prompt_lens: jax.Array  # int32 [B]; history[:, :prompt_len] is the prompt
    num_logprobs: jax.Array  # int32 [B]; -1 = the request wants no log-probabilities


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    token_ids: jax.Array  # int32 [B]
    logprobs: jax.Array  # float32 [B] of the sampled tokens
    top_ids: jax.Array  # int32 [B, MAX_LOGPROBS]
    top_logprobs: jax.Array  # float32 [B, MAX_LOGPROBS]


def _apply_penalties(logits: jax.Array, s: SamplingArrays) -> jax.Array:
    batch, vocab = logits.shape
    pos = jnp.arange(s.history.shape[1])
    valid = s.history >= 0
    is_output = valid & (pos[None, :] >= s.prompt_lens[:, None])
    rows = jnp.arange(batch)[:, None]
    ids = jnp.where(valid, s.history, vocab)  # out-of-range ids are dropped by the scatter
    out_counts = jnp.zeros((batch, vocab), jnp.float32).at[rows, ids].add(is_output.astype(jnp.float32), mode="drop")
    seen = jnp.zeros((batch, vocab), jnp.bool_).at[rows, ids].set(True, mode="drop")
    rep = s.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - s.frequency_penalty[:, None] * out_counts
    return logits - s.presence_penalty[:, None] * (out_counts > 0)


def _filter(logits: jax.Array, s: SamplingArrays) -> jax.Array:
    """Top-k, top-p and min-p as masks over one descending sort of each row."""
    vocab = logits.shape[-1]
    sorted_logits = -jnp.sort(-logits, axis=-1)  # [B, V] descending
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < s.top_p[:, None]
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    min_p_cut = sorted_logits[:, :1] + jnp.log(jnp.maximum(s.min_p[:, None], 1e-38))
    threshold = jnp.maximum(jnp.maximum(kth, cutoff), jnp.where(s.min_p[:, None] > 0, min_p_cut, -jnp.inf))
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample(logits: jax.Array, s: SamplingArrays) -> SamplerOutput:
    """Picks one token per row of float32 logits [B, V]; returns ids and log-probabilities."""
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
    needs_penalty = jnp.any((s.presence_penalty != 0) | (s.frequency_penalty != 0) | (s.repetition_penalty != 1))
    logits = jax.lax.cond(needs_penalty, _apply_penalties, lambda x, _: x, logits, s)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits):
        scaled = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
        needs_filter = jnp.any((s.top_k > 0) | (s.top_p < 1) | (s.min_p > 0))
        scaled = jax.lax.cond(needs_filter, _filter, lambda x, _: x, scaled, s)
        keys = jax.vmap(lambda seed, i: jax.random.fold_in(jax.random.key(seed), i))(s.seeds, s.sample_index)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(s.temperature == 0, greedy, drawn)

    # An all-greedy batch skips the random draw entirely.
    token_ids = jax.lax.cond(jnp.all(s.temperature == 0), lambda x: greedy, draw, logits)
    chosen = jnp.take_along_axis(raw_logprobs, token_ids[:, None], axis=-1)[:, 0]

    def top(lp):
        values, ids = jax.lax.top_k(lp, MAX_LOGPROBS)
        return values, ids.astype(jnp.int32)

    def no_top(lp):
        return jnp.zeros((lp.shape[0], MAX_LOGPROBS), lp.dtype), jnp.zeros((lp.shape[0], MAX_LOGPROBS), jnp.int32)

    # A top-k over the whole vocabulary is a noticeable part of a small model's step on CPU.
    top_logprobs, top_ids = jax.lax.cond(jnp.any(s.num_logprobs >= 0), top, no_top, raw_logprobs)
    return SamplerOutput(token_ids, chosen, top_ids, top_logprobs)
