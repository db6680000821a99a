"""Paged-attention and packed-weight matmul kernels: Pallas (Triton lowering) for the GPU,
plain jnp for reference.

Imports only jax and numpy.
"""

from pallas_kernels.decode import paged_decode_attention, paged_decode_attention_reference
from pallas_kernels.packed_matmul import packed_matmul, packed_matmul_reference
from pallas_kernels.ragged import ragged_paged_attention
from pallas_kernels.reference import ragged_paged_attention_reference

__all__ = [
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "packed_matmul",
    "packed_matmul_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
]
