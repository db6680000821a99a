"""A request's state as the scheduler owns it."""

from __future__ import annotations

import dataclasses
import enum
import time

import numpy as np

from jpaged.core.block_pool import BlockHash
from jpaged.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, to be recomputed from its tokens so far
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self.name.startswith("FINISHED")


@dataclasses.dataclass(eq=False)
class Request:
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int  # the request's own random stream (from its params, or drawn by the engine)
    priority: int = 0  # lower runs first; FCFS within a priority
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens the prefix cache supplied at its first admission
    block_hashes: list[BlockHash] = dataclasses.field(default_factory=list)  # of its full blocks, chained
    # prompt + output tokens in one preallocated buffer, so batches slice it without Python loops
    token_buf: np.ndarray = dataclasses.field(init=False, repr=False)
    num_tokens: int = dataclasses.field(init=False)

    def __post_init__(self):
        self.token_buf = np.empty(len(self.prompt_token_ids) + self.sampling_params.max_tokens, np.int32)
        self.token_buf[: len(self.prompt_token_ids)] = self.prompt_token_ids
        self.num_tokens = len(self.prompt_token_ids)

    def append_token(self, token_id: int) -> None:
        self.token_buf[self.num_tokens] = token_id
        self.num_tokens += 1

    @property
    def all_token_ids(self) -> np.ndarray:
        """int32 [num_tokens] view: prompt then output."""
        return self.token_buf[: self.num_tokens]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_buf[self.num_prompt_tokens : self.num_tokens].tolist()

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens
