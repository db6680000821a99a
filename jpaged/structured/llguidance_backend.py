"""The llguidance implementation of GrammarBackend (the Rust core behind vLLM's and SGLang's
`guidance` backend): numpy in, numpy out, no torch.

Compiling: llguidance builds a grammar's parser lazily, so a matcher made from the grammar text
costs ~0.5 ms and its first mask more; a copy of a pristine matcher costs ~10 us and shares the
compiled lexer. So each grammar text keeps one pristine matcher (an LRU of MAX_CACHED), and every
sequence gets a deep copy of it. Masks of a batch are filled by llguidance's own thread pool with
the GIL released (LLExecutor), straight into the step's bitmask.
"""

from __future__ import annotations

import collections
import logging
import threading

import numpy as np

from jpaged.structured.backend import GrammarBackend, Matcher, bitmask_row
from jpaged.structured.params import grammar_text

logger = logging.getLogger("jpaged")

MAX_CACHED = 256  # compiled grammars kept


class LLGuidanceMatcher(Matcher):
    def __init__(self, matcher):
        self._m = matcher

    def accept_token(self, token: int) -> bool:
        return self._m.consume_token(token)

    def is_terminated(self) -> bool:
        return self._m.is_stopped()

    def is_error(self) -> bool:
        return self._m.is_error()

    @property
    def error(self) -> str:
        return self._m.get_error()


class LLGuidanceBackend(GrammarBackend):
    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int | None = None):
        """tokenizer: a fast Hugging Face tokenizer; vocab_size: the model's V (>= the tokenizer's)."""
        import llguidance

        self._llg = llguidance
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("structured outputs need a fast (Rust) Hugging Face tokenizer")
        eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        self.vocab_size = vocab_size
        self.eos_token_id = eos
        self.tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos)
        self._executor = llguidance.LLExecutor()
        self._compiled: collections.OrderedDict[tuple[str, str], object] = collections.OrderedDict()
        self._lock = threading.Lock()  # the server's event loop validates while the engine thread steps
        self.num_compiles = 0

    def _pristine(self, key: tuple[str, str]):
        with self._lock:
            matcher = self._compiled.get(key)
            if matcher is not None:
                self._compiled.move_to_end(key)
                return matcher
        matcher = self._llg.LLMatcher(self.tokenizer, grammar_text(*key), log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid {key[0].split('+')[0]} constraint: {matcher.get_error()}")
        with self._lock:
            self.num_compiles += 1
            self._compiled[key] = matcher
            while len(self._compiled) > MAX_CACHED:
                self._compiled.popitem(last=False)
        return matcher

    def matcher(self, key: tuple[str, str]) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self._pristine(key).deep_copy())

    def fill_bitmask(self, rows: list[tuple[Matcher, int]], bitmask: np.ndarray) -> None:
        if bitmask.dtype != np.int32 or bitmask.ndim != 2 or bitmask.shape[1] != self.width \
                or not bitmask.flags["C_CONTIGUOUS"]:
            raise ValueError(f"bitmask must be C-contiguous int32 [B, {self.width}], got {bitmask.dtype} {bitmask.shape}")
        live = [(m._m, row) for m, row in rows if not m.is_error()]
        for m, row in rows:
            if m.is_error():  # only end-of-sequence (llguidance's own mask of an errored matcher is empty)
                bitmask[row] = bitmask_row([self.eos_token_id], self.vocab_size)
        if live:
            if any(row < 0 or row >= bitmask.shape[0] for _, row in live):
                raise ValueError(f"bitmask rows out of range for a batch of {bitmask.shape[0]}")
            self._executor.unsafe_compute_mask_ptr(live, bitmask.ctypes.data, bitmask.shape[1] * 4, bitmask.shape[0])
