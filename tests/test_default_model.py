"""The embedded SmolLM2-135M-Instruct against transformers' own GGUF loader on the same file."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from jpaged import SamplingParams
from jpaged.runner.batch import build_batch
from tests.conftest import default_model_gguf, make_chunk

pytestmark = pytest.mark.default_model

CHAT_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how photosynthesis works.",
    "Give me three tips for learning to cook.",
]
RAW_PROMPTS = ["Once upon a time, in a small village by the sea,", "The history of the Roman Empire", "def fibonacci(n):"]
NUM_TOKENS = 40


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    src = default_model_gguf()
    return AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(default_llm):
    tok = default_llm.get_tokenizer()
    chats = [default_llm.apply_chat_template([{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    return chats + [tok.encode(p) for p in RAW_PROMPTS]


def test_greedy_continuations_match_hf(default_llm, hf_model, prompt_ids):
    outs = default_llm.generate(
        [{"prompt_token_ids": ids} for ids in prompt_ids], SamplingParams(temperature=0, max_tokens=NUM_TOKENS), use_tqdm=False
    )
    for ids, out in zip(prompt_ids, outs):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NUM_TOKENS, do_sample=False,
            )[0, len(ids):].tolist()
        ours = out.outputs[0].token_ids
        assert ours == ref
        assert len(ours) >= 32, "the prompts are chosen to produce long answers"


def test_prefill_logits_match_hf(default_llm, hf_model, prompt_ids):
    ids = prompt_ids[0]
    runner = default_llm.engine.runner
    batch = build_batch([make_chunk(ids, 0, np.arange(1, 1 + runner.spec.page_buckets[-1]))], runner.spec)
    batch = dataclasses.replace(batch, logits_indices=np.arange(len(ids), dtype=np.int32))
    ours = runner.logits(batch)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    print(f"default model prefill logits: relative error {err:.2e}, max abs error {np.abs(ours - ref).max():.2e}")
    assert err < 1e-4


def test_prompt_logprobs_match_hf(default_llm, hf_model, prompt_ids):
    ids = prompt_ids[3]
    out = default_llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2),
                               use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0], -1).numpy()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        entry, row = out.prompt_logprobs[pos], ref[pos - 1]
        assert set(entry) == set(np.argsort(-row)[:2].tolist()) | {ids[pos]}
        np.testing.assert_allclose([entry[t] for t in entry], row[list(entry)], atol=2e-3)
