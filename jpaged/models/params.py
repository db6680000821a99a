"""The parameter tree: the model's NNX state as a plain nested dict with string keys.

That dict is what checkpoints hold and what conversion fills, e.g.
`{"embed": [V, D], "layers": {"0": {"attn": {"q_proj": {"kernel": [D, N*H]}}, ...}}, "norm": {...}}`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jpaged.models.config import ModelConfig
from jpaged.models.llama import FUSED, CausalLM, fused_widths, fuses
from jpaged.models.packed import LEAVES, Quantization
from pallas_kernels.cpu_linear import pack_columns
from pallas_kernels.cpu_linear_packed import join_panels, narrow_panels, pack_panels

ParamTree = dict[str, Any]


def _stringify_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _stringify_keys(v) for k, v in tree.items()}
    return tree


def _nnx_keys(tree: Any, like: Any) -> Any:
    """Gives tree the key types of `like` (NNX lists are keyed by int)."""
    if isinstance(like, dict):
        return {k: _nnx_keys(tree[str(k)], v) for k, v in like.items()}
    return tree


def _abstract_model(config: ModelConfig, backend: str, linear: str, dtype, mesh: Mesh | None = None,
                    quant: Quantization | None = None) -> CausalLM:
    """The model with shape-only parameters (rngs=None): nothing is computed or allocated."""
    return CausalLM(config, backend=backend, linear=linear, dtype=dtype, rngs=None, mesh=mesh, quant=quant)


def _pure_dict(state: nnx.State) -> dict:
    return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def abstract_params(config: ModelConfig, dtype=jnp.float32, quant: Quantization | None = None) -> ParamTree:
    """The expected tree of jax.ShapeDtypeStruct for a config (and its packed modules, if any),
    without allocating anything."""
    model = _abstract_model(config, "xla", "xla", dtype, quant=quant)
    return _stringify_keys(_pure_dict(nnx.state(model, nnx.Param)))


def _pack_for_cpu(config: ModelConfig, params: ParamTree, quant: Quantization) -> ParamTree:
    """Every projection in the C++ kernels' panel layouts (a copy). A tied lm_head gets its own
    panels, made from the embedding (float, or packed: the packed embedding's rows are its columns)."""
    flat = flatten(params)
    if config.tie_word_embeddings:
        if "embed" in quant:
            flat.update({f"lm_head.{leaf}": flat[f"embed.{leaf}"] for leaf in LEAVES})
        else:
            flat["lm_head.kernel"] = params["embed"].T
    modules = {m: fmt for m, fmt in quant.items() if m != "embed"}
    if config.tie_word_embeddings and "embed" in quant:
        modules["lm_head"] = quant["embed"]
    pack = jax.jit(pack_columns)
    panels = {bits: jax.jit(functools.partial(pack_panels, bits=bits)) for bits in (4, 8)}
    out = {name: pack(w) if name.endswith(".kernel") else w for name, w in flat.items()}
    for module, fmt in modules.items():
        packed = panels[fmt.bits](*(flat[f"{module}.{leaf}"] for leaf in LEAVES))
        out.update({f"{module}.{leaf}": x for leaf, x in zip(LEAVES, packed)})
    out, modules = _fuse_panels(config, out, modules)
    for module, fmt in modules.items():
        q, scales, mins = (out.pop(f"{module}.{leaf}") for leaf in LEAVES)
        out[f"{module}.panels"] = jnp.asarray(join_panels(q, *narrow_panels(scales, mins, fmt.bits)))
    return unflatten(out)


def _fuse_panels(config: ModelConfig, flat: dict[str, Any],
                 modules: Quantization) -> tuple[dict[str, Any], Quantization]:
    """Concatenates the panels (and biases) of the projections the model fuses (llama.fuses).
    Returns them and `modules` (packed module -> format) with the fused names for their parts."""
    widths = fused_widths(config)
    modules = dict(modules)
    for i in range(config.num_layers):
        for block, fused in (("attn", "qkv_proj"), ("mlp", "gate_up_proj")):
            parts = [f"layers.{i}.{block}.{name}" for name in FUSED[fused]]
            if not fuses("cpu", widths[fused], [modules.get(p) for p in parts]):
                continue
            for leaf in {name.rsplit(".", 1)[1] for name in flat if name.startswith(parts[0] + ".")}:
                # Panels [P, ...] and biases [N] both join along their first axis.
                flat[f"layers.{i}.{block}.{fused}.{leaf}"] = jnp.concatenate([flat.pop(f"{p}.{leaf}") for p in parts])
            if parts[0] in modules:
                modules[f"layers.{i}.{block}.{fused}"] = [modules.pop(p) for p in parts][0]
    return flat, modules


def flatten(tree: ParamTree, prefix: str = "") -> dict[str, Any]:
    """{"layers": {"0": {"w": x}}} -> {"layers.0.w": x}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict[str, Any]) -> ParamTree:
    tree: ParamTree = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def build_model(
    config: ModelConfig, params: ParamTree, *, backend: str = "xla", linear: str = "xla", dtype=jnp.float32,
    mesh: Mesh | None = None, quant: Quantization | None = None,
) -> CausalLM:
    """A CausalLM whose parameters are the given arrays (no copy, no random init).

    With linear="cpu" every projection kernel [in, out] is packed for the C++ kernel (a copy;
    a tied lm_head gets its own, packed from the embedding). With a mesh (tensor parallelism)
    the params are already placed by jpaged.parallel's table and the attention runs per device.
    quant names the packed modules (jpaged.models.packed); with linear="cpu" each becomes one
    array of the packed kernel's panels (pallas_kernels.cpu_linear_packed.join_panels).
    """
    quant = quant or {}
    if linear == "cpu":
        params = _pack_for_cpu(config, params, quant)
    graphdef, state = nnx.split(_abstract_model(config, backend, linear, dtype, mesh, quant))
    nnx.replace_by_pure_dict(state, _nnx_keys(params, _pure_dict(state)))
    return nnx.merge(graphdef, state)


def random_params(
    config: ModelConfig, dtype, seed: int = 0, *,
    transform: Callable[[str, jax.Array], jax.Array] | None = None,
    shardings: dict[str, jax.sharding.Sharding] | None = None,
) -> ParamTree:
    """Random weights of the config's shapes, made on the default device in one jitted call.

    transform(dotted name, array) reshapes each one inside that call, and `shardings` {dotted
    name: Sharding} places the results: each device makes only its shard (the random bits are
    the same whatever the sharding), so a model too big for one device never is on one.
    """

    def init():
        model = CausalLM(config, backend="xla", dtype=dtype, rngs=nnx.Rngs(seed))
        params = _stringify_keys(_pure_dict(nnx.state(model, nnx.Param)))
        if transform is not None:
            params = unflatten({name: transform(name, x) for name, x in flatten(params).items()})
        return params

    placed = {} if shardings is None else {"out_shardings": unflatten(shardings)}
    return _stringify_keys(jax.jit(init, **placed)())
