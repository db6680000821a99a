"""One step's token bitmask (the sampler's int32 [B, W], see jpaged.structured.backend): the rows
of constrained sequences filled by their grammar matchers, then the static rows of
allowed_token_ids ANDed in.

The runner hands the bitmask over all ones (-1), so an AND alone writes an allowed_token_ids row
of an unconstrained sequence, and intersects it with the grammar's row of a constrained one.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from jpaged.structured import GrammarBackend, Matcher

logger = logging.getLogger("jpaged")


@dataclasses.dataclass(frozen=True)
class StepBitmask:
    grammar_rows: list[tuple[Matcher, int]]  # (matcher, batch row) of sequences with a constraint
    # (request id, batch row, int32 [W] mask) of sequences with allowed_token_ids
    allowed_rows: list[tuple[str, int, np.ndarray]]
    grammars: GrammarBackend | None  # fills grammar_rows; None when there are none

    def fill(self, bitmask: np.ndarray) -> None:
        """Writes this step's rows into bitmask int32 [B, W] (handed over all ones); other rows stay -1."""
        if self.grammar_rows:
            self.grammars.fill_bitmask(self.grammar_rows, bitmask)
        constrained = {row for _, row in self.grammar_rows}
        for req_id, row, allowed in self.allowed_rows:
            both = bitmask[row] & allowed
            if row in constrained and not both.any():
                # Nothing is left to sample: the constraint alone decides this step (its output stays valid).
                logger.warning("request %s: its structured-output constraint allows none of its allowed_token_ids "
                               "here; this token follows the constraint alone", req_id)
                continue
            bitmask[row] = both
