"""Structured outputs: constraints (StructuredOutputs), the grammar-engine interface (backend.py)
and its llguidance implementation."""

from jpaged.structured.backend import GrammarBackend, Matcher, bitmask_row, bitmask_width
from jpaged.structured.params import StructuredOutputs

__all__ = ["StructuredOutputs", "GrammarBackend", "Matcher", "bitmask_row", "bitmask_width", "make_backend"]


def make_backend(tokenizer, vocab_size: int, eos_token_id: int | None = None) -> GrammarBackend:
    """The grammar engine for one tokenizer and model vocabulary (llguidance)."""
    from jpaged.structured.llguidance_backend import LLGuidanceBackend

    return LLGuidanceBackend(tokenizer, vocab_size, eos_token_id)
