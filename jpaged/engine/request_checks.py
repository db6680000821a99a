"""Checks of a request against the model, and the reduction of API seeds to device seeds.

SamplingParams checks what it can alone; token ids need the vocabulary, which only the engine
knows. Messages say "out of vocabulary", vLLM's wording, which clients match on.
"""

from __future__ import annotations

import hashlib

import numpy as np

from jpaged.sampling_params import SamplingParams


def check_token_ids(prompt_ids: list[int], params: SamplingParams, vocab_size: int) -> None:
    """Raises ValueError naming the first id (of the prompt, stop_token_ids, logit_bias or
    allowed_token_ids) that is not in [0, vocab_size)."""
    ids = np.asarray(prompt_ids, np.int64)
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"Token id {int(bad[0])} in the prompt is out of vocabulary (the model's vocabulary has "
                         f"{vocab_size} tokens, ids 0 to {vocab_size - 1})")
    for field, field_ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or ()),
                             ("allowed_token_ids", params.allowed_token_ids or ())):
        bad = [t for t in field_ids if t >= vocab_size]
        if bad:
            raise ValueError(f"{field} must hold ids in the vocabulary: token id {bad[0]} is out of vocabulary "
                             f"(the model's vocabulary has {vocab_size} tokens)")


def device_seed(seed: int) -> int:
    """A seed of any int64 as the device's uint32 random stream: [0, 2**32) unchanged; others through
    a hash of their 8 bytes, so nearby large seeds (2**40, 2**40 + 1) stay unrelated streams."""
    if 0 <= seed < 2**32:
        return seed
    digest = hashlib.blake2b(int(seed).to_bytes(8, "little", signed=True), digest_size=4).digest()
    return int.from_bytes(digest, "little")
