"""BlockPool: exact block ids, free-queue order, ref counts, lazy eviction of cached blocks."""

import pytest

from jpaged.core.block_pool import BlockPool, FreeBlockQueue, KVBlock, hash_block


def test_null_block_is_never_handed_out_and_order_is_fifo():
    pool = BlockPool(6)
    assert pool.num_blocks == 5 and pool.num_free == 5
    first = pool.take_new_blocks(3)
    assert [b.block_id for b in first] == [1, 2, 3]
    assert all(b.ref_cnt == 1 for b in first)
    pool.free_blocks(reversed(first))  # a request frees its tail first
    assert pool.free_queue.block_ids() == [4, 5, 3, 2, 1]
    assert [b.block_id for b in pool.take_new_blocks(5)] == [4, 5, 3, 2, 1]
    with pytest.raises(ValueError, match="asked for 1 blocks, 0 free"):
        pool.take_new_blocks(1)


def test_free_queue_remove_from_middle_is_consistent():
    blocks = [KVBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    q.remove(blocks[0])
    q.append(blocks[2])
    assert q.block_ids() == [1, 3, 4, 2] and q.num_free == 4
    assert q.popleft() is blocks[1]


def test_shared_block_returns_to_free_queue_only_at_zero_refs():
    pool = BlockPool(4)
    (block,) = pool.take_new_blocks(1)
    pool.touch([block])  # a second request shares it
    assert block.ref_cnt == 2 and pool.num_free == 2
    pool.free_blocks([block])
    assert block.ref_cnt == 1 and pool.num_free == 2
    pool.free_blocks([block])
    assert block.ref_cnt == 0 and pool.free_queue.block_ids() == [2, 3, 1]
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free_blocks([block])


def test_cached_block_survives_free_until_reused():
    pool = BlockPool(3)
    a, b = pool.take_new_blocks(2)
    ha = hash_block(None, (1, 2))
    pool.cache_block(a, ha)
    pool.free_blocks([b, a])  # free queue: 2, 1
    assert pool.get_cached_block(ha) is a  # still findable while free
    pool.touch([a])  # a hit takes it out of the free queue
    assert pool.free_queue.block_ids() == [2] and a.ref_cnt == 1
    pool.free_blocks([a])  # free queue: 2, 1
    taken = pool.take_new_blocks(2)  # block 1 is reused: its hash is evicted
    assert [t.block_id for t in taken] == [2, 1]
    assert pool.get_cached_block(ha) is None and a.block_hash is None


def test_lookup_compares_token_ids_not_just_the_hash():
    pool = BlockPool(3)
    (a,) = pool.take_new_blocks(1)
    h = hash_block(None, (1, 2))
    pool.cache_block(a, h)
    forged = h._replace(token_ids=(9, 9))  # same hash value, other tokens: a collision
    assert pool.get_cached_block(forged) is None
    assert pool.get_cached_block(hash_block(h, (3, 4))).__class__ is type(None)


def test_hash_chains_parent():
    h1 = hash_block(None, (1, 2))
    assert hash_block(h1, (3, 4)) != hash_block(hash_block(None, (9, 9)), (3, 4))
    assert hash_block(h1, (3, 4)) == hash_block(hash_block(None, (1, 2)), (3, 4))
