"""The model with the Pallas attention backend (interpret mode on CPU) against the XLA backend."""

import pytest

from jpaged import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral-window"])
def test_pallas_backend_gives_the_same_greedy_tokens(name, tiny_models):
    converted = str(tiny_models[name][2])
    prompts = [[5, 9, 13, 2, 8, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52], [7], list(range(3, 30))]
    kw = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64)
    xla = LLM(converted, attn_backend="xla", **kw).generate(prompts, GREEDY, use_tqdm=False)
    pallas = LLM(converted, attn_backend="pallas", **kw).generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in pallas] == [o.outputs[0].token_ids for o in xla]
