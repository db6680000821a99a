"""Builds paged-attention test cases and an independent float64 numpy reference.

A case lays S sequences out the way runner/batch.py does: tokens end to end, padded to T;
each sequence's pages drawn from a shuffled pool (page 0 is the null page); block-table
entries past a sequence's pages point at the null page. With poison=True every page that no
sequence owns (the null page included) and every padding query token is NaN, so a kernel
that reads a position it must not use shows NaN in its output.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# ||out - ref|| / ||ref|| against the float64 reference on the same (rounded) inputs.
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}

ON_GPU = jax.default_backend() == "gpu"
# Every correctness test runs in the interpreter on CPU, and compiled for real on a GPU.
INTERPRET_MODES = [
    pytest.param(True, id="interpret"),
    pytest.param(False, id="gpu", marks=pytest.mark.skipif(not ON_GPU, reason="needs a GPU backend")),
]


H100 = dict(device_kind="NVIDIA H100", num_cores=132, platform="cuda")


def lower_for_cuda(fn, *args) -> str:
    """StableHLO text of jit(fn) lowered for CUDA on this (maybe CPU-only) machine: an abstract H100."""
    device = jax.sharding.AbstractDevice(**H100)
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "Pallas Triton backend is deprecated"
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@dataclasses.dataclass
class RaggedCase:
    q: jax.Array  # [T, N, H]
    k_pages: jax.Array  # [NP, L, K, H]
    v_pages: jax.Array
    block_tables: jax.Array  # int32 [S, P]
    kv_lens: jax.Array  # int32 [S]
    cu_q_lens: jax.Array  # int32 [S + 1]
    scale: float

    @property
    def args(self):
        return (self.q, self.k_pages, self.v_pages, self.block_tables, self.kv_lens, self.cu_q_lens)


def make_ragged_case(
    rng: np.random.Generator,
    q_lens: list[int],
    kv_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype,
    num_tokens: int | None = None,
    num_seqs: int | None = None,
    pages_per_seq: int | None = None,
    spare_pages: int = 3,
    poison: bool = True,
) -> RaggedCase:
    """q_lens[s] query tokens of sequence s, the last of them at position kv_lens[s] - 1.

    num_tokens / num_seqs pad T and S past the real ones (padding sequences: 0 tokens,
    kv_len 0, a table of null pages).
    """
    assert len(q_lens) == len(kv_lens) and all(0 <= q <= kv for q, kv in zip(q_lens, kv_lens))
    num_real = len(q_lens)
    num_seqs = num_seqs or num_real
    num_tokens = num_tokens or max(1, sum(q_lens))
    pages_needed = [-(-kv // page_size) for kv in kv_lens]
    pages_per_seq = pages_per_seq or max(1, max(pages_needed))
    num_pages = 1 + sum(pages_needed) + spare_pages

    fill = np.nan if poison else 0.0
    k_pages = np.full((num_pages, page_size, num_kv_heads, head_dim), fill, np.float32)
    v_pages = np.full_like(k_pages, fill)
    block_tables = np.zeros((num_seqs, pages_per_seq), np.int32)
    free = rng.permutation(np.arange(1, num_pages))
    for s, n in enumerate(pages_needed):
        pages, free = free[:n], free[n:]
        block_tables[s, :n] = pages
        # Only positions < kv_len hold data; the tail of the last page stays poisoned too.
        for pos in range(kv_lens[s]):
            page, off = pages[pos // page_size], pos % page_size
            k_pages[page, off] = rng.standard_normal((num_kv_heads, head_dim))
            v_pages[page, off] = rng.standard_normal((num_kv_heads, head_dim))

    q = np.full((num_tokens, num_heads, head_dim), fill, np.float32)
    q[: sum(q_lens)] = rng.standard_normal((sum(q_lens), num_heads, head_dim))
    cu_q_lens = np.full(num_seqs + 1, sum(q_lens), np.int32)
    cu_q_lens[: num_real + 1] = np.concatenate([[0], np.cumsum(q_lens)])
    kv = np.zeros(num_seqs, np.int32)
    kv[:num_real] = kv_lens
    return RaggedCase(
        q=jnp.asarray(q, dtype),
        k_pages=jnp.asarray(k_pages, dtype),
        v_pages=jnp.asarray(v_pages, dtype),
        block_tables=jnp.asarray(block_tables),
        kv_lens=jnp.asarray(kv),
        cu_q_lens=jnp.asarray(cu_q_lens),
        scale=head_dim**-0.5,
    )


def random_ragged_case(
    rng: np.random.Generator, *, kv_heads=(1, 2), page_sizes=(16, 32), head_dims=(64, 128), max_seqs: int = 6,
    max_pages: int = 5, pages_per_seq: int = 6,
) -> tuple[RaggedCase, int | None]:
    """A random float32 batch (decodes and prefill chunks, padding tokens and sequences) and a
    random sliding window (None half the time)."""
    group = int(rng.choice([1, 3, 4, 8]))
    num_kv_heads = int(rng.choice(kv_heads))
    page_size = int(rng.choice(page_sizes))
    head_dim = int(rng.choice(head_dims))
    num_seqs = int(rng.integers(1, max_seqs + 1))
    kv_lens = [int(x) for x in rng.integers(1, max_pages * page_size, num_seqs)]
    q_lens = [int(rng.integers(0, kv + 1)) if rng.random() < 0.5 else min(1, kv) for kv in kv_lens]
    window = None if rng.random() < 0.5 else int(rng.integers(1, 3 * page_size))
    case = make_ragged_case(
        rng, q_lens, kv_lens, num_heads=group * num_kv_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        page_size=page_size, dtype=jnp.float32, num_tokens=sum(q_lens) + int(rng.integers(0, 9)),
        num_seqs=num_seqs + int(rng.integers(0, 3)), pages_per_seq=pages_per_seq,
    )
    return case, window


def reference_f64(case: RaggedCase, sliding_window: int | None = None) -> np.ndarray:
    """Float64 numpy attention that touches only the positions each query may see.

    Padding tokens and queries with nothing visible get zeros.
    """
    q = np.asarray(case.q.astype(jnp.float32), np.float64)
    k_pages = np.asarray(case.k_pages.astype(jnp.float32), np.float64)
    v_pages = np.asarray(case.v_pages.astype(jnp.float32), np.float64)
    block_tables, kv_lens, cu = (np.asarray(x) for x in (case.block_tables, case.kv_lens, case.cu_q_lens))
    num_tokens, num_heads, head_dim = q.shape
    page_size, num_kv_heads = k_pages.shape[1], k_pages.shape[2]
    group = num_heads // num_kv_heads
    out = np.zeros((num_tokens, num_heads, head_dim))
    for s in range(len(kv_lens)):
        q_len, kv_len = int(cu[s + 1] - cu[s]), int(kv_lens[s])
        pos = np.arange(kv_len)
        pages = block_tables[s, pos // page_size]
        k = k_pages[pages, pos % page_size]  # [kv_len, K, H]
        v = v_pages[pages, pos % page_size]
        for j in range(q_len):
            t, q_pos = cu[s] + j, kv_len - q_len + j
            lo = 0 if sliding_window is None else max(0, q_pos - sliding_window + 1)
            if q_pos < 0 or lo > q_pos:
                continue
            for n in range(num_heads):
                kh = n // group
                scores = k[lo : q_pos + 1, kh] @ q[t, n] * case.scale
                p = np.exp(scores - scores.max())
                out[t, n] = (p / p.sum()) @ v[lo : q_pos + 1, kh]
    return out


def relative_error(out: jax.Array, ref: np.ndarray) -> float:
    out = np.asarray(out.astype(jnp.float32), np.float64)
    assert np.isfinite(out).all(), "kernel output has NaN/inf (read an unused page or padding?)"
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
