"""Benchmark workloads: token-id prompts and per-request output lengths, drawn with a fixed seed.

    random  input and output lengths drawn uniformly from [len * (1 - range_ratio), len * (1 + range_ratio)]
            (vLLM's random dataset), token ids uniform over the vocabulary (special ids excluded)
    fixed   every prompt exactly input_len tokens, every output exactly output_len tokens

Every request generates exactly its output length (EOS ignored), so both sides of a comparison
do the same work.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Token ids below this are left out of random prompts: they are the special tokens of the
# Llama-family vocabularies we benchmark (SmolLM2 has 17, Llama 3 puts its own at the top).
FIRST_ORDINARY_ID = 100


@dataclasses.dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]  # token ids per request
    output_lens: list[int]  # new tokens per request

    @property
    def num_prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def _lengths(rng: np.random.Generator, n: int, length: int, range_ratio: float) -> list[int]:
    lo = max(1, int(length * (1 - range_ratio)))
    hi = max(lo, int(length * (1 + range_ratio)))
    return [int(x) for x in rng.integers(lo, hi + 1, size=n)]


def make_workload(
    dataset: str, *, num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0,
    seed: int = 0, vocab_size: int = 49152,
) -> Workload:
    """Draws num_prompts requests; raises ValueError naming a bad argument."""
    if dataset not in ("random", "fixed"):
        raise ValueError(f"dataset must be random or fixed, got {dataset!r}")
    for name, value in (("num_prompts", num_prompts), ("input_len", input_len), ("output_len", output_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    if vocab_size <= FIRST_ORDINARY_ID:
        raise ValueError(f"vocab_size must be > {FIRST_ORDINARY_ID}, got {vocab_size}")
    rng = np.random.default_rng(seed)
    ratio = range_ratio if dataset == "random" else 0.0
    in_lens = _lengths(rng, num_prompts, input_len, ratio)
    out_lens = _lengths(rng, num_prompts, output_len, ratio)
    prompts = [rng.integers(FIRST_ORDINARY_ID, vocab_size, size=n).tolist() for n in in_lens]
    return Workload(prompts, out_lens)


def issue_workload(name: str, seed: int = 0, vocab_size: int = 49152) -> Workload:
    """The engine issue's two CPU workloads: uniform (32 prompts of 32-256 tokens, 128 out) and
    variable (64 prompts of 32-256 tokens, 16-256 out)."""
    num_prompts, out_range = {"uniform": (32, (128, 128)), "variable": (64, (16, 256))}[name]
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(FIRST_ORDINARY_ID, vocab_size, size=int(rng.integers(32, 257))).tolist()
               for _ in range(num_prompts)]
    return Workload(prompts, [int(rng.integers(out_range[0], out_range[1] + 1)) for _ in prompts])
