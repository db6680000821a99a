"""The Pallas Triton lowering, which every GPU kernel here uses, is deprecated since jax 0.11.0
("will be removed in a future version"). This test fails, saying what to do, on the first jax
that no longer offers it, instead of every kernel test failing on an ImportError."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from kernel_cases import lower_for_cuda

WHAT_TO_DO = (
    "jax {version} no longer offers the Pallas Triton lowering ({problem}). pallas_kernels/decode.py and "
    "ragged.py lower only through it: move them to Mosaic GPU (jax.experimental.pallas.mosaic_gpu, "
    "plgpu.kernel), following the plan in pallas_kernels/README.md ('Moving to Mosaic GPU'), and test the "
    "move on a GPU; until then pin jax below {version} in pyproject.toml."
)


def _fail(problem: str) -> None:
    pytest.fail(WHAT_TO_DO.format(version=jax.__version__, problem=problem), pytrace=False)


def test_triton_lowering_available():
    try:
        from jax.experimental.pallas import triton as pltriton
    except ImportError as e:
        _fail(f"import jax.experimental.pallas.triton: {e}")
    params = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams", None)
    if params is None:
        _fail("jax.experimental.pallas.triton has no CompilerParams")

    def add_one(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0

    call = pl.pallas_call(add_one, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32),
                          compiler_params=params(num_warps=1, num_stages=1))
    try:
        text = lower_for_cuda(call, jax.ShapeDtypeStruct((16,), jnp.float32))
    except Exception as e:  # noqa: BLE001 - whatever the removal raises, the message says what to do
        _fail(f"lowering a pallas_call for CUDA raised {type(e).__name__}: {e}")
    if pltriton.CUSTOM_CALL_TARGET_NAME not in text:
        _fail(f"a pallas_call for CUDA no longer lowers to the {pltriton.CUSTOM_CALL_TARGET_NAME} custom call")
