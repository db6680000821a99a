"""Cross-lowering the kernels for CUDA on a CPU-only machine.

Interpret mode accepts programs Triton rejects (non-power-of-two blocks, unsupported ops), so
every public function is also lowered through the Pallas -> Triton path for an abstract
H100 and the Triton custom call must appear in the StableHLO. Where the `triton` package is
installed (it comes with torch), the Triton IR is further compiled to PTX and a cubin for
sm_90, which catches what only Triton's own passes reject (dot shapes, layouts, shared memory).
"""

from __future__ import annotations

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import triton as pltriton

import pallas_kernels
from kernel_cases import H100, lower_for_cuda


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


# -- the whole tensor-parallel step for 8 H100s ---------------------------------------------------

def _blocks(text: str, opener: str) -> list[tuple[str, str]]:
    """(opening line, body) of every region whose first line contains `opener`, found by
    indentation: the MLIR printer closes a region at its opening line's indent."""
    lines, found, i = text.splitlines(), [], 0
    while i < len(lines):
        if opener in lines[i]:
            indent = len(lines[i]) - len(lines[i].lstrip())
            j = i + 1
            while not (lines[j].startswith(" " * indent + "}") and lines[j][indent] == "}"):
                j += 1
            found.append((lines[i], "\n".join(lines[i + 1 : j])))
            i = j
        i += 1
    return found


def test_tensor_parallel_step_lowers_for_8_h100s():
    """The runner's forward step over a "tp" mesh of 8 abstract H100s: Llama-3-8B's shapes, all
    32 layers, bfloat16, the Pallas attention (~2 s to lower on a CPU).

    What a lowering shows: the Triton kernel runs inside shard_map (sdy.manual_computation)
    on one device's heads, every weight enters with the sharding table's split, and the
    program asks for no collective and no resharding itself. What it cannot show: the
    all-reduces after o_proj / down_proj are inserted by XLA's SPMD partitioner when the
    program is compiled, and compiling for CUDA needs a CUDA PJRT client (jax's deviceless GPU
    compilation still wants the CUDA plugin: jax-ml/jax#23971, #28376). Those collectives are
    counted on the same step compiled for 8 host devices (tests/parallel/test_step_hlo.py).
    """
    from jax.sharding import AxisType

    from tests.parallel.step_program import llama3_8b, sharded_step, weight_shardings

    config, tp = llama3_8b(), 8
    device = jax.sharding.AbstractDevice(**H100)
    mesh = jax.sharding.AbstractMesh((tp,), ("tp",), axis_types=(AxisType.Auto,), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        step, args = sharded_step(config, mesh, dtype=jnp.bfloat16, backend="pallas", tokens=64, seqs=8)
        text = step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    assert 'sdy.mesh @mesh = <["tp"=8]>' in text
    # The Triton call lives in one outlined function, called once per layer, only from inside
    # the per-shard computations, on one device's 32 / 8 query heads and 8 / 8 KV heads.
    kernel_funcs = [head for head, body in _blocks(text, "func.func ") if pltriton.CUSTOM_CALL_TARGET_NAME in body]
    assert len(kernel_funcs) == 1
    name = kernel_funcs[0].split("@", 1)[1].split("(", 1)[0]
    operand_types = re.findall(r"%arg\d+: (tensor<[^>]*>)", kernel_funcs[0])
    pool = f"tensor<{config.num_layers * 1024}x16x1x128xbf16>"  # every layer's 1024 pages, read in place
    assert operand_types[:3] == ["tensor<64x4x128xbf16>", pool, pool]
    manual = _blocks(text, "sdy.manual_computation(")
    assert len(manual) == config.num_layers
    assert all(body.count(f"call @{name}(") == 1 for _, body in manual)
    assert text.count(f"call @{name}(") == config.num_layers, "called from outside shard_map"
    # The program itself gathers nothing and moves no weight: no explicit collective, no
    # resharding, and every weight argument carries the table's sharding.
    for op in ("all_gather", "all_reduce", "all_to_all", "reduce_scatter", "collective_permute"):
        assert f"stablehlo.{op}" not in text and f"sdy.{op}" not in text
    assert "sdy.reshard" not in text and "sdy.sharding_constraint" not in text
    main = text[text.index("func.func public @main(") :].split("\n", 1)[0]
    arg_shardings = re.findall(r"%arg\d+: tensor<[^>]*> \{sdy\.sharding = #sdy\.sharding<@mesh, \[([^\]]*)\]>", main)
    state_names = [".".join(str(getattr(k, "key", k)) for k in path[:-1])
                   for path, _ in jax.tree_util.tree_flatten_with_path(args[0])[0]]
    table = weight_shardings(config, tp)
    assert sorted(state_names) == sorted(table)
    for name, dims in zip(state_names, arg_shardings):
        spec = tuple(table[name]) + (None,) * (dims.count("{") - len(table[name]))
        assert dims == ", ".join('{"tp"}' if axis == "tp" else "{}" for axis in spec), name
