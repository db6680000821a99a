"""Owns the device state (parameters, KV pools) and the compiled step executables.

Each bucket shape has two executables (and the engine one more, for prompt log-probabilities:
see prompt_logprobs.py), compiled ahead of time from abstract shapes
(`jax.ShapeDtypeStruct`, no device data): the model for (T, B, P) and the sampler for B.
They come from, in order: this process's table, the on-disk ExecutableStore (no tracing), or
a lower + compile. Warm-up "full" gets every shape before the engine is ready, compiling
several at once; "lazy" gets a shape the first time a step needs it.

With a mesh (tensor parallelism) the same two programs are SPMD over it: parameters and KV
pools carry their NamedShardings (pools split by KV head, out_shardings = in_shardings so
donation updates them in place), step inputs replicated on every device, and the logits left
split by vocabulary as the lm_head makes them: the sampler reduces across devices and exchanges
only [B] values and B x k top-k candidates, never the [B, V] logits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jpaged.models.attention import alloc_kv_pools
from jpaged.models.llama import CausalLM
from jpaged.parallel.shardings import KV_POOL_SPEC, logits_spec, vocab_parts
from jpaged.parallel.step_channel import Op
from jpaged.parallel.vocab import vocab_parallel_top_k
from jpaged.runner.batch import BatchInputs, BucketSpec, dummy_batch
from jpaged.runner.executable_store import ExecutableStore
from jpaged.runner.prompt_logprobs import PromptLogprobs, prompt_logprobs_step
from jpaged.runner.sampler import SamplerOutput, SamplingArrays, sample
from jpaged.typing import KVCache

logger = logging.getLogger("jpaged")

WARMUP_POLICIES = ("full", "lazy")


def compile_workers() -> int:
    """Threads that compile at once. Tracing holds the GIL, XLA's compile releases it, so one
    compile per core pays; JPAGED_COMPILE_WORKERS overrides."""
    return max(1, int(os.environ.get("JPAGED_COMPILE_WORKERS", 0)) or os.cpu_count() or 1)


def _abstract(tree, host_sharding: jax.sharding.Sharding | None = None):
    """ShapeDtypeStructs of a pytree of arrays, keeping committed arrays' shardings; host (numpy)
    arrays get host_sharding (None: wherever jit puts them)."""
    def leaf(x):
        sharding = x.sharding if isinstance(x, jax.Array) else host_sharding
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree)


def forward_step(graphdef: nnx.GraphDef, state: nnx.State, kv_caches: KVCache, batch: BatchInputs):
    """The model program: (new KV pools, float32 logits [B, V] at batch.logits_indices).

    Kept a plain function so tests can lower the very same step for other devices
    (tests/kernels/test_kernel_lowering.py: 8 abstract H100s).
    """
    kv_caches, logits, _ = forward_with_hidden(graphdef, state, kv_caches, batch)
    return kv_caches, logits


def forward_with_hidden(graphdef: nnx.GraphDef, state: nnx.State, kv_caches: KVCache, batch: BatchInputs):
    """What the runner compiles per (T, B, P) bucket: forward_step's outputs and the hidden states of
    every token [T_max, D], zero-padded to the length of batch.prompt_targets (the largest T bucket)
    so that one prompt log-probability program serves every T; they stay on the device unless read."""
    model = nnx.merge(graphdef, state)
    hidden, kv_caches = model(batch.token_ids, batch.positions, kv_caches, batch.meta)  # [T, D]
    padded = jnp.pad(hidden, ((0, batch.prompt_targets.shape[0] - hidden.shape[0]), (0, 0)))  # [T_max, D]
    return kv_caches, model.logits(hidden[batch.logits_indices]), padded  # [B, V], [T_max, D]


# (sampler store folder, program name) -> executable: every runner of this process with the same
# sampler key (vocabulary size, history length and B are in the name) uses one.
_SHARED_SAMPLERS: dict[tuple, jax.stages.Compiled] = {}


class ModelRunner:
    """Runs padded batches through compiled executables; the KV pools are donated and replaced each call."""

    def __init__(self, model: CausalLM, spec: BucketSpec, *, kv_dtype, store: ExecutableStore | None = None,
                 mesh: Mesh | None = None, kv_caches: KVCache | None = None):
        """kv_caches: the zeroed pools (alloc_kv_pools of spec's shape), when the caller made them
        already (the engine does, on another thread while the weights load); else made here."""
        config = model.config
        self.spec = spec
        self.store = store
        # The sampler's programs depend only on (B, V, history length, mesh): their own store,
        # shared by every model of that vocabulary, and within a process by every runner.
        self.sampler_store: ExecutableStore | None = None
        self.mesh = mesh
        # Where the programs run (the executable store deserializes onto exactly these).
        self.devices = list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]
        self._hidden_dtype = model.norm.scale[...].dtype  # of the hidden states the forward returns
        self._hidden_size = config.hidden_size
        self.graphdef, self.state = nnx.split(model)
        # The executables take the parameters as a flat list of arrays: flattening an nnx.State
        # (hundreds of Variables, ~700 leaves with packed weights) in Python on every call cost
        # ~3 ms a step, as much as a packed decode step's matmuls on a CPU.
        self._state_leaves, self._state_treedef = jax.tree.flatten(self.state)
        if kv_caches is None:
            kv_caches = alloc_kv_pools(
                config.num_layers, spec.num_pages, spec.page_size, config.num_kv_heads, config.head_dim, kv_dtype,
                sharding=None if mesh is None else NamedSharding(mesh, KV_POOL_SPEC),
            )
        self.kv_caches = kv_caches
        self.vocab_size = config.vocab_size
        # Step inputs (numpy) whole on every device; the logits between the two programs split
        # by vocabulary, and the sampler's top-k taken per device before any exchange.
        self._replicated = self._logits_sharding = None
        self._top_k, self._vocab_parts = jax.lax.top_k, 1
        if mesh is not None:
            self._replicated = NamedSharding(mesh, PartitionSpec())
            self._logits_sharding = NamedSharding(mesh, logits_spec(config.vocab_size, mesh.size))
            self._top_k = vocab_parallel_top_k(mesh, config.vocab_size)
            self._vocab_parts = vocab_parts(config.vocab_size, mesh.size)
        self._abstract_state, self._abstract_kv = _abstract(self._state_leaves), _abstract(self.kv_caches)
        # Python in a traced function runs only while tracing: num_traces counts traces, and a
        # warm restart from the store must leave it at 0. num_compiles counts XLA compilations.
        self.num_traces = 0
        self.num_compiles = 0
        self.num_executables_loaded = 0
        self.num_deferred_loads = 0  # stored executables prepare() left to its background thread
        # Two programs: the model varies with (T, B, P), the sampler only with B, so keeping
        # them apart compiles the sampler a few times instead of once per model shape. The
        # logits stay on the device between them.
        placed = {}
        if mesh is not None:
            kv_shardings = jax.tree.map(lambda x: x.sharding, self.kv_caches)
            placed = {"forward": dict(out_shardings=(kv_shardings, self._logits_sharding, self._replicated)),
                      "sample": dict(out_shardings=self._replicated), "prompt": dict(out_shardings=self._replicated)}
        self._jitted = {
            "forward": jax.jit(self._traced_forward, donate_argnums=(1,), **placed.get("forward", {})),
            "sample": jax.jit(self._traced_sample, **placed.get("sample", {})),
            "prompt": jax.jit(self._traced_prompt, **placed.get("prompt", {})),
        }
        self._executables: dict[str, jax.stages.Compiled] = {}
        self._lock = threading.Lock()  # counters and the table, when a pool compiles
        self._fetch_lock = threading.Lock()  # see _executable
        self._loader: threading.Thread | None = None  # prepare()'s background loads
        # Several processes (jpaged.parallel.step_channel): process 0 sends each step's inputs
        # to the others before running it; they receive and run the same step.
        self.channel = None

    def _traced_forward(self, state_leaves, kv_caches, batch: BatchInputs):
        self._count("num_traces")
        return forward_with_hidden(self.graphdef, self._unflatten(state_leaves), kv_caches, batch)

    def _traced_prompt(self, state_leaves, hidden, targets):
        self._count("num_traces")
        return prompt_logprobs_step(self.graphdef, self._unflatten(state_leaves), hidden, targets)

    def _unflatten(self, state_leaves: list) -> nnx.State:
        return jax.tree.unflatten(self._state_treedef, state_leaves)

    def _traced_sample(self, logits, sampling):
        self._count("num_traces")
        return sample(logits, sampling, top_k=self._top_k, vocab_parts=self._vocab_parts)

    def _count(self, counter: str) -> None:
        with self._lock:
            setattr(self, counter, getattr(self, counter) + 1)

    # -- executables ------------------------------------------------------------------------
    def _programs(self, batch: BatchInputs) -> list[tuple[str, str, Callable[[], tuple]]]:
        """(name, jitted function, its abstract arguments) of the two executables `batch` runs.
        Names come from the shapes alone; the arguments are only built for a missing executable."""
        t, (b, p), rows = len(batch.token_ids), batch.meta.block_tables.shape, len(batch.logits_indices)
        t_max = len(batch.prompt_targets)
        forward = f"forward-T{t}-B{b}-P{p}" + (f"-R{rows}" if rows != b else "")
        return [
            (forward, "forward", lambda: (self._abstract_state, self._abstract_kv,
                                          _abstract(batch, self._replicated))),
            (f"sample-B{rows}-V{self.vocab_size}-H{batch.sampling.history.shape[1]}", "sample", lambda: (
                jax.ShapeDtypeStruct((rows, self.vocab_size), np.float32, sharding=self._logits_sharding),
                _abstract(batch.sampling, self._replicated))),
            (f"prompt-T{t_max}", "prompt", lambda: (
                self._abstract_state,
                jax.ShapeDtypeStruct((t_max, self._hidden_size), self._hidden_dtype, sharding=self._replicated),
                jax.ShapeDtypeStruct((t_max,), np.int32, sharding=self._replicated))),
        ]

    def _store(self, fn: str) -> ExecutableStore | None:
        return self.sampler_store if fn == "sample" else self.store

    def _is_stored(self, program) -> bool:
        """Whether the store holds an intact entry of `program` that this process does not share already."""
        store = self._store(program[1])
        return store is not None and (store.folder, program[0]) not in _SHARED_SAMPLERS and store.has(program[0])

    def _lower(self, name: str, fn: str, make_args: Callable[[], tuple]):
        """An executable this process or the store has, or the lowered program still to compile."""
        store = self._store(fn)
        if fn == "sample" and store is not None and (compiled := _SHARED_SAMPLERS.get((store.folder, name))):
            return compiled
        args = make_args()
        if store is not None and (compiled := store.load(name, args)) is not None:
            self._count("num_executables_loaded")
            return compiled
        return self._jitted[fn].lower(*args)

    def _finish(self, name: str, lowered_or_compiled, fn: str) -> jax.stages.Compiled:
        compiled = lowered_or_compiled
        store = self._store(fn)
        if isinstance(lowered_or_compiled, jax.stages.Lowered):
            compiled = lowered_or_compiled.compile()
            self._count("num_compiles")
            if store is not None:
                store.save(name, compiled)
        with self._lock:
            self._executables[name] = compiled
            if fn == "sample" and store is not None:
                _SHARED_SAMPLERS[(store.folder, name)] = compiled
        return compiled

    def _executable(self, program: tuple[str, str, Callable[[], tuple]]) -> jax.stages.Compiled:
        compiled = self._executables.get(program[0])
        if compiled is None:
            # One fetch at a time, so a step and the background loader never get the same one twice.
            with self._fetch_lock:
                compiled = self._executables.get(program[0])
                if compiled is None:
                    compiled = self._finish(program[0], self._lower(*program), program[1])
        return compiled

    def _bucket_programs(self, shapes) -> dict[str, tuple]:
        programs = {}
        for shape in shapes:
            for program in self._programs(dummy_batch(self.spec, *shape)):
                programs.setdefault(program[0], program)
        return programs

    def missing(self, shapes) -> list[str]:
        """Names of the executables of bucket `shapes` [(T, B, P)] not yet in this process."""
        return [name for name in self._bucket_programs(shapes) if name not in self._executables]

    def prepare(self, shapes, workers: int | None = None, *, defer_loads: bool = False) -> float:
        """Makes every bucket shape's executables available without compiling; returns the seconds it took.

        The main thread traces and lowers one program after another (tracing holds the GIL and
        NNX's graph walks are not meant to run concurrently) while a pool compiles the lowered
        ones. Stored ones load (~0.2 s each for the default model on a CPU, holding the GIL),
        or with defer_loads only have their entries checked, and load on a background thread:
        a step that needs one first waits for that one load, never a compile.
        """
        start = time.perf_counter()
        todo = [p for name, p in self._bucket_programs(shapes).items() if name not in self._executables]
        deferred = [p for p in todo if defer_loads and self._is_stored(p)]
        todo = [p for p in todo if p not in deferred]
        with ThreadPoolExecutor(workers or compile_workers(), thread_name_prefix="jpaged-compile") as pool:
            futures = [pool.submit(self._finish, program[0], self._lower(*program), program[1]) for program in todo]
            for future in futures:
                future.result()
        self.num_deferred_loads += len(deferred)
        if deferred:
            self._loader = threading.Thread(target=self._load_all, args=(deferred,), name="jpaged-load")
            self._loader.start()
        return time.perf_counter() - start

    def wait_for_loads(self) -> None:
        """Returns once prepare()'s background loads are done (counters final; tests, benchmarks)."""
        if self._loader is not None:
            self._loader.join()

    def _load_all(self, programs) -> None:
        # Not a daemon (XLA torn down under a running load can crash the exit): it stops
        # between loads once the main thread has finished instead.
        for program in programs:
            if not threading.main_thread().is_alive():
                return
            self._executable(program)

    # -- steps ------------------------------------------------------------------------------
    def _run_forward(self, batch: BatchInputs, forward) -> tuple[jax.Array, jax.Array]:
        self.kv_caches, logits, hidden = self._executable(forward)(self._state_leaves, self.kv_caches, batch)
        return logits, hidden

    def step(self, batch: BatchInputs, fill_bitmask: Callable[[np.ndarray], None] | None = None
             ) -> tuple[SamplerOutput, PromptLogprobs | None]:
        """Runs one step; returns the sampler's output as numpy arrays (rows past the real sequences
        are padding), and the prompt log-probabilities when some token of the batch has a target.

        fill_bitmask, if given, writes the constrained rows of the step's token bitmask (int32
        [B, W], handed over all ones). It runs after the model program is dispatched and before
        the sampler's: the host computes the grammar masks while the device runs the model.
        With several processes it runs first instead, so the mask travels with the step's inputs.
        """
        if self.channel is not None and self.channel.is_leader:
            if fill_bitmask is not None:
                batch = dataclasses.replace(batch, sampling=self._filled(batch.sampling, fill_bitmask))
                fill_bitmask = None
            batch = self.channel.send(Op.STEP, batch)
        forward, sampler, prompt = self._programs(batch)
        logits, hidden = self._run_forward(batch, forward)  # asynchronous: returns before the device is done
        sampling = batch.sampling if fill_bitmask is None else self._filled(batch.sampling, fill_bitmask)
        sampled = jax.tree_util.tree_map(np.asarray, self._executable(sampler)(logits, sampling))
        if not (batch.prompt_targets >= 0).any():
            return sampled, None
        out = self._executable(prompt)(self._state_leaves, hidden, batch.prompt_targets)
        return sampled, PromptLogprobs(*(np.asarray(x) for x in out))

    @staticmethod
    def _filled(sampling: SamplingArrays, fill_bitmask: Callable[[np.ndarray], None]) -> SamplingArrays:
        bitmask = np.full(sampling.token_bitmask.shape, -1, np.int32)
        fill_bitmask(bitmask)
        return dataclasses.replace(sampling, token_bitmask=bitmask)

    def logits(self, batch: BatchInputs) -> np.ndarray:
        """Like step, but returns float32 logits [B, V] at batch.logits_indices (tests, scoring)."""
        return np.asarray(self._run_forward(batch, self._programs(batch)[0])[0])
