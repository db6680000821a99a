"""Incremental detokenization and stop strings for one output sequence.

Decoding token by token with `decode(ids[-1:])` breaks multi-byte characters and word spacing,
so each new piece is the difference between decoding a short window with and without the new
tokens (vLLM's prefix/read offsets). Text that could still turn into a stop string is held
back until it is known either way.
"""

from __future__ import annotations

# Prompt tokens kept as left context, so the first output tokens decode with their spacing.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], *, skip_special_tokens: bool, stop: tuple[str, ...],
                 include_stop: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop  # keep the stop string that ended the text
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # everything decoded so far (a stop string, once found, is cut off)
        self.stopped = False  # a stop string ended the output

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def append(self, token_id: int) -> None:
        """Adds one token; sets `stopped` when a stop string appears (the text ends before it)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if new_text.endswith("\ufffd"):
            return  # an incomplete UTF-8 sequence: wait for the next token
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if not delta or self.stopped:
            return
        search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += delta
        for stop in self.stop:
            at = self.text.find(stop, search_from)
            if at != -1:
                self.text = self.text[: at + len(stop) if self.include_stop else at]
                self.stopped = True
                return

    def visible_text(self, finished: bool) -> str:
        """The text safe to show: while running, a tail that may begin a stop string is held back."""
        if finished or not self.stop:
            return self.text
        hold = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(self.text)), hold, -1):
                if self.text.endswith(stop[:k]):
                    hold = k
                    break
        return self.text[: len(self.text) - hold]
