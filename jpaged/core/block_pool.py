"""KV blocks, the O(1) free queue, ref counts and the prefix-cache map (no jax).

Block 0 is the null block: never handed out, never cached; padded block-table entries point at
it. A freed block keeps its hash and goes to the tail of the free queue; it stays findable in the
cache until it is taken from the head for reuse (lazy eviction), so the blocks freed longest
ago are evicted first.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, NamedTuple


class BlockHash(NamedTuple):
    """Identity of a full block: its hash chains the parent's. The token ids are kept so that a
    lookup compares them instead of trusting the hash alone (no silent collisions)."""

    value: int
    parent: int | None
    token_ids: tuple[int, ...]
    extra_keys: tuple = ()


def hash_block(parent: BlockHash | None, token_ids: tuple[int, ...], extra_keys: tuple = ()) -> BlockHash:
    parent_value = None if parent is None else parent.value
    return BlockHash(hash((parent_value, token_ids, extra_keys)), parent_value, token_ids, extra_keys)


@dataclasses.dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None  # set once the block is full and registered in the cache
    prev_free: KVBlock | None = dataclasses.field(default=None, repr=False)
    next_free: KVBlock | None = dataclasses.field(default=None, repr=False)


class FreeBlockQueue:
    """Doubly linked list of free blocks: pop from the head, append to the tail, remove from the
    middle (a cache hit on a free block), all O(1)."""

    def __init__(self, blocks: Iterable[KVBlock]):
        self._head = KVBlock(-1)  # sentinels: no None checks at the ends
        self._tail = KVBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is self._tail:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self.num_free += 1

    def block_ids(self) -> list[int]:
        """Free block ids from head (evicted next) to tail; for tests and debugging."""
        ids, block = [], self._head.next_free
        while block is not self._tail:
            ids.append(block.block_id)
            block = block.next_free
        return ids


class BlockPool:
    def __init__(self, num_blocks: int, *, enable_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is the null block), got {num_blocks}")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self.enable_caching = enable_caching
        self.cached: dict[int, KVBlock] = {}  # BlockHash.value -> block

    @property
    def num_blocks(self) -> int:
        """Usable blocks (the null block excluded)."""
        return len(self.blocks) - 1

    @property
    def num_free(self) -> int:
        return self.free_queue.num_free

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        block = self.cached.get(block_hash.value)
        if block is None or block.block_hash != block_hash:
            return None
        return block

    def take_new_blocks(self, n: int) -> list[KVBlock]:
        """n blocks from the head of the free queue, each with ref_cnt 1; evicts their old hashes."""
        if n > self.num_free:
            raise ValueError(f"asked for {n} blocks, {self.num_free} free")
        blocks = []
        for _ in range(n):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash.value) is block:
                del self.cached[block.block_hash.value]
            block.block_hash = None

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Takes a reference on cache-hit blocks; a free one leaves the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drops one reference each, in the given order; blocks reaching 0 join the free queue's tail."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"block {block.block_id} freed more often than taken")
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Registers a now-full block. If an identical block is already cached, keeps that one."""
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        self.cached.setdefault(block_hash.value, block)
