"""The public API: LLM.generate against HF greedy decoding, prompt forms, stop rules, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jpaged import LLM, SamplingParams


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def tiny(tiny_models):
    hf_model, _, converted = tiny_models["llama"]
    # A small token budget and KV pool: prompts are prefilled in chunks across steps, and
    # requests wait for pages while others run.
    llm = LLM(str(converted), max_num_seqs=4, max_num_batched_tokens=16, num_kv_blocks=40, max_model_len=64)
    return llm, hf_model


def test_batched_chunked_generation_matches_hf(tiny):
    llm, hf_model = tiny
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 160, size=n).tolist() for n in (3, 17, 30, 1, 9, 24)]
    max_tokens = [12, 5, 9, 20, 1, 14]
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens],
                        use_tqdm=False)
    for prompt, m, out in zip(prompts, max_tokens, outs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(hf_model, prompt, m)
        assert out.outputs[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny):
    llm, _ = tiny
    p = SamplingParams(temperature=1.0, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], p, use_tqdm=False)[0].outputs[0].token_ids
    batched = llm.generate([[9, 9], [5, 6, 7], [11] * 20], p, use_tqdm=False)[1].outputs[0].token_ids
    other_seed = llm.generate([[5, 6, 7]], SamplingParams(temperature=1.0, max_tokens=16, seed=99, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0].token_ids
    assert alone == batched
    assert alone != other_seed


@pytest.mark.parametrize(
    "prompt, message",
    [([], "prompt 0: the prompt is empty"), (list(range(64)), "maximum context length is 64"),
     ([1, 160], "out of vocabulary"), (3.5, "must be a str")],
)
def test_bad_prompts_raise(tiny, prompt, message):
    with pytest.raises(ValueError, match=message):
        tiny[0].generate([prompt], use_tqdm=False)


def test_text_prompt_without_tokenizer_and_params_count(tiny):
    with pytest.raises(ValueError, match="no tokenizer"):
        tiny[0].generate("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        tiny[0].generate([[1, 2]], [SamplingParams(), SamplingParams()], use_tqdm=False)


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
     (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=2.5), "max_tokens")],
)
def test_sampling_params_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_kv_pool_too_small_for_max_model_len_names_the_largest_fit(tiny_models):
    with pytest.raises(ValueError, match="largest max_model_len that fits is 64"):
        LLM(str(tiny_models["llama"][2]), max_model_len=200, num_kv_blocks=5)


def test_dummy_weights_from_config_alone(tiny_models):
    _, hf_folder, _ = tiny_models["qwen3"]
    llm = LLM(str(hf_folder / "config.json"), load_format="dummy", max_model_len=32)
    assert llm.get_tokenizer() is None
    out = llm.generate([[4, 5, 6]], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 7 and all(0 <= t < 160 for t in out.outputs[0].token_ids)


def test_dummy_weights_from_a_shape_file_of_any_name(tiny_models, tmp_path):
    """`--dummy-config llama-3-8b` passes benchmarks/configs/llama-3-8b.json: not a config.json."""
    _, hf_folder, _ = tiny_models["llama"]
    shape = tmp_path / "some-shape.json"
    shape.write_text((hf_folder / "config.json").read_text())
    llm = LLM(str(shape), load_format="dummy", max_model_len=32)
    out = llm.generate([[4, 5, 6]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert llm.engine.model_config.vocab_size == 160 and len(out.outputs[0].token_ids) == 3


@pytest.mark.default_model
def test_default_model_prompt_forms_and_stop(default_llm):
    tok = default_llm.get_tokenizer()
    chat_ids = default_llm.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    greedy = SamplingParams(temperature=0, max_tokens=24)
    by_ids, by_dict = default_llm.generate([chat_ids, {"prompt_token_ids": chat_ids}], greedy, use_tqdm=False)
    assert by_ids.outputs[0].token_ids == by_dict.outputs[0].token_ids
    answer = by_ids.outputs[0]
    assert answer.finish_reason == "stop" and "Paris" in answer.text
    assert answer.token_ids[-1] == tok.eos_token_id and "<|im_end|>" not in answer.text

    forced = default_llm.generate([chat_ids], SamplingParams(temperature=0, max_tokens=len(answer.token_ids) + 3,
                                                             ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert forced.finish_reason == "length" and forced.token_ids[: len(answer.token_ids)] == answer.token_ids

    cut = default_llm.generate([chat_ids], SamplingParams(temperature=0, max_tokens=24, stop=["Paris"]),
                               use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.text == answer.text[: answer.text.index("Paris")]

    text = tok.decode(chat_ids)
    by_text = default_llm.generate(text, greedy, use_tqdm=False)[0]
    assert by_text.prompt_token_ids == chat_ids and by_text.outputs[0].token_ids == answer.token_ids
