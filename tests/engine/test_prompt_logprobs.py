"""Prompt log-probabilities (SamplingParams.prompt_logprobs) against HF transformers' log-softmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jpaged import LLM, SamplingParams


@pytest.fixture(scope="module")
def hf_and_llm(tiny_models):
    hf_model, _, converted = tiny_models["llama"]
    # A 16-token budget: a 40-token prompt is prefilled in three chunks, beside other requests.
    return hf_model, LLM(str(converted), max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64,
                         block_size=4)


def hf_log_softmax(hf_model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0], -1).numpy()  # [len(ids), V]


def check(out, ids: list[int], ref: np.ndarray, k: int) -> None:
    """out's prompt logprobs and ranks against HF's log-softmax ref [len(ids), V]."""
    prompt_logprobs, ranks = out.prompt_logprobs, out.prompt_token_ranks
    assert len(prompt_logprobs) == len(ranks) == len(ids) and prompt_logprobs[0] is None and ranks[0] is None
    for pos in range(1, len(ids)):
        entry, row = prompt_logprobs[pos], ref[pos - 1]
        top = np.argsort(-row, kind="stable")[:k].tolist()
        assert set(entry) == set(top) | {ids[pos]}, pos
        for tok, lp in entry.items():
            assert lp == pytest.approx(float(row[tok]), abs=1e-4), (pos, tok)
        # vLLM's rank: tokens at least as likely, itself included (random logits have no ties).
        assert ranks[pos] == int((row >= row[ids[pos]]).sum()), pos


def test_prompt_logprobs_match_hf_across_chunks_cache_and_n(hf_and_llm):
    hf_model, llm = hf_and_llm
    rng = np.random.default_rng(0)
    long, short = rng.integers(3, 160, 40).tolist(), rng.integers(3, 160, 7).tolist()
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3, ignore_eos=True)
    plain = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    llm.generate([long], plain, use_tqdm=False)  # its blocks are now cached: prompt logprobs must not use them
    outs = llm.generate([long, short, short], [params, plain, SamplingParams(
        temperature=0, max_tokens=2, prompt_logprobs=0, n=2, ignore_eos=True)], use_tqdm=False)
    check(outs[0], long, hf_log_softmax(hf_model, long), 3)
    assert outs[1].prompt_logprobs is None and outs[1].prompt_token_ranks is None
    check(outs[2], short, hf_log_softmax(hf_model, short), 0)
