"""build_batch: the exact padded arrays for a hand-worked example."""

import numpy as np
import pytest

from jpaged.runner.batch import BucketSpec, build_batch
from jpaged.runner.buckets import pick_bucket, power_of_two_buckets, token_buckets
from jpaged.sampling_params import SamplingParams
from tests.conftest import make_chunk

SPEC = BucketSpec(token_buckets=(8, 16), max_num_seqs_bucket=4, page_buckets=(2, 8), page_size=4, num_pages=20)


def test_two_sequences_prefill_chunk_and_decode():
    # seq 0 decodes its token at position 5 (page 7 slot 1 -> 7*4+1); seq 1 prefills positions 2..4
    hot = SamplingParams(temperature=0.5, top_k=3, top_p=0.9, min_p=0.1, repetition_penalty=1.2)
    chunks = [
        make_chunk([11], 5, [3, 7], params=hot, seed=9, history=[1, 2, 3, 4, 50, 11]),
        make_chunk([21, 22, 23], 2, [12, 4]),
    ]
    chunks[0] = chunks[0].__class__(**{**chunks[0].__dict__, "num_prompt_tokens": 4})
    b = build_batch(chunks, SPEC)
    np.testing.assert_array_equal(b.token_ids, [11, 21, 22, 23, 0, 0, 0, 0])
    np.testing.assert_array_equal(b.positions, [5, 2, 3, 4, 0, 0, 0, 0])
    drop = 20 * 4
    np.testing.assert_array_equal(b.meta.slot_mapping, [29, 50, 51, 16, drop, drop, drop, drop])
    np.testing.assert_array_equal(b.meta.block_tables, [[3, 7], [12, 4], [0, 0], [0, 0]])
    np.testing.assert_array_equal(b.meta.kv_lens, [6, 5, 0, 0])
    np.testing.assert_array_equal(b.meta.cu_q_lens, [0, 1, 4, 4, 4])
    np.testing.assert_array_equal(b.logits_indices, [0, 3, 0, 0])
    s = b.sampling
    np.testing.assert_allclose(s.temperature, [0.5, 0, 0, 0])
    np.testing.assert_array_equal(s.top_k, [3, 0, 0, 0])
    np.testing.assert_allclose(s.top_p, [0.9, 1, 1, 1])
    np.testing.assert_allclose(s.repetition_penalty, [1.2, 1, 1, 1])
    np.testing.assert_array_equal(s.seeds, [9, 0, 0, 0])
    np.testing.assert_array_equal(s.sample_index, [2, 0, 0, 0])  # 6 tokens so far, 4 of them prompt
    np.testing.assert_array_equal(s.prompt_lens, [4, 5, 0, 0])
    assert s.history.shape == (4, 32)  # always the longest sequence, so the sampler never recompiles
    np.testing.assert_array_equal(s.history[0, :7], [1, 2, 3, 4, 50, 11, -1])
    np.testing.assert_array_equal(s.history[1, :6], [0, 0, 21, 22, 23, -1])


def test_block_table_width_follows_longest_context():
    b = build_batch([make_chunk(range(9), 0, [1, 2, 3])], SPEC)
    assert b.meta.block_tables.shape == (4, 8)  # 3 pages -> the 8-page bucket; 9 tokens -> T=16, B=min(16, 4)
    assert SPEC.shapes() == [(8, 4, 2), (8, 4, 8), (16, 4, 2), (16, 4, 8)]


def test_buckets():
    assert power_of_two_buckets(16, 100) == (16, 32, 64, 100)
    assert power_of_two_buckets(8, 8) == (8,)
    assert power_of_two_buckets(8, 256, factor=4) == (8, 32, 128, 256)


def test_token_buckets_add_decode_sizes_up_to_max_seqs():
    assert token_buckets(512, 64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 128, 256, 512)
    assert token_buckets(256, 16) == (1, 2, 4, 8, 16, 32, 64, 128, 256)  # nothing past max_seqs
    assert token_buckets(512, 128)[8:] == (48, 56, 64, 80, 96, 112, 128, 256, 512)
    assert token_buckets(30, 64) == (1, 2, 4, 8, 16, 24, 30)  # nothing past the token budget
    assert [pick_bucket(n, (8, 16)) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
    with pytest.raises(ValueError, match="exceeds"):
        pick_bucket(17, (8, 16))
