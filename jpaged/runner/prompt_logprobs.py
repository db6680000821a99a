"""Log-probabilities of the prompt's own tokens (vLLM's `prompt_logprobs`), from the prefill chunks
that run anyway.

The forward program returns, besides the logits of each sequence's last token, the hidden states
of every token of the step, padded to the largest T bucket ([T_max, D]; a copy of ~T_max x D
values per step, which stays on the device). A step where some request asks for prompt
log-probabilities then runs one more program over them: the final norm and lm_head of every
token, a log-softmax, the log-probability of the prompt's next token, its rank in the vocabulary
and the top MAX_LOGPROBS.
It works ROWS tokens at a time (lax.map) and skips blocks where nobody asked (lax.cond), so the
cost is ~ROWS x D x V multiply-adds per block of asked-for tokens, memory ROWS x V, and one
program per engine whatever the step's shape.

    token position   0    1    2    3          prompt t0 t1 t2 t3, this chunk = positions 1..3
    target           t1   t2   t3   (none)     targets[i] = prompt[p + 1]; -1 where nobody asked
    logprob of       t1 | t0   t2 | t0 t1 ...  (the first prompt token has none: it is given)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpaged.runner.sampler import MAX_LOGPROBS

ROWS = 64  # tokens whose [ROWS, V] logits exist at once


@dataclasses.dataclass(frozen=True)
class PromptLogprobs:
    """One step's prompt log-probabilities, per flat token of the batch (numpy, host)."""

    target_logprobs: np.ndarray  # float32 [T] log p(targets[i] | tokens up to i); garbage where targets < 0
    # int32 [T] tokens at least as likely as targets[i] (itself included: 1 = the most likely), as vLLM
    target_ranks: np.ndarray
    top_ids: np.ndarray  # int32 [T, MAX_LOGPROBS]
    top_logprobs: np.ndarray  # float32 [T, MAX_LOGPROBS]


def prompt_targets(chunks, t_pad: int) -> np.ndarray:
    """int32 [t_pad] (t_pad: the largest T bucket): for each flat token of the step, the prompt token after it when its request
    asks for prompt log-probabilities and that token is in the prompt; else -1."""
    targets = np.full(t_pad, -1, np.int32)
    offset = 0
    for c in chunks:
        n = len(c.token_ids)
        if c.params.prompt_logprobs is not None:
            # Positions start .. start + n - 1 predict start + 1 .. start + n, kept while inside the prompt.
            end = min(c.start + n, c.num_prompt_tokens - 1)
            if end > c.start:
                targets[offset : offset + end - c.start] = c.history[c.start + 1 : end + 1]
        offset += n
    return targets


def prompt_logprobs_step(graphdef: nnx.GraphDef, state: nnx.State, hidden: jax.Array, targets: jax.Array):
    """hidden [T, D], targets int32 [T] -> PromptLogprobs' arrays (float32 [T], int32 [T], int32 [T, k],
    float32 [T, k]) with k = MAX_LOGPROBS."""
    model = nnx.merge(graphdef, state)
    t = hidden.shape[0]
    rows = ROWS if t % ROWS == 0 else t

    def compute(h, tgt):  # [rows, D], [rows]
        logp = jax.nn.log_softmax(model.logits(h), axis=-1)  # [rows, V]
        target = jnp.take_along_axis(logp, jnp.maximum(tgt, 0)[:, None], axis=-1)[:, 0]
        rank = jnp.sum(logp >= target[:, None], axis=-1, dtype=jnp.int32)
        values, ids = jax.lax.top_k(logp, MAX_LOGPROBS)
        return target, rank, ids.astype(jnp.int32), values

    def skip(h, tgt):
        return (jnp.zeros(rows, jnp.float32), jnp.zeros(rows, jnp.int32), jnp.zeros((rows, MAX_LOGPROBS), jnp.int32),
                jnp.zeros((rows, MAX_LOGPROBS), jnp.float32))

    def block(args):
        h, tgt = args
        return jax.lax.cond(jnp.any(tgt >= 0), compute, skip, h, tgt)

    target, rank, ids, values = jax.lax.map(block, (hidden.reshape(t // rows, rows, -1),
                                                    targets.reshape(t // rows, rows)))
    return target.reshape(t), rank.reshape(t), ids.reshape(t, MAX_LOGPROBS), values.reshape(t, MAX_LOGPROBS)


def entries(out: PromptLogprobs, targets: np.ndarray, offset: int, n: int,
            k: int) -> tuple[list[dict[int, float]], list[int]]:
    """The {token id: logprob} entries (the prompt's token, then the top k) of flat tokens offset..offset+n
    whose target is set, in order, and the prompt tokens' ranks; the per-token dicts are the API's
    shape, built only for requests that ask."""
    sl = slice(offset, offset + n)
    keep = targets[sl] >= 0
    tgt, lp = targets[sl][keep].tolist(), out.target_logprobs[sl][keep].tolist()
    top_ids, top_lps = out.top_ids[sl][keep, :k].tolist(), out.top_logprobs[sl][keep, :k].tolist()
    found = [{t: v, **dict(zip(i, l))} for t, v, i, l in zip(tgt, lp, top_ids, top_lps)]
    return found, out.target_ranks[sl][keep].tolist()
