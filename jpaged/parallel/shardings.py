"""Where every parameter lives on the "tp" mesh axis: one table, beside convert/names.py's conversion table.

Megatron-style tensor parallelism over our [in, out] kernels:

    column-parallel  q/k/v, gate/up  kernel [D, out] -> P(None, "tp")   each device: its heads / MLP columns
    row-parallel     o, down         kernel [in, D]  -> P("tp", None)   partial sums, XLA adds one all-reduce
    vocabulary       embed [V, D] -> P("tp", None); lm_head [D, V] -> P(None, "tp")
    replicated       norms; biases of row-parallel layers (added once, after the all-reduce)

Biases of column-parallel layers split with their columns. A column split over heads keeps
whole heads on a device because every dimension split here is a multiple of H times the
number of devices (validate()).
"""

from __future__ import annotations

import re

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jpaged.models.config import ModelConfig
from jpaged.parallel.mesh import TP_AXIS

_LAYER = r"layers\.\d+\."

# (fullmatch of the dotted parameter name, spec). Every parameter matches exactly one rule
# (tests/parallel/test_shardings.py).
PARAM_SPECS: list[tuple[str, P]] = [
    (r"embed", P(TP_AXIS, None)),  # [V, D]: a token's row lives on one device; XLA masks and all-reduces
    (r"lm_head\.kernel", P(None, TP_AXIS)),  # [D, V]: logits come out split by vocabulary
    (_LAYER + r"attn\.[qkv]_proj\.kernel", P(None, TP_AXIS)),  # [D, N*H] / [D, K*H]
    (_LAYER + r"attn\.[qkv]_proj\.bias", P(TP_AXIS)),  # [N*H] / [K*H]
    (_LAYER + r"mlp\.(gate|up)_proj\.kernel", P(None, TP_AXIS)),  # [D, F]
    (_LAYER + r"mlp\.(gate|up)_proj\.bias", P(TP_AXIS)),  # [F]
    (_LAYER + r"attn\.o_proj\.kernel", P(TP_AXIS, None)),  # [N*H, D]
    (_LAYER + r"mlp\.down_proj\.kernel", P(TP_AXIS, None)),  # [F, D]
    (_LAYER + r"(attn\.o_proj|mlp\.down_proj)\.bias", P()),  # [D]
    (r"(.+\.)?(norm|input_norm|post_attn_norm|q_norm|k_norm)\.scale", P()),  # [D] / [H]
]

# Activations and the KV pools, for shard_map and the runner's declared shardings.
HEADS_SPEC = P(None, TP_AXIS, None)  # q, k, v, attention output [T, N or K, H]: split by head
KV_POOL_SPEC = P(None, None, TP_AXIS, None)  # the pools [Y * NP, L, K, H]: each device its KV heads' pages


def vocab_parts(vocab_size: int, tensor_parallel_size: int) -> int:
    """Into how many parts embed, lm_head and so the logits are split by vocabulary: the device
    count when it divides V, else 1 (param_spec keeps an uneven vocabulary whole)."""
    return tensor_parallel_size if vocab_size % tensor_parallel_size == 0 else 1


def logits_spec(vocab_size: int, tensor_parallel_size: int) -> P:
    """The logits [B, V] as the vocabulary-split lm_head leaves them: the sampler reduces over the
    split axis instead of gathering it (jpaged.runner.sampler)."""
    return P(None, TP_AXIS if vocab_parts(vocab_size, tensor_parallel_size) > 1 else None)


def matching_rules(name: str) -> list[int]:
    """Indices of the PARAM_SPECS rules that match a parameter name."""
    return [i for i, (pattern, _) in enumerate(PARAM_SPECS) if re.fullmatch(pattern, name)]


def _packed_float_name(name: str) -> tuple[str, bool] | None:
    """A packed leaf (jpaged.models.packed) -> (the float parameter it stands for, whether its axes
    are that parameter's reversed); None for a float parameter."""
    module, _, leaf = name.rpartition(".")
    if leaf not in ("qweight", "scales", "mins"):
        return None
    # Packed leaves are [out, ...]: a kernel [in, out]'s axes reversed; the embedding's [V, ...] as they are.
    return ("embed", False) if module == "embed" else (f"{module}.kernel", True)


def param_spec(name: str, shape: tuple[int, ...], tensor_parallel_size: int) -> P:
    """The PartitionSpec of one parameter of the given (already KV-repeated) shape.

    A packed leaf (qweight, scales, mins [out, ...]) shards as the float parameter it stands for,
    along the same logical axes (so its own axes reversed for a kernel).
    A split dimension the size does not divide is kept whole: validate() has refused that for
    heads and MLP columns, so only the vocabulary gets here, and an embedding replicated on
    every device is correct, only bigger (a vocabulary padded to a multiple would split it).
    """
    packed = _packed_float_name(name)
    rules = matching_rules(name if packed is None else packed[0])
    if len(rules) != 1:
        raise KeyError(f"parameter {name} matches {len(rules)} sharding rules, expected exactly 1")
    spec = PARAM_SPECS[rules[0]][1]
    if packed is not None and packed[1]:
        spec = P(*reversed(tuple(spec)))
    return P(*(axis if axis is None or shape[i] % tensor_parallel_size == 0 else None for i, axis in enumerate(spec)))


def param_shardings(shapes: dict[str, tuple[int, ...]], mesh: Mesh) -> dict[str, NamedSharding]:
    """{dotted name: NamedSharding} for parameters of the given shapes (flatten(abstract_params(...)))."""
    size = mesh.shape[TP_AXIS]
    return {name: NamedSharding(mesh, param_spec(name, tuple(shape), size)) for name, shape in shapes.items()}


def _problem(config: ModelConfig, size: int) -> str | None:
    """Why a model cannot be split over `size` devices, or None."""
    n, k, f = config.num_heads, config.num_kv_heads, config.intermediate_size
    if n % size:
        return f"does not divide the model's {n} attention heads ({k} KV heads)"
    # KV heads split when there are enough of them, else each is repeated on size // k devices.
    if k >= size and k % size:
        return f"does not divide the model's {k} KV heads ({n} attention heads)"
    if k < size and size % k:
        return f"is not a multiple of the model's {k} KV heads (fewer than the devices, so they must repeat evenly)"
    if f % size:
        return f"does not divide the model's intermediate_size {f}"
    return None


def validate(config: ModelConfig, tensor_parallel_size: int) -> None:
    """Raises ValueError, naming the numbers and the sizes that would work, when the model cannot
    be split over `tensor_parallel_size` devices."""
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    problem = _problem(config, tensor_parallel_size)
    if problem is not None:
        sizes = [s for s in range(1, config.num_heads + 1) if _problem(config, s) is None]
        raise ValueError(
            f"tensor_parallel_size {tensor_parallel_size} {problem}; sizes that work: {', '.join(map(str, sizes))}"
        )
