"""Per-request sampling settings."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. Frozen; validated on construction."""

    temperature: float = 1.0
    """Softmax temperature, >= 0. 0 means greedy (argmax)."""
    max_tokens: int = 16
    """Most tokens to generate, >= 1. Generation also stops at the model's max length."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens (benchmarks)."""
    seed: int | None = None
    """Random seed of this request's sampling; None draws from the engine's generator."""

    def __post_init__(self):
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0
