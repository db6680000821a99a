"""Process 0 -> every other process: each step's host inputs, through a JAX broadcast.

Process 0 alone schedules. Before each step it broadcasts a header, int32 [4] = (op, T, B, P),
then, for a step, the BatchInputs themselves: a few small int32/float32 arrays. The other
processes block in `receive`, rebuild the batch's shapes from the header (dummy_batch) to take
part in the broadcast, and run the very same step. Both broadcasts are JAX collectives
(multihost_utils.broadcast_one_to_all: a psum over one device per process), so no RPC of our own
exists, and a process that dies makes the next one fail at once ("connection closed by peer"
from gloo) instead of hanging.
"""

from __future__ import annotations

import enum
import logging

import numpy as np

from jpaged.runner.batch import BatchInputs, BucketSpec, dummy_batch

logger = logging.getLogger("jpaged")


class Op(enum.IntEnum):
    STEP = 1  # a BatchInputs follows
    PING = 2  # nothing follows: process 0's liveness check while idle
    STOP = 3  # the group is done: workers return


class StepChannel:
    """One end of the step broadcast: process 0 sends, the others receive."""

    def __init__(self, spec: BucketSpec):
        import jax

        self.spec = spec
        self.is_leader = jax.process_index() == 0

    @staticmethod
    def _broadcast(tree):
        from jax.experimental import multihost_utils

        return multihost_utils.broadcast_one_to_all(tree)

    def send(self, op: Op, batch: BatchInputs | None = None) -> BatchInputs | None:
        """Process 0: announces `op` (and sends a STEP's batch) to every process."""
        assert self.is_leader
        shape = (0, 0, 0) if batch is None else (len(batch.token_ids), *batch.meta.block_tables.shape)
        self._broadcast(np.array([op, *shape], np.int32))
        if op is Op.STEP:
            return self._broadcast(batch)
        return None

    def receive(self) -> tuple[Op, BatchInputs | None]:
        """The others: the next op from process 0, with its batch for a STEP."""
        assert not self.is_leader
        op, t, b, p = (int(x) for x in self._broadcast(np.zeros(4, np.int32)))
        if op != Op.STEP:
            return Op(op), None
        # Same structure, shapes and dtypes as process 0's batch: only its values take part.
        batch = self._broadcast(dummy_batch(self.spec, t, b, p))
        return Op.STEP, batch


def run_worker(runner) -> int:
    """A worker process's loop: every step process 0 announces, until STOP. Returns the steps run.

    A collective that fails (process 0 or another worker gone) raises out of here, and the
    process exits non-zero: the orchestrator restarts the group.
    """
    num_steps = 0
    while True:
        op, batch = runner.channel.receive()
        if op is Op.STOP:
            logger.info("process 0 stopped the group after %d steps", num_steps)
            return num_steps
        if op is Op.STEP:
            runner.step(batch)
            num_steps += 1
