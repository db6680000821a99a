"""Several processes (hosts) as one JAX program: jax.distributed, and agreeing on host-side values.

Every process sees every device (`jax.devices()` is global), builds the same mesh and runs the
same SPMD step; XLA's collectives (NCCL on GPUs, gloo on CPUs) carry the all-reduces between
processes. Process 0 runs the scheduler and the server; jpaged.parallel.step_channel sends each
step's inputs to the others.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np

logger = logging.getLogger("jpaged")

# The arguments of jax.distributed.initialize, also read from the environment, for launchers
# (Kubernetes, SLURM) that hand each process its rank in a variable.
ENV_COORDINATOR = "JPAGED_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JPAGED_NUM_PROCESSES"
ENV_PROCESS_ID = "JPAGED_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Where this process stands in a group of processes; num_processes 1 = not distributed."""

    coordinator: str | None = None
    """HOST:PORT of process 0's coordination service (jax.distributed's coordinator_address)."""
    num_processes: int = 1
    process_id: int = 0
    heartbeat_timeout_s: int = 10
    """A process silent this long is dead: the coordination service then ends every other one
    (non-zero exit), the last resort when no collective notices first."""

    def __post_init__(self):
        if self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id must be in [0, {self.num_processes}), got {self.process_id}")
        if self.num_processes > 1 and not self.coordinator:
            raise ValueError(f"{self.num_processes} processes need a coordinator address (HOST:PORT of process 0)")
        if self.coordinator is not None:
            host, _, port = self.coordinator.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"the coordinator address must be HOST:PORT, got {self.coordinator!r}")
        if self.heartbeat_timeout_s < 1:
            raise ValueError(f"heartbeat_timeout_s must be >= 1, got {self.heartbeat_timeout_s}")

    @property
    def enabled(self) -> bool:
        return self.num_processes > 1

    @classmethod
    def resolve(cls, coordinator: str | None = None, num_processes: int | None = None,
                process_id: int | None = None, **kwargs) -> "DistributedConfig":
        """Explicit values (the CLI's flags) first, then the JPAGED_* environment variables."""
        def from_env(value, name, convert):
            if value is not None or name not in os.environ:
                return value
            try:
                return convert(os.environ[name])
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {os.environ[name]!r}") from None

        return cls(
            coordinator=from_env(coordinator, ENV_COORDINATOR, str),
            num_processes=from_env(num_processes, ENV_NUM_PROCESSES, int) or 1,
            process_id=from_env(process_id, ENV_PROCESS_ID, int) or 0,
            **kwargs,
        )


def initialize(config: DistributedConfig) -> None:
    """Joins the group (blocks until every process has). Call before anything touches a device."""
    if not config.enabled:
        return
    # Collectives between host devices of different processes: gloo (TCP). Without it XLA:CPU
    # has no cross-process collectives at all. GPUs use NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's preemption notifier would swallow SIGTERM: the server drains on it, a worker exits.
    jax.config.update("jax_enable_preemption_service", False)
    # Each executable's launch ids, which pair up a collective across processes, start from the
    # executable's fingerprint, and the fingerprint covers the Python stack each op was traced
    # under. Process 0 reaches a step from the engine and a worker from its loop: with stacks in
    # the HLO their all-reduces never meet (seen with gloo on jax 0.12). Without, they match.
    jax.config.update("jax_include_full_tracebacks_in_locations", False)
    jax.config.update("jax_traceback_in_locations_limit", 0)
    jax.distributed.initialize(config.coordinator, config.num_processes, config.process_id,
                               heartbeat_timeout_seconds=config.heartbeat_timeout_s)
    logger.info("process %d of %d joined %s: %d local and %d devices in all", jax.process_index(),
                jax.process_count(), config.coordinator, jax.local_device_count(), jax.device_count())


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def agree_min(value: int) -> int:
    """The smallest of every process's `value` (the same answer everywhere): sizes that each
    process derives from its own device's free memory must be equal for one global array."""
    if not is_multiprocess():
        return value
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.array([value], np.int64))))
