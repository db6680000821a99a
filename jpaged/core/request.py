"""A request's state as the scheduler owns it."""

from __future__ import annotations

import dataclasses
import enum
import time

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
    all_token_ids: list[int] = dataclasses.field(init=False)  # prompt + output, appended in place
    block_hashes: list[BlockHash] = dataclasses.field(default_factory=list)  # of its full blocks, chained

    def __post_init__(self):
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def max_total_tokens(self) -> int:
        return self.num_prompt_tokens + self.sampling_params.max_tokens
