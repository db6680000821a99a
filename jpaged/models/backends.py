"""Which kernels a model runs: the attention backend and the projections' ("linear") backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jpaged.models.attention import BACKENDS
from jpaged.models.kernel_choice import cpu_kernel_verdict
from pallas_kernels.cpu_build import unavailable_reason

# pallas: the Pallas W4A16/W8A16 kernel for packed projections on a GPU (float ones stay XLA dots).
LINEAR_BACKENDS = ("xla", "cpu", "pallas")


def _cpu_kernel_problem(dtype) -> str | None:
    """Why the C++ CPU kernels cannot serve this device and dtype, or None."""
    if jax.default_backend() != "cpu" or jnp.dtype(dtype) != jnp.float32:
        return f"it needs the CPU and float32, not {jax.default_backend()} and {jnp.dtype(dtype).name}"
    return unavailable_reason()


def _resolve(kind: str, name: str, choices, dtype, on_gpu: str, operation: str) -> str:
    if name == "auto":
        if jax.default_backend() == "gpu":
            return on_gpu
        if _cpu_kernel_problem(dtype) is not None:
            return "xla"
        return "cpu" if cpu_kernel_verdict()[operation] else "xla"
    if name not in choices:
        raise ValueError(f"unknown {kind} backend {name!r}; available: auto, {', '.join(choices)}")
    if name == "cpu" and (problem := _cpu_kernel_problem(dtype)) is not None:
        raise ValueError(f"{kind} backend 'cpu' is unavailable: {problem}")
    if kind == "linear" and name == "pallas" and jax.default_backend() != "gpu":
        raise ValueError(f"linear backend 'pallas' needs a GPU, not {jax.default_backend()}")
    return name


def resolve_backend(name: str, dtype=jnp.float32) -> str:
    """Maps attention backend "auto" to a concrete one for the default device and the KV dtype.

    auto: the Pallas kernel on a GPU; on a CPU the C++ kernel for float32 when it can be built
    and measures faster than the XLA formulation on this machine (kernel_choice), else XLA.
    """
    return _resolve("attention", name, tuple(BACKENDS), dtype, on_gpu="pallas", operation="attention")


def resolve_linear_backend(name: str, dtype=jnp.float32, *, tensor_parallel_size: int = 1,
                           packed: bool = False) -> str:
    """Maps linear backend "auto" to a concrete one for the default device and the weight dtype.

    auto: on a CPU the C++ kernel for float32 when it can be built and measures faster than
    XLA's dot on this machine (kernel_choice), else XLA's dot. With tensor parallelism always
    XLA's dot: XLA partitions it from the weights' shardings, while the C++ kernel reads a packed
    layout the sharding table does not split (it would need its own shard_map).
    pallas (packed weights on a GPU) is an explicit choice until a GPU measures it against
    XLA's unpack + dot. With packed weights (jpaged.models.packed) auto takes the C++ packed
    kernel on a CPU wherever it can be built: it reads 0.5-1 byte a weight where XLA unpacks the whole matrix each step
    (benchmarks/packed_linear.py measures both).
    """
    if tensor_parallel_size > 1 and name in ("auto", "cpu", "pallas"):
        if name != "auto":
            raise ValueError(f"linear backend {name!r} is unavailable with tensor_parallel_size {tensor_parallel_size}; "
                             "use xla (or auto)")
        return "xla"
    if packed and name == "auto" and jax.default_backend() == "cpu":
        return "cpu" if _cpu_kernel_problem(dtype) is None else "xla"
    return _resolve("linear", name, LINEAR_BACKENDS, dtype, on_gpu="xla", operation="linear")
