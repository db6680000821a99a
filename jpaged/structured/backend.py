"""The grammar engine's interface: what the engine needs from a constrained-decoding library.

One matcher per sequence follows its output token by token and, before each sampled token,
fills that sequence's row of the step's packed bitmask:

    bitmask int32 [B, W], W = ceil(V / 32); token t is allowed in row b iff
        (bitmask[b, t // 32] >> (t % 32)) & 1

(all ones, i.e. -1, for an unconstrained row). The sampler applies it on the device before
anything else. A backend compiles each grammar once, cached by its text, and hands out fresh
matchers from the compiled form. llguidance is the one implementation (llguidance_backend.py;
README: why); a second library would be another subclass.
"""

from __future__ import annotations

import abc

import numpy as np


def bitmask_width(vocab_size: int) -> int:
    """W: int32 words per bitmask row."""
    return -(-vocab_size // 32)


def bitmask_row(token_ids, vocab_size: int) -> np.ndarray:
    """int32 [W]: the row that allows exactly token_ids (each in [0, vocab_size); repeats are fine)."""
    ids = np.asarray(token_ids, np.int64)
    words = np.zeros(bitmask_width(vocab_size), np.uint32)
    np.bitwise_or.at(words, ids >> 5, np.left_shift(np.uint32(1), (ids & 31).astype(np.uint32)))
    return words.view(np.int32)


class Matcher(abc.ABC):
    """One sequence's position in its grammar."""

    @abc.abstractmethod
    def accept_token(self, token: int) -> bool:
        """Advances past a sampled token; False if the grammar does not allow it (the matcher is
        then in an error state and allows only end-of-sequence)."""

    @abc.abstractmethod
    def is_terminated(self) -> bool:
        """The output is complete: the grammar allows nothing more but end-of-sequence."""

    @abc.abstractmethod
    def is_error(self) -> bool:
        """A token the grammar refused was accepted (the mask was not applied)."""


class GrammarBackend(abc.ABC):
    """Compiles constraints for one tokenizer and fills the bitmask rows of a batch of matchers."""

    vocab_size: int  # V of the model (the bitmask's width covers it; tokens past the tokenizer's are never allowed)

    @abc.abstractmethod
    def matcher(self, key: tuple[str, str]) -> Matcher:
        """A fresh matcher for StructuredOutputs.key (kind, text); compiles the grammar on first use."""

    @abc.abstractmethod
    def fill_bitmask(self, rows: list[tuple[Matcher, int]], bitmask: np.ndarray) -> None:
        """Writes each matcher's allowed tokens into its row of bitmask int32 [B, W] (other rows untouched)."""

    @property
    def width(self) -> int:
        return bitmask_width(self.vocab_size)
