"""StepBitmask on the host: allowed_token_ids rows alone, ANDed with a grammar's row, and a disjoint
pair left to the grammar; checked against sets of token ids."""

from __future__ import annotations

import logging

import numpy as np

from jpaged.engine.step_bitmask import StepBitmask
from jpaged.structured import GrammarBackend, bitmask_row, bitmask_width

V = 100


def allowed(row: np.ndarray) -> set[int]:
    return set(np.nonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))[0].tolist())


class FixedGrammars(GrammarBackend):
    """Fills each matcher's row with a fixed set of token ids (the matcher is that set)."""

    vocab_size = V

    def matcher(self, key):
        raise NotImplementedError

    def fill_bitmask(self, rows, bitmask):
        for ids, row in rows:
            bitmask[row] = bitmask_row(sorted(ids), V)


def test_bitmask_row_sets_exactly_the_ids():
    ids = [0, 5, 31, 32, 63, 64, 99, 5]
    row = bitmask_row(ids, V)
    assert row.dtype == np.int32 and row.shape == (bitmask_width(V),)
    assert allowed(row) == set(ids)


def test_allowed_rows_alone_and_intersected_with_a_grammar(caplog):
    bitmask = np.full((4, bitmask_width(V)), -1, np.int32)
    step = StepBitmask(grammar_rows=[({1, 2, 3, 40}, 1), ({7, 8}, 2)],
                       allowed_rows=[("a", 0, bitmask_row([3, 97], V)), ("b", 1, bitmask_row([3, 40, 50], V)),
                                     ("c", 2, bitmask_row([9], V))],
                       grammars=FixedGrammars())
    with caplog.at_level(logging.WARNING, logger="jpaged"):
        step.fill(bitmask)
    assert allowed(bitmask[0]) == {3, 97}  # allowed_token_ids alone
    assert allowed(bitmask[1]) == {3, 40}  # both masks
    assert allowed(bitmask[2]) == {7, 8}  # disjoint: the grammar alone, and a warning naming the request
    assert (bitmask[3] == -1).all()  # untouched
    assert "request c: its structured-output constraint allows none of its allowed_token_ids" in caplog.text
