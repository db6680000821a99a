"""The converted model against HF transformers (torch, float32): prefill and paged decode logits."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jpaged import checkpoint
from jpaged.models.config import ModelConfig
from jpaged.models.params import build_model
from jpaged.runner.batch import BucketSpec, build_batch
from jpaged.runner.buckets import power_of_two_buckets
from jpaged.runner.model_runner import ModelRunner
from tests.conftest import HAS_COMPILER, TINY_MODELS, make_chunk

PAGE_SIZE = 4  # small pages so every sequence spans several, in shuffled order
NUM_PAGES = 64
DECODE_STEPS = 8


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


class PagedDriver:
    """Runs sequences through the runner with randomly scattered pages, returning per-token logits."""

    def __init__(self, folder, rng: np.random.Generator, linear: str):
        config = ModelConfig.from_file(folder / "config.json")
        params = checkpoint.load_params(folder, config, jnp.float32)
        self.spec = BucketSpec(power_of_two_buckets(16, 256), 8, power_of_two_buckets(8, 64), PAGE_SIZE, NUM_PAGES)
        model = build_model(config, params, linear=linear, dtype=jnp.float32)
        self.runner = ModelRunner(model, self.spec, kv_dtype=jnp.float32)
        self.pages = rng.permutation(np.arange(1, NUM_PAGES)).astype(np.int32)

    def block_table(self, i: int) -> np.ndarray:
        return self.pages[i * 16 : (i + 1) * 16]  # 16 pages = 64 tokens per sequence

    def run(self, chunks, all_positions: bool) -> np.ndarray:
        batch = build_batch(chunks, self.spec)
        if all_positions:
            n = sum(len(c.token_ids) for c in chunks)
            batch = dataclasses.replace(batch, logits_indices=np.arange(n, dtype=np.int32))
        return self.runner.logits(batch)


# linear: the projections as XLA dots, or the C++ kernel over packed weights (a packed copy of
# the embedding for tied heads)
@pytest.mark.parametrize("linear", ["xla", pytest.param("cpu", marks=pytest.mark.skipif(
    not HAS_COMPILER, reason="no C++ compiler"))])
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_prefill_and_decode_match_hf(name, linear, tiny_models):
    hf_model, _, folder = tiny_models[name]
    rng = np.random.default_rng(hash(name) % 2**32)
    driver = PagedDriver(folder, rng, linear)
    vocab = hf_model.config.vocab_size
    # Three prompts of lengths around page boundaries, prefilled together in one ragged batch.
    prompts = [rng.integers(3, vocab, size=n).tolist() for n in (5, 8, 13)]
    chunks = [make_chunk(p, 0, driver.block_table(i)) for i, p in enumerate(prompts)]
    prefill = driver.run(chunks, all_positions=True)  # [sum(lens), V]

    seqs = [list(p) for p in prompts]
    decode_logits = [[] for _ in prompts]
    last = np.cumsum([len(p) for p in prompts]) - 1
    next_ids = prefill[last].argmax(-1)
    for _ in range(DECODE_STEPS):
        chunks = []
        for i, tok in enumerate(next_ids):
            seqs[i].append(int(tok))
            chunks.append(make_chunk([tok], len(seqs[i]) - 1, driver.block_table(i)))
        logits = driver.run(chunks, all_positions=False)[: len(prompts)]
        for i in range(len(prompts)):
            decode_logits[i].append(logits[i])
        next_ids = logits.argmax(-1)

    offset = 0
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = hf_model(torch.tensor([seqs[i]])).logits[0].numpy()  # [len, V], no cache
        ours_prefill = prefill[offset : offset + len(prompt)]
        offset += len(prompt)
        assert rel_err(ours_prefill, ref[: len(prompt)]) < 1e-4
        ours_decode = np.stack(decode_logits[i])
        # decode_logits[k] belongs to position len(prompt) + k, whose logits predict the next token
        ref_decode = ref[len(prompt) + np.arange(DECODE_STEPS)]
        assert rel_err(ours_decode, ref_decode) < 1e-4

        with torch.no_grad():
            greedy = hf_model.generate(
                torch.tensor([prompt]), max_new_tokens=DECODE_STEPS + 1, do_sample=False,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0, eos_token_id=None,
            )[0, len(prompt):].tolist()
        ours_greedy = seqs[i][len(prompt):] + [int(next_ids[i])]
        assert ours_greedy == greedy
