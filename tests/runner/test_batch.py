"""build_batch: the exact padded arrays for a hand-worked example."""

import numpy as np
import pytest

from jpaged.runner.batch import BucketSpec, SeqChunk, build_batch
from jpaged.runner.buckets import pick_bucket, power_of_two_buckets

SPEC = BucketSpec(token_buckets=(8, 16), seq_buckets=(4, 8), page_buckets=(2, 4, 8), page_size=4, num_pages=20)


def test_two_sequences_prefill_chunk_and_decode():
    # seq 0 decodes its token at position 5 (page 7 slot 1 -> 7*4+1); seq 1 prefills positions 2..4
    chunks = [
        SeqChunk(np.array([11]), start=5, block_table=np.array([3, 7]), temperature=0.5, seed=9, sample_index=2),
        SeqChunk(np.array([21, 22, 23]), start=2, block_table=np.array([12, 4])),
    ]
    b = build_batch(chunks, SPEC)
    np.testing.assert_array_equal(b.token_ids, [11, 21, 22, 23, 0, 0, 0, 0])
    np.testing.assert_array_equal(b.positions, [5, 2, 3, 4, 0, 0, 0, 0])
    drop = 20 * 4
    np.testing.assert_array_equal(b.meta.slot_mapping, [29, 50, 51, 16, drop, drop, drop, drop])
    np.testing.assert_array_equal(b.meta.block_tables, [[3, 7], [12, 4], [0, 0], [0, 0]])
    np.testing.assert_array_equal(b.meta.kv_lens, [6, 5, 0, 0])
    np.testing.assert_array_equal(b.meta.cu_q_lens, [0, 1, 4, 4, 4])
    np.testing.assert_array_equal(b.logits_indices, [0, 3, 0, 0])
    np.testing.assert_array_equal(b.temperature, [0.5, 0, 0, 0])
    np.testing.assert_array_equal(b.seeds, [9, 0, 0, 0])
    np.testing.assert_array_equal(b.sample_index, [2, 0, 0, 0])


def test_buckets():
    assert power_of_two_buckets(16, 100) == (16, 32, 64, 100)
    assert power_of_two_buckets(8, 8) == (8,)
    assert [pick_bucket(n, (8, 16)) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
    with pytest.raises(ValueError, match="exceeds"):
        pick_bucket(17, (8, 16))
