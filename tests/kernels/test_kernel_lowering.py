"""Cross-lowering the kernels for CUDA on a CPU-only machine.

Interpret mode accepts programs Triton rejects (non-power-of-two blocks, unsupported ops), so
every public function is also lowered through the Pallas -> Triton path for an abstract
H100 and the Triton custom call must appear in the StableHLO. Where the `triton` package is
installed (it comes with torch), the Triton IR is further compiled to PTX and a cubin for
sm_90, which catches what only Triton's own passes reject (dot shapes, layouts, shared memory).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import triton as pltriton

import pallas_kernels
from kernel_cases import lower_for_cuda

def decode_args(dtype, head_dim, *, batch=4, num_heads=32, num_kv_heads=8, page_size=16, num_pages=256, max_pages=16):
    S = jax.ShapeDtypeStruct
    pool = S((num_pages, page_size, num_kv_heads, head_dim), dtype)
    return (
        S((batch, num_heads, head_dim), dtype), pool, pool,
        S((batch, max_pages), jnp.int32), S((batch,), jnp.int32),
    )


def ragged_args(dtype, head_dim, *, tokens=64, seqs=8, num_heads=32, num_kv_heads=8, page_size=16,
                num_pages=256, max_pages=16):
    S = jax.ShapeDtypeStruct
    pool = S((num_pages, page_size, num_kv_heads, head_dim), dtype)
    return (
        S((tokens, num_heads, head_dim), dtype), pool, pool,
        S((seqs, max_pages), jnp.int32), S((seqs,), jnp.int32), S((seqs + 1,), jnp.int32),
    )


CASES = [
    pytest.param(pallas_kernels.paged_decode_attention, decode_args, {}, id="decode"),
    pytest.param(pallas_kernels.paged_decode_attention, decode_args, dict(batch=64), id="decode-1split"),
    pytest.param(pallas_kernels.ragged_paged_attention, ragged_args, {}, id="ragged-splits"),
    pytest.param(pallas_kernels.ragged_paged_attention, ragged_args, dict(tokens=2048, seqs=16), id="ragged-1split"),
    pytest.param(
        pallas_kernels.ragged_paged_attention, ragged_args, dict(num_heads=12, num_kv_heads=4), id="ragged-G3"
    ),
]


@pytest.mark.parametrize("window", [None, 64])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("fn,make_args,shape_kwargs", CASES)
def test_lowers_to_triton(fn, make_args, shape_kwargs, dtype, head_dim, window):
    args = make_args(dtype, head_dim, **shape_kwargs)
    text = lower_for_cuda(functools.partial(fn, scale=head_dim**-0.5, sliding_window=window), *args)
    assert pltriton.CUSTOM_CALL_TARGET_NAME in text


def test_lowers_with_pool_over_4gib():
    """A pool past 2**32 bytes needs 64-bit pointer offsets (Pallas picks them from the shape)."""
    args = ragged_args(jnp.bfloat16, 128, num_pages=140_000)  # 140k pages x 32 KiB = 4.6 GB
    text = lower_for_cuda(functools.partial(pallas_kernels.ragged_paged_attention, scale=0.1), *args)
    assert pltriton.CUSTOM_CALL_TARGET_NAME in text


def _triton_ir_of(fn, *args) -> list[str]:
    """Triton IR (text) of every pallas_call in fn, captured from the Pallas lowering."""
    # Private jax API: skip (not fail) on a jax that moved it.
    registration = pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
    original = getattr(registration.lowering, "lower_jaxpr_to_triton_module", None)
    if original is None:
        pytest.skip("this jax has no lower_jaxpr_to_triton_module to hook")
    modules = []

    def capture(*a, **k):
        result = original(*a, **k)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registration.lowering, "lower_jaxpr_to_triton_module", capture)
        lower_for_cuda(fn, *args)
    return modules


@pytest.mark.parametrize(
    "fn,make_args,dtype,head_dim",
    [
        (pallas_kernels.paged_decode_attention, decode_args, jnp.bfloat16, 128),
        (pallas_kernels.ragged_paged_attention, ragged_args, jnp.bfloat16, 128),
        (pallas_kernels.ragged_paged_attention, ragged_args, jnp.float16, 64),
        (pallas_kernels.paged_decode_attention, decode_args, jnp.float32, 64),
    ],
    ids=["decode-bf16-128", "ragged-bf16-128", "ragged-f16-64", "decode-f32-64"],
)
def test_triton_compiles_for_sm90(fn, make_args, dtype, head_dim, tmp_path, monkeypatch):
    triton = pytest.importorskip("triton")
    try:
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget
    except ImportError:
        pytest.skip("this triton has no GPUTarget")
    if "nvidia" not in backends:
        pytest.skip("this triton has no CUDA backend")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    modules = _triton_ir_of(functools.partial(fn, scale=0.1), *make_args(dtype, head_dim))
    assert modules
    for i, text in enumerate(modules):
        path = tmp_path / f"kernel{i}.ttir"
        path.write_text(text)
        # num_warps / num_stages as the wrappers pass them.
        kernel = triton.compile(str(path), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
        ptx = kernel.asm["ptx"]
        assert ".local" not in ptx, "register spills"
        if dtype != jnp.float32:  # f32 dots run in IEEE precision on the FMA units
            assert "mma" in ptx, "16-bit dots should use tensor-core MMA"
        assert kernel.metadata.shared <= 227 * 1024, "over the H100's shared memory per block"
