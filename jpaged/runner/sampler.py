"""Token sampling on device, per sequence, from arrays (changing settings never recompiles).

Order, as in vLLM: the structured-output token bitmask first (so log-probabilities are those of
the masked distribution), then logit_bias, penalties, temperature, min-p and top-k filtering,
top-p on what they leave, then a draw from each row's own random stream (one uniform per
token, by inverse CDF). Log-probabilities are those of the model distribution after the mask,
before logit_bias, penalties and temperature. Nothing
here sorts the vocabulary: on a CPU a sort of [64, 49152] logits alone takes ~0.4 s.

With tensor parallelism the logits arrive split by vocabulary over the devices (the lm_head's
columns). Every step here but one is elementwise or a reduction over the vocabulary (max, sums,
the argmax as max + min of indices), which XLA partitions into per-device reductions and
all-reduces of [B] values; the bitmask is unpacked elementwise (each packed word broadcast to its
32 tokens), so each device unpacks only its own columns. The exceptions: lax.top_k, for which XLA all-gathers the whole
[B, V] first, so the top-k is a parameter and the runner passes jpaged.parallel's
vocabulary-parallel one (each device's top k, then the top k of the B x devices x k
candidates); and the inverse-CDF's blocks, sized to never straddle two devices' columns.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

MAX_LOGPROBS = 20  # top alternatives computed every step; requests ask for 0..20

# (x [B, V], k) -> (values [B, k] descending, int32 ids [B, k]; the lowest id first on ties)
TopK = Callable[[jax.Array, int], tuple[jax.Array, jax.Array]]


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
    # int32 [B, W], W = ceil(V / 32) (or fewer words: the tokens past them are allowed): bit t % 32
    # of word t // 32 allows token t; -1 (all bits) for unconstrained rows. jpaged.structured fills it.
    token_bitmask: jax.Array
    # logit_bias as fixed-width rows (K = MAX_LOGIT_BIAS), so any bias runs the same program;
    # padding entries are (id 0, bias 0.0), which add nothing.
    bias_ids: jax.Array  # int32 [B, K]
    bias_values: jax.Array  # float32 [B, K]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    token_ids: jax.Array  # int32 [B]
    logprobs: jax.Array  # float32 [B] of the sampled tokens; 0 when no row asked for log-probabilities
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


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """logits [B, V] with the tokens bitmask int32 [B, W] does not allow set to -inf.

    Elementwise in the vocabulary: word w's 32 bits become tokens 32w..32w+31 by a broadcast
    shift and a reshape, so with logits split by vocabulary over devices (the mask replicated)
    each device unpacks its own columns and nothing is exchanged.
    """
    batch, vocab = logits.shape
    width = bitmask.shape[1]
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [B, W, 32]
    allowed = bits.reshape(batch, width * 32) != 0  # [B, 32 W]
    if width * 32 < vocab:
        allowed = jnp.pad(allowed, ((0, 0), (0, vocab - width * 32)), constant_values=True)
    return jnp.where(allowed[:, :vocab], logits, -jnp.inf)


def fast_argmax(x: jax.Array) -> jax.Array:
    """argmax over the last axis (first index on ties) as two plain reductions: XLA's CPU argmax
    (a variadic reduce over value-index pairs) is 4x slower on a [64, 49152] batch of logits."""
    best = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == best, iota, x.shape[-1]), axis=-1).astype(jnp.int32)


def _ordered_key(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (negative floats flipped), for an exact bisection."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_key(key: jax.Array) -> jax.Array:
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _top_set_threshold(x: jax.Array, weights: jax.Array, limit: jax.Array) -> jax.Array:
    """Per row, the smallest t with sum(weights[x > t]) < limit: keeping x >= t keeps exactly the
    tokens whose heavier (strictly larger x) tokens weigh less than limit.

    With weights 1 and limit k that is the top k; with probabilities and limit top_p, the
    nucleus. A bisection over the 2^32 ordered float keys (32 masked sums) replaces a full sort
    of the vocabulary, which costs ~20x more on a CPU.
    """
    keys = _ordered_key(x)

    def body(_, bounds):
        lo, hi = bounds  # invariant: the answer lies in [lo, hi]
        mid = lo + (hi - lo) // 2
        heavier = jnp.sum(jnp.where(keys > mid[:, None], weights, 0.0), axis=-1)
        ok = heavier < limit
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo, hi = jnp.min(keys, axis=-1), jnp.max(keys, axis=-1)
    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return _from_key(lo)[:, None]


_CANDIDATES = 64  # top-k / top-p are read off this many largest logits when they suffice


def _filter(logits: jax.Array, s: SamplingArrays, top_k: TopK = jax.lax.top_k) -> jax.Array:
    """min-p, top-k, then top-p on what is left (renormalized), as in vLLM; dropped tokens get -inf.

    Both cuts are thresholds (a token stays if its logit is >= the cut, so ties stay together).
    They are read off the 64 largest logits when those decide them (top_k <= 64, a nucleus
    shorter than 64 tokens); other rows take an exact bisection over the whole vocabulary.
    """
    batch, vocab = logits.shape
    best = jnp.max(logits, axis=-1, keepdims=True)
    min_p_cut = jnp.where(s.min_p[:, None] > 0, best + jnp.log(jnp.maximum(s.min_p[:, None], 1e-38)), -jnp.inf)
    x = jnp.where(logits >= min_p_cut, logits, -jnp.inf)
    num_cand = min(_CANDIDATES, vocab)
    cand, _ = top_k(x, num_cand)  # [B, C] descending

    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, vocab), vocab)
    top_k_cut = jnp.take_along_axis(cand, jnp.clip(k - 1, 0, num_cand - 1)[:, None], axis=-1)
    top_k_cut = jax.lax.cond(
        jnp.any(k > num_cand) & jnp.any(s.top_k > 0),
        lambda c: jnp.where((k > num_cand)[:, None], _top_set_threshold(x, jnp.ones_like(x), k.astype(x.dtype)), c),
        lambda c: c, top_k_cut)
    top_k_cut = jnp.where(s.top_k[:, None] > 0, top_k_cut, -jnp.inf)
    x = jnp.where(x >= top_k_cut, x, -jnp.inf)

    def top_p(x):
        norm = jnp.sum(jnp.exp(x - best), axis=-1, keepdims=True)
        c = jnp.where(cand >= top_k_cut, cand, -jnp.inf)
        probs = jnp.exp(c - best) / norm  # [B, C]
        heavier = jnp.sum(jnp.where(c[:, :, None] > c[:, None, :], probs[:, :, None], 0.0), axis=1)  # [B, C]
        kept = heavier < s.top_p[:, None]
        cut = jnp.min(jnp.where(kept, c, jnp.inf), axis=-1, keepdims=True)
        # decided by the candidates unless the last one is kept and more tokens exist past it
        decided = ~kept[:, -1] | (jnp.sum(x > -jnp.inf, axis=-1) <= num_cand)
        cut = jax.lax.cond(
            jnp.any(~decided & (s.top_p < 1)),
            lambda cut: jnp.where(decided[:, None], cut, _top_set_threshold(x, jnp.exp(x - best) / norm, s.top_p)),
            lambda cut: cut, cut)
        return jnp.where((s.top_p[:, None] < 1) & (x < cut), -jnp.inf, x)

    return jax.lax.cond(jnp.any(s.top_p < 1), top_p, lambda x: x, x)


_CDF_BLOCK = 256


def cdf_block_size(vocab: int, vocab_parts: int = 1) -> int:
    """The inverse-CDF draw's block: 256 tokens, or with the vocabulary split into parts over
    devices the divisor of V / parts nearest 256, so that no block straddles two devices and
    the [B, V] -> [B, blocks, block] reshape stays on each device (with blocks that straddle,
    XLA all-gathers the whole [B, V] first: Llama-3's 128256 / 8 = 16032 is no multiple of 256)."""
    if vocab_parts == 1:
        return _CDF_BLOCK
    width = vocab // vocab_parts
    return min((d for d in range(1, width + 1) if width % d == 0), key=lambda d: (abs(d - _CDF_BLOCK), d))


def _inverse_cdf_draw(logits: jax.Array, u: jax.Array, block: int = _CDF_BLOCK) -> jax.Array:
    """One token per row of logits [B, V] (-inf = never), for uniforms u [B] in [0, 1).

    Inverse-CDF sampling in two levels (block sums, then one block) needs one random number per
    row; a Gumbel-max draw needs V of them, which costs more than the whole sampler on a CPU.
    """
    batch, vocab = logits.shape
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # [B, V]; 0 where -inf
    num_blocks = -(-vocab // block)
    if num_blocks * block != vocab:
        weights = jnp.pad(weights, ((0, 0), (0, num_blocks * block - vocab)))
    blocks = weights.reshape(batch, num_blocks, block)
    block_sums = blocks.sum(-1)  # [B, nb]
    block_cdf = jnp.cumsum(block_sums, axis=-1)
    target = u * block_cdf[:, -1]
    rows = jnp.arange(batch)
    last_block = num_blocks - 1 - fast_argmax((block_sums > 0)[:, ::-1].astype(jnp.int32))
    picked = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), last_block)  # first block past target
    inside = blocks[rows, picked]  # [B, block]
    cdf = block_cdf[rows, picked][:, None] - block_sums[rows, picked][:, None] + jnp.cumsum(inside, axis=-1)
    last = block - 1 - fast_argmax((inside > 0)[:, ::-1].astype(jnp.int32))
    offset = jnp.minimum(jnp.sum(cdf <= target[:, None], axis=-1), last)
    return (picked * block + offset).astype(jnp.int32)


def sample(logits: jax.Array, s: SamplingArrays, *, top_k: TopK = jax.lax.top_k, vocab_parts: int = 1) -> SamplerOutput:
    """Picks one token per row of float32 logits [B, V]; returns ids and log-probabilities.

    top_k computes every top-k here (lax.top_k, or a vocabulary-parallel equivalent);
    vocab_parts is how many equal parts the vocabulary is split into over devices (1: none).
    """
    # Constrained rows first; a batch without any skips the unpacking.
    logits = jax.lax.cond(jnp.any(s.token_bitmask != -1), apply_token_bitmask, lambda x, _: x, logits, s.token_bitmask)
    raw = logits
    rows = jnp.arange(logits.shape[0])[:, None]
    logits = jax.lax.cond(jnp.any(s.bias_values != 0), lambda x: x.at[rows, s.bias_ids].add(s.bias_values),
                          lambda x: x, logits)
    needs_penalty = jnp.any((s.presence_penalty != 0) | (s.frequency_penalty != 0) | (s.repetition_penalty != 1))
    logits = jax.lax.cond(needs_penalty, _apply_penalties, lambda x, _: x, logits, s)
    greedy = fast_argmax(logits)

    def draw(logits):
        scaled = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
        needs_filter = jnp.any((s.top_k > 0) | (s.top_p < 1) | (s.min_p > 0))
        scaled = jax.lax.cond(needs_filter, lambda x, s: _filter(x, s, top_k), lambda x, _: x, scaled, s)
        keys = jax.vmap(lambda seed, i: jax.random.fold_in(jax.random.key(seed), i))(s.seeds, s.sample_index)
        u = jax.vmap(jax.random.uniform)(keys)  # [B] in [0, 1)
        return jnp.where(s.temperature == 0, greedy, _inverse_cdf_draw(scaled, u, cdf_block_size(logits.shape[1], vocab_parts)))

    # An all-greedy batch skips the random draw entirely.
    token_ids = jax.lax.cond(jnp.all(s.temperature == 0), lambda x: greedy, draw, logits)

    def with_logprobs(raw):
        log_norm = jax.nn.logsumexp(raw, axis=-1)
        chosen = jnp.take_along_axis(raw, token_ids[:, None], axis=-1)[:, 0] - log_norm
        values, ids = top_k(raw, MAX_LOGPROBS)
        return chosen, values - log_norm[:, None], ids.astype(jnp.int32)

    def without(raw):
        batch = raw.shape[0]
        return (jnp.zeros((batch,), raw.dtype), jnp.zeros((batch, MAX_LOGPROBS), raw.dtype),
                jnp.zeros((batch, MAX_LOGPROBS), jnp.int32))

    # A top-k or a logsumexp over the whole vocabulary is a noticeable part of a small model's
    # step on CPU: a batch where no request asks for log-probabilities gets zeros.
    chosen, top_logprobs, top_ids = jax.lax.cond(jnp.any(s.num_logprobs >= 0), with_logprobs, without, raw)
    return SamplerOutput(token_ids, chosen, top_ids, top_logprobs)
