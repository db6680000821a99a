"""Engine configuration: everything about how a model is served, as one frozen dataclass."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Options of `LLM(...)` and the CLI. Validated on construction."""

    model: str | None = None
    """A jpaged checkpoint, an HF folder, a .gguf file, or None for the embedded default model.
    With load_format="dummy", a config.json (or a folder holding one)."""
    dtype: str = "auto"
    """Parameter and KV dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16."""
    load_format: str = "auto"
    """auto: load the checkpoint's weights; dummy: random weights of the config's shapes."""
    max_model_len: int | None = None
    """Longest sequence (prompt + output) in tokens; None = min(model's max positions, 2048)."""
    block_size: int = 16
    """Tokens per KV page (a power of two)."""
    num_kv_blocks: int | None = None
    """KV pages per layer including the null page; None = sized from the memory budget."""
    kv_cache_memory_gib: float | None = None
    """KV budget in GiB per device; None = gpu_memory_utilization of an accelerator, or 2 GiB of host memory."""
    gpu_memory_utilization: float = 0.9
    """Fraction of accelerator memory jpaged may hold (weights + KV), in (0, 1]."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of identical prompt prefixes."""
    max_num_seqs: int = 16
    """Most sequences in one step."""
    max_num_batched_tokens: int = 256
    """Token budget of one step (prefill chunks + decode tokens)."""
    attn_backend: str = "auto"
    """auto (pallas on a GPU; on a CPU for float32 the C++ kernel or xla, whichever a cached
    one-time measurement finds faster here), cpu, xla, pallas."""
    linear_backend: str = "auto"
    """Projections: auto (xla on a GPU; on a CPU for float32 the faster of the C++ kernel and xla,
    as measured once, and for packed weights the C++ packed kernel), cpu, xla, pallas (packed
    weights through the Pallas GPU kernel)."""
    quantization: str = "auto"
    """Weights: auto (as the checkpoint holds them: a GGUF's 4/8-bit blocks packed, float as float),
    none (float: packed weights unpacked at load), int8, int4, int4-g128 (round-to-nearest group
    quantization of a float checkpoint's layers at load; jpaged.quantization)."""
    warmup: str = "lazy"
    """When step shapes are compiled: full (every bucket before the engine is ready: no compile
    while serving; `jpaged serve`'s default) or lazy (a shape when a step first needs it; the
    default of LLM and `jpaged generate`). Compiled executables are kept on disk either way."""
    seed: int = 0
    """Seed of the engine's generator (per-request seeds of requests that give none; dummy weights)."""
    tensor_parallel_size: int = 1
    """Devices the model is split over (Megatron-style, heads and MLP columns; jpaged.parallel).
    It must divide the attention heads and the MLP width, and divide the KV heads or be a multiple
    of them (then KV heads are repeated). 1 = one device, no mesh."""

    def __post_init__(self):
        def check(ok: bool, field: str, rule: str):
            if not ok:
                raise ValueError(f"{field} must be {rule}, got {getattr(self, field)!r}")

        check(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype", "auto|float32|bfloat16|float16")
        check(self.load_format in ("auto", "dummy"), "load_format", "auto|dummy")
        check(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", ">= 1")
        check(self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0, "block_size", "a power of two")
        check(self.num_kv_blocks is None or self.num_kv_blocks >= 2, "num_kv_blocks", ">= 2")
        check(self.kv_cache_memory_gib is None or self.kv_cache_memory_gib > 0, "kv_cache_memory_gib", "> 0")
        check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "in (0, 1]")
        check(self.max_num_seqs >= 1, "max_num_seqs", ">= 1")
        check(self.warmup in ("full", "lazy"), "warmup", "full|lazy")
        check(self.quantization in ("auto", "none", "int8", "int4", "int4-g128"), "quantization",
              "auto|none|int8|int4|int4-g128")
        check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", ">= 1")
        check(self.tensor_parallel_size >= 1, "tensor_parallel_size", ">= 1")
