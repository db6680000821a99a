"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) in Flax NNX over a paged KV cache.

One flat batch of T tokens from any number of sequences goes through every layer; attention
writes the new K/V into each layer's page pool and reads history through block tables. The
model never sees requests or schedulers, only arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jpaged.models.attention import AttentionMetadata, write_and_attend
from jpaged.models.config import ModelConfig
from jpaged.models.packed import LEAVES, PackedFormat, Quantization, packed_matmul_xla, packed_rows
from jpaged.models.rope import apply_rope, inverse_frequencies, rope_tables
from jpaged.typing import KVCache
from pallas_kernels.cpu_linear import PANEL, linear_cpu
from pallas_kernels.cpu_linear_packed import linear_cpu_packed
from pallas_kernels.packed_matmul import packed_matmul

# Random init for dummy weights (benchmarks of large shapes): the usual LLM init scale.
_INIT = nnx.initializers.normal(stddev=0.02)


def _param(init, rngs: nnx.Rngs | None, shape: tuple[int, ...], dtype) -> nnx.Param:
    """A parameter's initial value; with rngs=None only its shape and dtype, for a model whose
    weights are loaded next (tracing the inits under eval_shape took ~1 s for 30 layers)."""
    if rngs is None:
        return nnx.Param(jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))
    return nnx.Param(init(rngs.params(), shape, dtype))


def _packed_params(module: nnx.Module, fmt: PackedFormat, in_dim: int, out_dim: int, rngs: nnx.Rngs | None):
    """qweight/scales/mins of a [in, out] kernel (jpaged.models.packed); zeros for random init."""
    for leaf, (shape, dtype) in fmt.shapes(in_dim, out_dim).items():
        setattr(module, leaf, _param(nnx.initializers.zeros, rngs, shape, dtype))


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out], stored in the model dtype, or packed.

    With linear backend "cpu" the kernel is held packed for the C++ kernel
    (pallas_kernels.cpu_linear.pack_columns, [ceil(out / 32), in, 32]); build_model packs it.
    With `packed` (a PackedFormat) the kernel is three leaves, qweight/scales/mins [out, ...],
    read by XLA (unpacked inside the step) or, with backend "pallas", by the Pallas GPU kernel
    (pallas_kernels.packed_matmul); with backend "cpu" it is one leaf, `panels`, for the C++
    kernel (cpu_linear_packed.join_panels).
    """

    def __init__(self, in_dim: int, out_dim: int, *, bias: bool, dtype, rngs: nnx.Rngs | None, backend: str = "xla",
                 packed: PackedFormat | None = None):
        if packed is None:
            self.kernel = _param(_INIT, rngs, (in_dim, out_dim), dtype)
        elif backend == "cpu":
            # Shape-only: build_model puts cpu_linear_packed.join_panels' array here.
            self.panels = _param(nnx.initializers.zeros, rngs, (-(-out_dim // PANEL), 0), jnp.uint32)
        else:
            _packed_params(self, packed, in_dim, out_dim, rngs)
        self.bias = _param(nnx.initializers.zeros, rngs, (out_dim,), dtype) if bias else None
        self.out_dim = out_dim
        self.backend = backend
        self.packed = packed

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.packed is not None and self.backend == "cpu":
            y = linear_cpu_packed(x, self.panels[...], self.packed, self.out_dim)
        elif self.packed is not None:
            leaves = (self.qweight[...], self.scales[...], self.mins[...])
            if self.backend == "pallas":
                rows = x.reshape(-1, x.shape[-1])
                y = packed_matmul(rows, *leaves, bits=self.packed.bits, group_size=self.packed.group_size)
                y = y.reshape(*x.shape[:-1], self.out_dim)
            else:
                y = packed_matmul_xla(x, *leaves, self.packed)
        elif self.backend == "cpu":
            y = linear_cpu(x, self.kernel[...], self.out_dim)
        else:
            y = x @ self.kernel[...]
        return y + self.bias[...] if self.bias is not None else y


# Projections of one input that the C++ kernels run as one call: (fused name, its parts).
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fused_widths(config: ModelConfig) -> dict[str, list[int]]:
    """Output widths of each fused projection's parts, in FUSED's order."""
    n, k, h, f = config.num_heads, config.num_kv_heads, config.head_dim, config.intermediate_size
    return {"qkv_proj": [n * h, k * h, k * h], "gate_up_proj": [f, f]}


def fuses(linear: str, widths: list[int], formats: list[PackedFormat | None]) -> bool:
    """Whether projections of one input run as one kernel call, their columns side by side.

    Only with the C++ kernels (linear "cpu", one device): a decode step's projections are so
    small that each call's fixed cost (dispatch, handing work to XLA's pool) is a good
    part of it, and independent calls run concurrently on two cores and contend. Their columns
    are laid out in 32-wide panels, so the parts concatenate panel-wise when each width is a
    whole number of panels and all share one format.
    """
    return linear == "cpu" and all(w % PANEL == 0 for w in widths) and len(set(formats)) == 1


class PackedEmbedding(nnx.Module):
    """A packed [V, D] table (qweight/scales/mins [V, ...]): looked up row-wise and unpacked."""

    def __init__(self, vocab: int, dim: int, fmt: PackedFormat, *, dtype, rngs: nnx.Rngs | None):
        _packed_params(self, fmt, dim, vocab, rngs)
        self.fmt, self.dtype = fmt, dtype

    def leaves(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return tuple(getattr(self, leaf)[...] for leaf in LEAVES)

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        return packed_rows(*self.leaves(), self.fmt, token_ids, self.dtype)  # [T, D]


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, scaled after casting back (as transformers does)."""

    def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs | None):
        self.scale = _param(nnx.initializers.ones, rngs, (dim,), dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * normed.astype(x.dtype)


class Attention(nnx.Module):
    """Self-attention over the paged KV pool. With a mesh the paged part runs per device on its
    heads (write_and_attend); the projections are ordinary matmuls XLA partitions from the
    parameters' shardings."""

    def __init__(self, config: ModelConfig, *, backend: str, linear: str, dtype, rngs: nnx.Rngs | None,
                 mesh: Mesh | None = None, quant: Quantization | None = None, prefix: str = ""):
        d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        quant = quant or {}

        def linear_(name: str, in_dim: int, out_dim: int, bias: bool) -> Linear:
            return Linear(in_dim, out_dim, bias=bias, dtype=dtype, rngs=rngs, backend=linear,
                          packed=quant.get(prefix + name))

        widths = fused_widths(config)["qkv_proj"]
        # Each attribute assigned once: NNX fixes an attribute first set to None as static.
        if fuses(linear, widths, [quant.get(prefix + name) for name in FUSED["qkv_proj"]]):
            self.qkv_proj = Linear(d, sum(widths), bias=config.qkv_bias, dtype=dtype, rngs=rngs, backend=linear,
                                   packed=quant.get(prefix + "q_proj"))
            self.q_proj = self.k_proj = self.v_proj = None
        else:
            self.qkv_proj = None
            self.q_proj = linear_("q_proj", d, n * h, config.qkv_bias)
            self.k_proj = linear_("k_proj", d, k * h, config.qkv_bias)
            self.v_proj = linear_("v_proj", d, k * h, config.qkv_bias)
        self.o_proj = linear_("o_proj", n * h, d, config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(h, config.rms_norm_eps, dtype=dtype, rngs=rngs)
            self.k_norm = RMSNorm(h, config.rms_norm_eps, dtype=dtype, rngs=rngs)
        else:
            self.q_norm = self.k_norm = None
        self.config = config
        self.backend = backend
        self.mesh = mesh

    def __call__(
        self, x: jax.Array, rope: tuple[jax.Array, jax.Array], kv: KVCache, meta: AttentionMetadata, layer: int
    ) -> tuple[jax.Array, KVCache]:
        """x [T, D] and the step's rope_tables (cos, sin [T, 1, H/2]) -> [T, D] and the KV pools
        with this step's k, v written to layer `layer`'s pages."""
        num_tokens = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = jnp.split(self.qkv_proj(x), np.cumsum([self.num_heads, self.num_kv_heads]) * self.head_dim, -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)  # [T, N, H]
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)  # [T, K, H]
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, *rope)
        k = apply_rope(k, *rope)
        out, kv = write_and_attend(
            q, k, v, kv, meta, layer=layer, num_layers=self.config.num_layers,
            scale=self.head_dim**-0.5, backend=self.backend, sliding_window=self.config.sliding_window, mesh=self.mesh,
        )
        return self.o_proj(out.reshape(num_tokens, -1)), kv


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, linear: str, dtype, rngs: nnx.Rngs | None,
                 quant: Quantization | None = None, prefix: str = ""):
        d, f, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        quant = quant or {}

        def linear_(name: str, in_dim: int, out_dim: int) -> Linear:
            return Linear(in_dim, out_dim, bias=b, dtype=dtype, rngs=rngs, backend=linear,
                          packed=quant.get(prefix + name))

        parts = [quant.get(prefix + name) for name in FUSED["gate_up_proj"]]
        if fuses(linear, fused_widths(config)["gate_up_proj"], parts):
            self.gate_up_proj = Linear(d, 2 * f, bias=b, dtype=dtype, rngs=rngs, backend=linear,
                                       packed=quant.get(prefix + "gate_proj"))
            self.gate_proj = self.up_proj = None
        else:
            self.gate_up_proj = None
            self.gate_proj = linear_("gate_proj", d, f)
            self.up_proj = linear_("up_proj", d, f)
        self.down_proj = linear_("down_proj", f, d)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.gate_up_proj is not None:
            gate, up = jnp.split(self.gate_up_proj(x), 2, -1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, backend: str, linear: str, dtype, rngs: nnx.Rngs | None,
                 mesh: Mesh | None = None, quant: Quantization | None = None, prefix: str = ""):
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(config, backend=backend, linear=linear, dtype=dtype, rngs=rngs, mesh=mesh,
                              quant=quant, prefix=prefix + "attn.")
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(config, linear=linear, dtype=dtype, rngs=rngs, quant=quant, prefix=prefix + "mlp.")

    def __call__(self, x, rope: tuple[jax.Array, jax.Array], kv: KVCache, meta: AttentionMetadata, layer: int):
        attn_out, kv = self.attn(self.input_norm(x), rope, kv, meta, layer)
        x = x + attn_out
        return x + self.mlp(self.post_attn_norm(x)), kv


class CausalLM(nnx.Module):
    """Decoder-only LM. `__call__` runs the layers; `logits` projects selected hidden states.

    backend names the attention backend, linear the projections' ("xla", or "cpu": the C++
    kernel over packed weights; there a tied lm_head is a packed copy of the embedding, since
    the kernel reads only that layout: V x D more floats for 2-3 ms less per decode step).
    mesh (tensor parallelism) reaches only the attention's shard_map; the rest is sharding-free.
    quant maps module paths to packed formats (jpaged.models.packed); "embed" packed makes the
    embedding a PackedEmbedding, which a tied lm_head then reads as its packed kernel.
    """

    def __init__(
        self, config: ModelConfig, *, backend: str = "xla", linear: str = "xla", dtype=jnp.float32,
        rngs: nnx.Rngs | None, mesh: Mesh | None = None, quant: Quantization | None = None,
    ):
        quant = quant or {}
        self.config = config
        v, d = config.vocab_size, config.hidden_size
        if "embed" in quant:
            self.embed = PackedEmbedding(v, d, quant["embed"], dtype=dtype, rngs=rngs)
        else:
            self.embed = _param(_INIT, rngs, (v, d), dtype)
        self.layers = nnx.List([
            DecoderLayer(config, backend=backend, linear=linear, dtype=dtype, rngs=rngs, mesh=mesh, quant=quant,
                         prefix=f"layers.{i}.")
            for i in range(config.num_layers)
        ])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, rngs=rngs)
        tied_format = quant.get("embed") if config.tie_word_embeddings else None
        self.lm_head = (
            None
            if config.tie_word_embeddings and linear != "cpu"
            else Linear(d, v, bias=False, dtype=dtype, rngs=rngs, backend=linear,
                        packed=tied_format or quant.get("lm_head"))
        )

    def __call__(
        self, token_ids: jax.Array, positions: jax.Array, kv_caches: KVCache, meta: AttentionMetadata
    ) -> tuple[jax.Array, KVCache]:
        """token_ids, positions [T] -> hidden states [T, D] (before the final norm) and new KV pools."""
        if isinstance(self.embed, PackedEmbedding):
            x = self.embed(token_ids)  # [T, D]
        else:
            x = self.embed[...][token_ids]  # [T, D]
        rope = rope_tables(positions, inverse_frequencies(self.config))
        for i, layer in enumerate(self.layers):
            x, kv_caches = layer(x, rope, kv_caches, meta, i)
        return x, kv_caches

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, D] (rows picked from __call__'s output) -> float32 logits [B, V]."""
        h = self.norm(hidden)
        if self.lm_head is None and isinstance(self.embed, PackedEmbedding):
            out = packed_matmul_xla(h, *self.embed.leaves(), self.embed.fmt)  # embed [V, D] is the kernel's [N, K]
        elif self.lm_head is None:
            # Contract D of both operands: written as h @ embed.T, XLA:CPU copies the transposed
            # [D, V] embedding every step when B == 1 (15 ms of a 45 ms step for a 135M model).
            out = jax.lax.dot_general(h, self.embed[...], (((1,), (1,)), ((), ())))
        else:
            out = self.lm_head(h)
        return out.astype(jnp.float32)
