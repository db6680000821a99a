"""The sampler against numpy references: filters, penalties, and draws that follow the distribution."""

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.runner.sampler import SamplingArrays, _apply_penalties, _filter, _inverse_cdf_draw, fast_argmax, sample

V = 40


def arrays(b, **kw):
    base = dict(
        temperature=np.ones(b, np.float32), top_k=np.zeros(b, np.int32), top_p=np.ones(b, np.float32),
        min_p=np.zeros(b, np.float32), presence_penalty=np.zeros(b, np.float32),
        frequency_penalty=np.zeros(b, np.float32), repetition_penalty=np.ones(b, np.float32),
        seeds=np.arange(b, dtype=np.uint32), sample_index=np.zeros(b, np.int32),
        history=np.full((b, 16), -1, np.int32), prompt_lens=np.zeros(b, np.int32),
        num_logprobs=np.full(b, -1, np.int32), token_bitmask=np.full((b, -(-V // 32)), -1, np.int32),
        bias_ids=np.zeros((b, 4), np.int32), bias_values=np.zeros((b, 4), np.float32),
    )
    base.update({k: np.asarray(v, base[k].dtype) for k, v in kw.items()})
    return SamplingArrays(**base)


def ref_keep(logits, k, p, min_p):
    """vLLM's order with a sort: min-p and top-k, then top-p over the renormalized survivors."""
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    keep = probs >= min_p * probs.max()
    if k:
        keep &= logits >= logits[order[k - 1]]  # ties with the k-th all stay
    if p < 1:
        kept = np.where(keep, probs, 0.0)
        kept /= kept.sum()
        mass_before = np.cumsum(kept[order]) - kept[order]
        # tokens tied with the nucleus's last one stay too (a threshold keeps every equal value)
        keep &= logits >= logits[order[mass_before < p]].min()
    return keep


def test_filter_masks_match_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, V)).astype(np.float32) * 3
    top_k, top_p, min_p = [0, 3, 0, 5, 2], [1.0, 1.0, 0.6, 0.9, 0.3], [0.0, 0.0, 0.0, 0.2, 0.1]
    out = np.asarray(_filter(jnp.asarray(logits), arrays(5, top_k=top_k, top_p=top_p, min_p=min_p)))
    for row in range(5):
        np.testing.assert_array_equal(np.isfinite(out[row]), ref_keep(logits[row], top_k[row], top_p[row], min_p[row]))


def test_filter_on_a_large_vocabulary_with_ties_and_negative_logits():
    rng = np.random.default_rng(5)
    b, v = 12, 3001
    logits = (rng.normal(size=(b, v)) * rng.uniform(0.5, 8, size=(b, 1)) - 20).astype(np.float32)
    logits[:, 100:140] = logits[:, :1] + 0.25  # a block of exact ties near the top
    top_k = rng.choice([0, 1, 7, 40, 41, 500, v + 5], size=b)
    top_p = rng.choice([1.0, 0.95, 0.5, 0.01, 0.999], size=b).astype(np.float32)
    min_p = rng.choice([0.0, 0.0, 0.05, 0.5], size=b).astype(np.float32)
    out = np.asarray(_filter(jnp.asarray(logits), arrays(b, top_k=top_k, top_p=top_p, min_p=min_p)))
    for row in range(b):
        expect = ref_keep(logits[row], min(top_k[row], v), top_p[row], min_p[row])
        np.testing.assert_array_equal(np.isfinite(out[row]), expect, err_msg=f"row {row}")


def test_fast_argmax_takes_the_first_maximum():
    rng = np.random.default_rng(6)
    x = rng.integers(-3, 4, size=(50, 333)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(np.asarray(fast_argmax(jnp.asarray(x))), x.argmax(-1))


def test_inverse_cdf_draw_is_exact_on_a_uniform_grid():
    """Deterministic u on a fine grid: each token is drawn in proportion to its probability, masked ones never."""
    rng = np.random.default_rng(7)
    v, n = 700, 20000  # 700: the last CDF block is partial
    row = rng.normal(size=v).astype(np.float32) * 2
    row[rng.choice(v, 300, replace=False)] = -np.inf
    row[690:] = -np.inf  # trailing masked tokens: u near 1 must not land on them
    u = (np.arange(n) + 0.5) / n
    ids = np.asarray(_inverse_cdf_draw(jnp.asarray(np.tile(row, (n, 1))), jnp.asarray(u, jnp.float32)))
    assert np.isfinite(row[ids]).all()
    p = np.exp(row - row[np.isfinite(row)].max())
    p /= p.sum()
    freq = np.bincount(ids, minlength=v) / n
    np.testing.assert_allclose(freq, p, atol=2.5 / n + 1e-4)
    assert _inverse_cdf_draw(jnp.asarray(row[None]), jnp.asarray([np.float32(1 - 2**-24)]))[0] < 690


def test_penalties_match_reference():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, V)).astype(np.float32)
    history = np.full((2, 16), -1, np.int32)
    history[0, :7] = [1, 2, 3, 4, 4, 9, 4]  # prompt [1, 2, 3], output [4, 4, 9, 4]
    history[1, :3] = [5, 6, 5]  # prompt [5], output [6, 5]
    s = arrays(2, history=history, prompt_lens=[3, 1], presence_penalty=[0.5, -0.3],
               frequency_penalty=[0.25, 0.1], repetition_penalty=[1.5, 0.8])
    out = np.asarray(_apply_penalties(jnp.asarray(logits), s))
    expect = logits.copy()
    for row, (prompt, output) in enumerate([([1, 2, 3], [4, 4, 9, 4]), ([5], [6, 5])]):
        rep = [1.5, 0.8][row]
        for tok in set(prompt + output):
            expect[row, tok] = expect[row, tok] / rep if expect[row, tok] > 0 else expect[row, tok] * rep
        for tok in set(output):
            expect[row, tok] -= [0.25, 0.1][row] * output.count(tok) + [0.5, -0.3][row]
    np.testing.assert_allclose(out, expect, rtol=1e-6)


def test_draws_follow_the_filtered_distribution_and_seeds_repeat():
    rng = np.random.default_rng(2)
    row = rng.normal(size=V).astype(np.float32)
    n = 4000
    s = arrays(n, temperature=np.full(n, 0.7), top_k=np.full(n, 4), seeds=np.arange(n) % 1000,
               sample_index=np.arange(n) // 1000, num_logprobs=np.zeros(n))
    out = sample(jnp.asarray(np.tile(row, (n, 1))), s)
    ids = np.asarray(out.token_ids)
    top4 = np.argsort(-row)[:4]
    assert set(ids) <= set(top4.tolist())
    p = np.exp(row[top4] / 0.7)
    p /= p.sum()
    freq = np.array([(ids == t).mean() for t in top4])
    np.testing.assert_allclose(freq, p, atol=0.03)
    again = np.asarray(sample(jnp.asarray(np.tile(row, (n, 1))), s).token_ids)
    np.testing.assert_array_equal(ids, again)  # same (seed, index) -> same token
    logp = np.log(np.exp(row) / np.exp(row).sum())  # logprobs are of the raw distribution
    np.testing.assert_allclose(np.asarray(out.logprobs), logp[ids], atol=1e-5)


def test_greedy_rows_ignore_randomness():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, V)).astype(np.float32)
    out = sample(jnp.asarray(logits), arrays(3, temperature=[0, 0, 0], top_p=[0.1, 1, 1]))
    np.testing.assert_array_equal(np.asarray(out.token_ids), logits.argmax(-1))


def bitmask_allowing(b: int, allowed_per_row) -> np.ndarray:
    mask = np.zeros((b, -(-V // 32)), np.uint32)
    for row, ids in enumerate(allowed_per_row):
        if ids is None:
            mask[row] = 0xFFFFFFFF
        for t in ids or ():
            mask[row, t // 32] |= np.uint32(1 << (t % 32))
    return mask.view(np.int32)


def test_a_mask_with_one_allowed_token_forces_it():
    """Greedy and sampled rows, penalties and filters on: each constrained row gets its one
    allowed token (never the argmax); the unconstrained row is untouched; logprobs are those of
    the masked distribution (the forced token has probability 1)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, V)).astype(np.float32) * 3
    forced = [int(np.argmin(logits[0])), 33, int(np.argmin(logits[2])), None]
    s = arrays(4, temperature=[0.0, 1.0, 0.7, 0.0], top_k=[0, 5, 0, 0], top_p=[1.0, 0.9, 1.0, 1.0],
               repetition_penalty=[1.3, 1.0, 1.0, 1.0], num_logprobs=[2, -1, 2, 2],
               token_bitmask=bitmask_allowing(4, [[t] if t is not None else None for t in forced]))
    out = sample(jnp.asarray(logits), s)
    assert out.token_ids[:3].tolist() == forced[:3]
    assert int(out.token_ids[3]) == int(np.argmax(logits[3]))
    np.testing.assert_allclose(np.asarray(out.logprobs)[[0, 2]], 0.0, atol=1e-6)
    assert np.isneginf(np.asarray(out.top_logprobs)[0, 1]), "the masked distribution has one token"
    ref = logits[3] - np.log(np.exp(logits[3] - logits[3].max()).sum()) - logits[3].max()
    np.testing.assert_allclose(float(out.logprobs[3]), ref.max(), rtol=1e-5)


def test_sampled_tokens_stay_in_the_allowed_set():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(8, V)).astype(np.float32))
    allowed = [sorted(rng.choice(V, size=3, replace=False).tolist()) for _ in range(8)]
    step = jax.jit(sample)
    for index in range(20):
        s = arrays(8, sample_index=np.full(8, index), token_bitmask=bitmask_allowing(8, allowed))
        out = step(logits, s)
        assert all(int(t) in a for t, a in zip(out.token_ids, allowed))


def test_a_short_mask_allows_the_tokens_past_it():
    logits = np.zeros((1, V), np.float32)
    logits[0, V - 1] = 5.0  # past the first 32-token word
    s = arrays(1, temperature=[0.0], token_bitmask=np.zeros((1, 1), np.int32))
    assert int(sample(jnp.asarray(logits), s).token_ids[0]) == V - 1
def test_logit_bias_is_added_to_the_raw_logits_first():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, V)).astype(np.float32)
    # Row 0 forces token 7 (+100), row 1 bans its argmax (-100), row 2 is padding only (inert).
    ban = int(np.argmax(logits[1]))
    s = arrays(3, temperature=[1.0, 0.0, 0.0], num_logprobs=[0, 0, 0],
               bias_ids=[[7, 3, 0, 0], [ban, 0, 0, 0], [0, 0, 0, 0]],
               bias_values=[[100, -5, 0, 0], [-100, 0, 0, 0], [0, 0, 0, 0]])
    out = sample(jnp.asarray(logits), s)
    second = int(np.argsort(-logits[1], kind="stable")[1])
    assert np.asarray(out.token_ids).tolist() == [7, second, int(np.argmax(logits[2]))]
    # Log-probabilities stay those of the model (the bias is a sampling choice, as in vLLM's raw logprobs).
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(out.logprobs), logp[[0, 1, 2], np.asarray(out.token_ids)], atol=1e-5)
