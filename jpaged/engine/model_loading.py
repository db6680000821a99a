"""From an EngineConfig to a model on the device: weights, tokenizer, KV sizing and buckets."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jpaged import checkpoint, parallel
from jpaged.config import EngineConfig
from jpaged.model_files import jpaged_home, resolve_model
from jpaged.models.config import ModelConfig
from jpaged.models.packed import Quantization
from jpaged.models.params import ParamTree, abstract_params, flatten, random_params
from jpaged.runner.batch import BucketSpec
from jpaged.runner.buckets import power_of_two_buckets, token_buckets
from jpaged.runner.executable_store import ExecutableStore, program_key, tree_signature
from pallas_kernels import cpu_build

logger = logging.getLogger("jpaged")


@dataclasses.dataclass
class LoadedModel:
    folder: Path
    config: ModelConfig  # the checkpoint's
    params: ParamTree  # placed: on one device, or on the mesh by jpaged.parallel's table
    dtype: jnp.dtype
    tokenizer: object | None  # a transformers tokenizer, or None for token-id-only models
    mesh: Mesh | None = None  # tensor parallelism's, or None on one device
    run_config: ModelConfig | None = None  # what the model and KV pools are built from (KV heads repeated)
    quant: Quantization = dataclasses.field(default_factory=dict)  # packed modules (jpaged.models.packed)

    def __post_init__(self):
        if self.run_config is None:
            self.run_config = self.config


class StartupClock:
    """Seconds per start-up phase: `with clock("load_weights"): ...` adds to seconds["load_weights"]."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def _mesh_key(loaded: LoadedModel) -> dict:
    # Shardings name the mesh's shape, not its devices; a one-device program keeps its old key.
    if loaded.mesh is None:
        return {}
    return {"mesh": f"{dict(loaded.mesh.shape)} over devices {loaded.mesh.device_ids.ravel().tolist()}"}


def _open_store(key: dict, runner) -> ExecutableStore | None:
    if os.environ.get("JPAGED_COMPILATION_CACHE", "1") == "0":
        return None
    if parallel.is_multiprocess():
        # A program of several processes is bound to this group's collectives; XLA's
        # serialization is neither documented nor tested for it, so each start compiles.
        return None
    try:
        return ExecutableStore(jpaged_home() / "executables", key, devices=runner.devices)
    except OSError as err:
        logger.warning("executable cache disabled: %s", err)
        return None


def sampler_store(loaded: LoadedModel, runner) -> ExecutableStore | None:
    """The on-disk sampler executables: they depend on no model, only on the mesh (B, V and the
    history length are in their names), so every model of one vocabulary shares them."""
    return _open_store(program_key(program="sampler", **_mesh_key(loaded)), runner)


def executable_store(config: EngineConfig, loaded: LoadedModel, spec: BucketSpec, runner, *,
                     backend: str, linear: str) -> ExecutableStore | None:
    """The on-disk executables of this exact program under $JPAGED_HOME/executables, or None
    when JPAGED_COMPILATION_CACHE=0 or with several processes. The key holds everything that
    changes the compiled code."""
    key = program_key(
        model=json.dumps(dataclasses.asdict(loaded.config), sort_keys=True), dtype=loaded.dtype.name,
        buckets=repr(spec), attn_backend=backend, linear_backend=linear,
        kernel_library=cpu_build.library_name() if "cpu" in (backend, linear) else None,
        params=tree_signature(runner.state), kv_pools=tree_signature(runner.kv_caches), **_mesh_key(loaded),
    )
    return _open_store(key, runner)


def runtime_dtype(name: str) -> jnp.dtype:
    if name == "auto":
        name = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    return jnp.dtype(name)


def _load_tokenizer(folder: Path):
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        return None
    import transformers

    return _tokenizer_class(folder, transformers).from_pretrained(str(folder))


def _tokenizer_class(folder: Path, transformers):
    """The class tokenizer_config.json names, its fast variant first, as AutoTokenizer would pick.

    AutoTokenizer gets there through AutoConfig, whose import pulls in torch wherever torch is
    installed: seconds of a warm start for a class this file already names.
    """
    config_file = folder / "tokenizer_config.json"
    name = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    if name and (folder / "tokenizer.json").is_file():
        for candidate in (name if name.endswith("Fast") else name + "Fast", name):
            cls = getattr(transformers, candidate, None)
            if cls is not None:
                return cls
    return transformers.AutoTokenizer


def resolve_model_folder(config: EngineConfig) -> Path:
    """The folder the model loads from: a checkpoint (converted on first use), or with
    load_format="dummy" the folder of the config.json."""
    if config.load_format != "dummy":
        return resolve_model(config.model)
    if config.model is None:
        raise ValueError('load_format="dummy" needs model= a config.json or a folder holding one')
    path = Path(config.model)
    config_file = path if path.suffix == ".json" else path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json at {config.model}")
    return config_file.parent


def model_config_file(config: EngineConfig, folder: Path) -> Path:
    """The model's config.json, or with load_format="dummy" the .json file that model= names
    (benchmarks/configs/llama-3-8b.json: a shape need not be called config.json)."""
    if config.load_format == "dummy" and Path(config.model).suffix == ".json":
        return Path(config.model)
    return folder / "config.json"


def load_model(config: EngineConfig, folder: Path) -> LoadedModel:
    """The weights on the device and the tokenizer, which loads on another thread meanwhile
    (importing transformers is ~1.5 s of Python; the weights' reads and transfer mostly wait on
    TensorStore and XLA without the GIL). With tensor_parallel_size > 1 the weights go straight
    onto the mesh: each parameter placed by jpaged.parallel's table, KV heads repeated on the
    host first when there are fewer than devices. A head count that cannot split fails before
    any read."""
    dtype = runtime_dtype(config.dtype)
    model_config = ModelConfig.from_file(model_config_file(config, folder))
    quant = {} if config.load_format == "dummy" else checkpoint.served_quantization(folder, model_config,
                                                                                    config.quantization)
    tp = config.tensor_parallel_size
    mesh, run_config, shardings, repeat = None, model_config, None, None
    if tp > 1:
        parallel.validate(model_config, tp)
        mesh = parallel.make_mesh(tp)
        run_config = parallel.sharded_model_config(model_config, tp)
        shapes = {name: x.shape for name, x in flatten(abstract_params(run_config, quant=quant)).items()}
        shardings = parallel.param_shardings(shapes, mesh)
        repeat = functools.partial(parallel.repeat_kv_heads, config=model_config, tensor_parallel_size=tp)
    with ThreadPoolExecutor(1, thread_name_prefix="jpaged-tokenizer") as pool:
        tokenizer = pool.submit(_load_tokenizer, folder)
        if config.load_format == "dummy":
            params = random_params(model_config, dtype, seed=config.seed, transform=repeat, shardings=shardings)
        else:
            params = checkpoint.load_params(folder, model_config, dtype, transform=repeat,
                                            sharding=None if shardings is None else shardings.__getitem__,
                                            quantization=config.quantization)
        return LoadedModel(folder, model_config, params, dtype, tokenizer.result(), mesh, run_config, quant)


def max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    longest = model_config.max_position_embeddings
    if config.max_model_len is None:
        return min(longest, 2048)
    if config.max_model_len > longest:
        raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's {longest} positions")
    return config.max_model_len


def kv_size_needs_weights(config: EngineConfig) -> bool:
    """Whether the KV pool's size depends on what the weights leave of the device's memory (an
    accelerator with no explicit size), so it can only be sized once they are resident."""
    if config.num_kv_blocks is not None or config.kv_cache_memory_gib is not None:
        return False
    return "bytes_limit" in (jax.local_devices()[0].memory_stats() or {})


def kv_budget_bytes(config: EngineConfig) -> int:
    """Bytes the KV pools may take on each device: explicit, or a fraction of what the
    accelerator has left (the first device's: tensor parallelism loads every device alike)."""
    if config.kv_cache_memory_gib is not None:
        return int(config.kv_cache_memory_gib * 2**30)
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        # Weights are already resident; keep 10% of the device for activations and XLA scratch.
        return max(int(stats["bytes_limit"] * config.gpu_memory_utilization) - stats.get("bytes_in_use", 0), 0)
    # Host memory: a fixed default, tunable with kv_cache_memory_gib. Host devices share one
    # memory, so split over N of them it stays 2 GiB in all (the same capacity in tokens).
    return 2 * 2**30 // config.tensor_parallel_size


def num_kv_pages(config: EngineConfig, model_config: ModelConfig, max_len: int, dtype: jnp.dtype) -> int:
    """Pages of the KV pool, the null page included: explicit, or what the budget holds, capped
    at every sequence at full length (more buys nothing but a longer-lived prefix cache)."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    bs = config.block_size
    # Per device: each holds its KV heads' share of every page (jpaged.parallel).
    page_bytes = model_config.kv_bytes_per_token(dtype.itemsize) * bs // config.tensor_parallel_size
    return min(kv_budget_bytes(config) // page_bytes, config.max_num_seqs * math.ceil(max_len / bs)) + 1


def bucket_spec(config: EngineConfig, model_config: ModelConfig, max_len: int, dtype: jnp.dtype, *,
                attn_backend: str = "xla", num_pages: int | None = None) -> BucketSpec:
    """Sizes the KV pool and lists the step shapes. Fails fast when one max-length sequence cannot fit.

    Page buckets exist for the XLA attention, which gathers every page of the block table: there
    a short context in a full-width table would pay for max_model_len. The kernels (cpu, pallas)
    walk each sequence's pages only up to its kv_len, so the width costs them nothing and one
    bucket does: a third of the shapes to compile.
    """
    bs = config.block_size
    pages_per_seq = math.ceil(max_len / bs)
    if num_pages is None:
        num_pages = num_kv_pages(config, model_config, max_len, dtype)
    if num_pages - 1 < pages_per_seq:
        raise ValueError(
            f"max_model_len {max_len} needs {pages_per_seq} KV blocks of {bs} tokens but the cache holds "
            f"{max(num_pages - 1, 0)}; the largest max_model_len that fits is {max(num_pages - 1, 0) * bs}"
        )
    return BucketSpec(
        # Buckets down to 1: a lone decoding request padded to 4 rows costs 45 ms a token
        # instead of 34 (matmuls with M > 1 pack the weights: more memory traffic).
        token_buckets=token_buckets(max(config.max_num_batched_tokens, 1), max(config.max_num_seqs, 8)),
        max_num_seqs_bucket=power_of_two_buckets(8, max(config.max_num_seqs, 8))[-1],
        page_buckets=(power_of_two_buckets(min(8, pages_per_seq), pages_per_seq, factor=4)
                      if attn_backend == "xla" else (pages_per_seq,)),
        page_size=bs,
        num_pages=num_pages,
        vocab_size=model_config.vocab_size,
    )
