"""Which KV blocks each request holds: allocation, prefix-cache lookups, freeing (no jax)."""

from __future__ import annotations

from jpaged.core.block_pool import BlockHash, BlockPool, KVBlock, hash_block
from jpaged.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self._num_registered: dict[str, int] = {}  # leading blocks of a request already in the cache map
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of those, tokens found cached

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by live requests."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def block_ids(self, req_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(req_id, ())]

    def _block_hashes(self, req: Request) -> list[BlockHash]:
        """The chained hashes of the request's full blocks, extended as tokens arrive."""
        hashes, bs, tokens = req.block_hashes, self.block_size, req.all_token_ids
        for i in range(len(hashes), len(tokens) // bs):
            hashes.append(hash_block(hashes[-1] if hashes else None, tuple(tokens[i * bs : (i + 1) * bs].tolist())))
        return hashes

    def get_computed_blocks(self, req: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of full blocks, and its length in tokens.

        At least one token is always left to compute: its logits pick the next token.
        """
        if not self.enable_prefix_caching:
            return [], 0
        hits = []
        for block_hash in self._block_hashes(req)[: (req.num_tokens - 1) // self.block_size]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        self.prefix_cache_queries += req.num_tokens
        self.prefix_cache_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, req: Request, num_new_tokens: int, new_computed_blocks: list[KVBlock] = ()
    ) -> list[KVBlock] | None:
        """Makes room for num_new_tokens more tokens after the computed ones (and the cache hits).

        Returns the newly taken blocks, or None (changing nothing) when too few are free.
        """
        blocks = self.req_blocks.setdefault(req.req_id, [])
        num_tokens = req.num_computed_tokens + len(new_computed_blocks) * self.block_size + num_new_tokens
        num_needed = cdiv(num_tokens, self.block_size) - len(blocks) - len(new_computed_blocks)
        # Hits on free blocks leave the free queue, so they count against what is free.
        num_free_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_needed > self.pool.num_free - num_free_hits:
            if not blocks:
                del self.req_blocks[req.req_id]
            return None
        self.pool.touch(new_computed_blocks)
        blocks.extend(new_computed_blocks)
        new_blocks = self.pool.take_new_blocks(max(num_needed, 0))
        blocks.extend(new_blocks)
        if self.enable_prefix_caching:
            self._register_full_blocks(req, blocks, min(num_tokens, req.num_tokens) // self.block_size)
        return new_blocks

    def _register_full_blocks(self, req: Request, blocks: list[KVBlock], num_full: int) -> None:
        start = self._num_registered.get(req.req_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(req)
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], hashes[i])
        self._num_registered[req.req_id] = num_full

    def free(self, req: Request) -> None:
        """Returns the request's blocks, tail first: its last blocks are evicted before its prefix."""
        blocks = self.req_blocks.pop(req.req_id, [])
        self._num_registered.pop(req.req_id, None)
        self.pool.free_blocks(reversed(blocks))
