"""Shape glossary used in docstrings, einsum strings and `# [T, N, H]` comments.

    B  sequences in a batch (requests; padded to a bucket)
    T  tokens in this step, all sequences laid end to end (padded to a bucket)
    S  KV length of a sequence (tokens already in the cache, this step's included)
    N  query heads            K  KV heads            G  query heads per KV head (N // K)
    H  head dim               D  model (hidden) dim  F  MLP (intermediate) dim
    V  vocabulary size        P  pages (blocks) per sequence in a block table
    L  page size (tokens per page, = block size)
    NP number of pages in a layer's KV pool (page 0 is the null page)
"""

from typing import TypeAlias

import jax

Array: TypeAlias = jax.Array
# One layer's paged KV pool: (k_pages, v_pages), each [NP, L, K, H].
KVCache: TypeAlias = tuple[jax.Array, jax.Array]
