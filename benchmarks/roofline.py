"""Decode steps against the memory-bandwidth roofline.

A decode step must at least read every weight it multiplies by and the K/V of every position it
attends to, so its shortest possible time is those bytes over the device's memory bandwidth:

    roofline seconds = (weight bytes + sum(kv_lens) x KV bytes per position) / memory bandwidth

The bandwidth is measured on the same device, as the faster of a copy (`x + 1` over a large
array, bytes read + written) and a read-only reduction (`sum(x)`): on a GPU both saturate the
memory, on a CPU XLA runs the elementwise pass on one core (7 GB/s on a 2-core EPYC whose
reduction reads 80 GB/s), and a bound that is too slow would flatter us. `roofline_fraction` is
roofline seconds over measured seconds, summed over the run's decode-only steps: 1.0 is the
bound; the GPU bar is >= 0.5 ("decode within 2x of the roofline").

`DecodeStepTimer` wraps a ModelRunner's `step` (each call ends with the sampled tokens on the
host, so its wall time is the step's time as the engine sees it).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.runner.batch import BatchInputs


def measure_bandwidth(num_bytes: int = 256 * 2**20, repeats: int = 10) -> float:
    """Bytes per second: the faster of `x + 1` (read + written) and `sum(x)` (read) over a
    float32 array of num_bytes, each the best of repeats."""
    x = jnp.zeros(num_bytes // 4, jnp.float32)
    best_rate = 0.0
    for fn, bytes_moved in ((lambda a: a + 1.0, 2 * x.nbytes), (jnp.sum, x.nbytes)):
        step = jax.jit(fn)
        step(x).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            step(x).block_until_ready()
            best = min(best, time.perf_counter() - start)
        best_rate = max(best_rate, bytes_moved / best)
    return best_rate


def _device_bytes(x) -> int:
    """Bytes of an array on one device: all of it, or one shard under tensor parallelism (each
    device reads its own shard in parallel, so the per-device bytes set the decode time)."""
    return x.addressable_shards[0].data.nbytes


def measure_matmul_rate(n: int = 8192, dtype=jnp.bfloat16, repeats: int = 10) -> float:
    """FLOP/s of an [n, n] @ [n, n] product in dtype (2 n^3 flops), the best of repeats: the
    roofline's other ceiling, beside measure_bandwidth's."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    step = jax.jit(lambda a, b: a @ b)
    step(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def weight_bytes(runner) -> int:
    """Parameter bytes a decode step reads on each device: all of them, except an embedding
    table that is only gathered from (when a separate lm_head, packed copy or untied, does the projection)."""
    total = sum(_device_bytes(leaf) for leaf in jax.tree.leaves(runner.state))
    has_head = "lm_head" in runner.state and runner.state["lm_head"] is not None
    # The embedding: one array, or a packed table's leaves (jpaged.models.packed).
    embed = sum(_device_bytes(leaf) for leaf in jax.tree.leaves(runner.state["embed"]))
    return total - (embed if has_head else 0)


def kv_bytes_per_position(runner) -> int:
    """K and V of one position over all layers on each device: Y x 2 x K' x H x itemsize, K' the
    KV heads one device holds (the pools [Y * NP, L, K, H] hold NP x L positions)."""
    positions = runner.spec.num_pages * runner.spec.page_size
    return sum(_device_bytes(pool) // positions for pool in runner.kv_caches)


def decode_step_shape(batch: BatchInputs) -> tuple[int, int] | None:
    """(sequences, positions attended to = sum of their kv_lens) of a decode-only step, or None
    when any sequence in the step has more than one query token (a prefill chunk) or there is none."""
    q_lens = np.diff(np.asarray(batch.meta.cu_q_lens))
    real = q_lens > 0
    if not real.any() or (q_lens[real] != 1).any():
        return None
    return int(real.sum()), int(np.asarray(batch.meta.kv_lens)[real].sum())


@dataclasses.dataclass
class DecodeRoofline:
    bandwidth_bytes_per_s: float
    weight_bytes: int
    kv_bytes_per_position: int
    num_steps: int = 0  # decode-only steps timed
    num_seqs: int = 0  # sequences over those steps (mean batch = num_seqs / num_steps)
    seconds: float = 0.0  # their measured time
    bytes: int = 0  # bytes they had to read at least

    def add(self, num_seqs: int, kv_positions: int, seconds: float) -> None:
        self.num_steps += 1
        self.num_seqs += num_seqs
        self.seconds += seconds
        self.bytes += self.weight_bytes + kv_positions * self.kv_bytes_per_position

    @property
    def roofline_seconds(self) -> float:
        return self.bytes / self.bandwidth_bytes_per_s

    def as_dict(self) -> dict:
        steps = max(self.num_steps, 1)
        return dict(
            bandwidth_gb_s=self.bandwidth_bytes_per_s / 1e9,
            weight_mib=self.weight_bytes / 2**20,
            decode_steps=self.num_steps,
            mean_batch=self.num_seqs / steps,
            mean_step_ms=1e3 * self.seconds / steps,
            mean_roofline_step_ms=1e3 * self.roofline_seconds / steps,
            roofline_fraction=self.roofline_seconds / self.seconds if self.seconds else None,
        )


class DecodeStepTimer:
    """Times a runner's decode-only steps into a DecodeRoofline; other steps pass through untimed."""

    def __init__(self, runner, roofline: DecodeRoofline):
        self.runner, self.roofline = runner, roofline
        self._step = runner.step

    def __enter__(self) -> DecodeRoofline:
        def timed_step(batch: BatchInputs, *args):
            shape = decode_step_shape(batch)
            start = time.perf_counter()
            out = self._step(batch, *args)
            if shape is not None:
                self.roofline.add(*shape, time.perf_counter() - start)
            return out

        self.runner.step = timed_step
        return self.roofline

    def __exit__(self, *exc) -> None:
        del self.runner.step  # the class's method again


def for_runner(runner) -> DecodeRoofline:
    """A DecodeRoofline for this runner's model and KV layout, with the bandwidth measured now."""
    return DecodeRoofline(measure_bandwidth(), weight_bytes(runner), kv_bytes_per_position(runner))
