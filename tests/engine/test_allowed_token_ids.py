"""SamplingParams.allowed_token_ids on a tiny random model: sampled tokens never leave the set (any
seed, n > 1, beside unconstrained requests), greedy takes HF's argmax among the allowed ids, the
log-probabilities are those of the masked distribution, and nothing recompiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jpaged import LLM, SamplingParams

V = 160  # the tiny models' vocabulary


@pytest.fixture(scope="module")
def hf_and_llm(tiny_models):
    hf_model, _, converted = tiny_models["llama"]
    # tests/test_llm.py's sizes: the same compiled steps serve both modules.
    return hf_model, LLM(str(converted), max_num_seqs=4, max_num_batched_tokens=16, num_kv_blocks=40,
                         max_model_len=64)


def hf_next_logits(hf_model, prompt: list[int], output: list[int]) -> np.ndarray:
    """float32 [len(output), V]: HF's logits of each output position given everything before it."""
    ids = prompt + output
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].numpy()
    return logits[len(prompt) - 1 : len(ids) - 1]


def test_sampled_tokens_stay_in_the_set_for_every_seed_and_n(hf_and_llm):
    _, llm = hf_and_llm
    rng = np.random.default_rng(0)
    allowed = sorted(rng.choice(np.arange(3, V), 6, replace=False).tolist())
    prompts = [rng.integers(3, V, n).tolist() for n in (4, 11, 20, 7)]
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=12, ignore_eos=True, allowed_token_ids=allowed)
              for seed in (0, 1, 2)]
    params.append(SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True,
                                 allowed_token_ids=allowed))
    outs = llm.generate(prompts, params, use_tqdm=False)
    sampled = [t for out in outs for c in out.outputs for t in c.token_ids]
    assert len(outs[3].outputs) == 3 and len(sampled) == 6 * 12
    assert set(sampled) <= set(allowed)
    assert len(set(sampled)) > 1, "temperature 1 draws among the allowed ids, not always the same one"
    free = llm.generate(prompts, [SamplingParams(temperature=1.0, seed=s, max_tokens=12, ignore_eos=True)
                                  for s in (0, 1, 2, 5)], use_tqdm=False)
    assert {t for out in free for t in out.outputs[0].token_ids} - set(allowed), "the set does restrict"


def test_greedy_is_hf_argmax_among_the_allowed_ids_with_masked_logprobs(hf_and_llm):
    hf_model, llm = hf_and_llm
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, V, 9).tolist()
    allowed = sorted(rng.choice(np.arange(V), 40, replace=False).tolist())
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3,
                                                allowed_token_ids=allowed), use_tqdm=False)[0].outputs[0]
    logits = hf_next_logits(hf_model, prompt, out.token_ids)[:, allowed]  # [8, 40]
    assert out.token_ids == np.asarray(allowed)[logits.argmax(-1)].tolist()
    ref = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)  # log-softmax over the allowed ids
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert set(entry) <= set(allowed)
        assert entry[token] == pytest.approx(float(ref[step, allowed.index(token)]), abs=1e-4)


def test_a_batch_mixing_allowed_and_free_rows_changes_nothing_else_and_never_recompiles(hf_and_llm):
    _, llm = hf_and_llm
    runner = llm.engine.runner
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    free = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = llm.generate(prompts, free, use_tqdm=False)  # compiles what these shapes need
    compiles = runner.num_compiles
    mixed = llm.generate(prompts, [free, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                        allowed_token_ids=[42])], use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert mixed[1].outputs[0].token_ids == [42] * 6
    assert runner.num_compiles == compiles


@pytest.mark.parametrize("ids, message", [
    ([], "allowed_token_ids must be None or a non-empty list of token ids, got []"),
    ([3, -1], "allowed_token_ids must hold non-negative token ids, got -1"),
    ([3, "4"], "allowed_token_ids must hold non-negative token ids, got '4'"),
    ([True], "allowed_token_ids must hold non-negative token ids, got True"),
])
def test_sampling_params_refuse_bad_lists(ids, message):
    with pytest.raises(ValueError) as e:
        SamplingParams(allowed_token_ids=ids)
    assert str(e.value) == message


def test_an_id_past_the_vocabulary_is_refused_naming_it(hf_and_llm):
    _, llm = hf_and_llm
    with pytest.raises(ValueError) as e:
        llm.generate([[5, 6]], SamplingParams(allowed_token_ids=[7, V + 3]), use_tqdm=False)
    assert str(e.value).endswith(f"allowed_token_ids must hold ids in the vocabulary: token id {V + 3} is out of "
                                 f"vocabulary (the model's vocabulary has {V} tokens)")
    assert not llm.engine.has_unfinished()
    assert SamplingParams(allowed_token_ids=np.array([1, 2])).allowed_token_ids == (1, 2)
