"""KVCacheManager: allocation arithmetic, prefix hits, all-or-nothing allocation, freeing order."""

from jpaged.core.kv_cache_manager import KVCacheManager
from jpaged.core.request import Request
from jpaged.sampling_params import SamplingParams


def req(req_id, tokens, max_tokens=8):
    return Request(req_id, list(tokens), SamplingParams(max_tokens=max_tokens), seed=0)


def test_allocation_grows_by_whole_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    r = req("a", range(10))
    assert [b.block_id for b in kv.allocate_slots(r, 10)] == [1, 2, 3]
    r.num_computed_tokens = 10
    assert kv.allocate_slots(r, 2) == []  # 12 tokens still fit in 3 blocks
    for t in (100, 101, 102):
        r.append_token(t)
    assert [b.block_id for b in kv.allocate_slots(r, 3)] == [4]
    assert kv.block_ids("a") == [1, 2, 3, 4]
    assert kv.pool.num_free == 5


def test_allocation_is_all_or_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a, b = req("a", range(8)), req("b", range(100, 108))
    assert kv.allocate_slots(a, 8) is not None
    assert kv.allocate_slots(b, 8) is None
    assert kv.block_ids("b") == [] and kv.pool.num_free == 1


def test_prefix_hit_shares_full_blocks_and_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = req("a", range(12))
    kv.allocate_slots(a, 12)
    b = req("b", list(range(12)))  # identical prompt: the last block must still be computed
    hits, n = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [1, 2] and n == 8
    new = kv.allocate_slots(b, 4, hits)
    assert [x.block_id for x in new] == [4]
    assert [blk.ref_cnt for blk in kv.req_blocks["b"]] == [2, 2, 1]
    assert kv.prefix_cache_queries == 12 and kv.prefix_cache_hits == 8

    c = req("c", [0, 1, 2, 3, 9, 9, 9, 9, 9])  # shares only the first block
    hits, n = kv.get_computed_blocks(c)
    assert [h.block_id for h in hits] == [1] and n == 4


def test_free_returns_blocks_tail_first_and_keeps_them_cached():
    kv = KVCacheManager(num_blocks=6, block_size=2)
    a = req("a", range(6))
    kv.allocate_slots(a, 6)
    kv.free(a)
    assert kv.pool.free_queue.block_ids() == [4, 5, 3, 2, 1]
    b = req("b", list(range(6)) + [7])
    hits, n = kv.get_computed_blocks(b)  # all three blocks still cached while free
    assert [h.block_id for h in hits] == [1, 2, 3] and n == 6
    kv.allocate_slots(b, 1, hits)
    assert kv.pool.free_queue.block_ids() == [5] and kv.block_ids("b") == [1, 2, 3, 4]


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    kv.allocate_slots(req("a", range(12)), 12)
    assert kv.get_computed_blocks(req("b", range(12))) == ([], 0)
