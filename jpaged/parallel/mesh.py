"""The device mesh of tensor parallelism (one axis, "tp") and shard_map over it."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh

TP_AXIS = "tp"


def make_mesh(tensor_parallel_size: int) -> Mesh:
    """A mesh over the first `tensor_parallel_size` devices of the default backend, axis "tp".

    Raises ValueError naming both counts when there are fewer devices. With several processes
    the devices are every process's and the mesh must take them all: a process left out would
    run a step it has no part in.
    """
    devices = jax.devices()
    if jax.process_count() > 1 and tensor_parallel_size != len(devices):
        raise ValueError(
            f"tensor_parallel_size {tensor_parallel_size} must equal the {len(devices)} devices of the "
            f"{jax.process_count()} processes ({jax.local_device_count()} in this one)"
        )
    if len(devices) < tensor_parallel_size:
        hint = ""
        if devices[0].platform == "cpu":
            hint = (f"; on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count={tensor_parallel_size} "
                    "(set before jax starts) gives that many host devices")
        raise ValueError(
            f"tensor_parallel_size {tensor_parallel_size} needs {tensor_parallel_size} devices, "
            f"but {devices[0].platform} has {len(devices)}{hint}"
        )
    return Mesh(np.array(devices[:tensor_parallel_size]), (TP_AXIS,))


def shard_map(f: Callable, mesh: Mesh | AbstractMesh, in_specs, out_specs) -> Callable:
    """f run once per device on its shards (jax.shard_map, in every jax >= 0.11).

    The replication check is off: the FFI and Pallas kernels inside have no rule for it, and
    every spec here is written out by hand.
    """
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
