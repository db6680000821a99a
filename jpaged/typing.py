"""Shape glossary used in docstrings, einsum strings and `# [T, N, H]` comments.

    B  sequences in a batch (requests; padded to a bucket)
    T  tokens in this step, all sequences laid end to end (padded to a bucket)
    S  KV length of a sequence (tokens already in the cache, this step's included)
    N  query heads            K  KV heads            G  query heads per KV head (N // K)
    H  head dim               D  model (hidden) dim  F  MLP (intermediate) dim
    V  vocabulary size        P  pages (blocks) per sequence in a block table
    L  page size (tokens per page, = block size)
    NP number of pages in a layer's KV pool (page 0 is the null page)
    Y  decoder layers
"""

from typing import TypeAlias

import jax

Array: TypeAlias = jax.Array
# The paged KV pools of all layers: (k_pages, v_pages), each [Y * NP, L, K, H], layer i's pages
# i * NP .. (i + 1) * NP. Two arrays, not two per layer: a step donates them and gets them back,
# and jax's dispatch costs ~10 us for each donated array once a decode step has flushed the
# caches (60 per-layer pools of the default model: ~0.6 ms more a step before the program ran).
# One axis for layers and pages, not [Y, NP, ...]: XLA:CPU copied the pools every step when
# each layer's scatter wrote the 5-D array and its attention read a 4-D reshape of it.
KVCache: TypeAlias = tuple[jax.Array, jax.Array]
