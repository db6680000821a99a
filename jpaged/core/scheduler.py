"""The scheduler: which requests run this step and how many tokens each (no jax).

Each step has a token budget. Running requests go first (one token each when decoding, a chunk
when still prefilling), then waiting ones in priority / arrival order, their prompts chunked
to what budget is left. When blocks run out, the newest running request is preempted: its
blocks are freed and it waits again at the front, to be recomputed (usually from its own
cached prefix). `schedule()` returns a plan; `update_from_output` applies the step's results.
"""

from __future__ import annotations

import bisect
import dataclasses
import numpy as np

from jpaged.core.kv_cache_manager import KVCacheManager
from jpaged.core.request import Request, RequestStatus
from jpaged.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int  # most requests in one step
    max_num_batched_tokens: int  # token budget of one step
    max_model_len: int  # longest prompt + output
    block_size: int
    num_blocks: int  # including the null block
    enable_prefix_caching: bool = True


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    """One request's share of a step: everything the runner needs, nothing it may change."""

    req_id: str
    token_ids: np.ndarray  # int32 [n] the tokens whose K/V this step computes
    start: int  # position of token_ids[0]
    block_ids: np.ndarray  # int32 [pages] the request's blocks, covering start + n tokens
    samples: bool  # the chunk reaches the last known token, so its logits pick a new one
    params: SamplingParams
    seed: int
    history: np.ndarray  # int32 [start + n] prompt + output tokens (penalties read it)
    num_prompt_tokens: int

    @property
    def sample_index(self) -> int:
        """Output tokens so far: the position in the request's random stream."""
        return len(self.history) - self.num_prompt_tokens


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    """The plan of one step. Chunks are in batch order; empty means nothing to run."""

    chunks: list[ScheduledChunk]
    preempted_req_ids: list[str]  # preempted while planning this step
    num_tokens: int  # real tokens in the step


@dataclasses.dataclass(frozen=True)
class FinishedRequest:
    req_id: str
    status: RequestStatus


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.kv = KVCacheManager(config.num_blocks, config.block_size,
                                 enable_prefix_caching=config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # sorted by (priority, arrival); preempted ones at the front
        self.running: list[Request] = []  # in admission order; the last is preempted first
        self.num_preemptions = 0

    # -- admission ------------------------------------------------------------------------
    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raises ValueError if a request of this size could never run."""
        total = num_prompt_tokens + max_tokens
        if total > self.config.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.config.max_model_len} tokens. However, you requested "
                f"{total} tokens ({num_prompt_tokens} in the prompt, {max_tokens} for the completion)."
            )
        capacity = (self.config.num_blocks - 1) * self.config.block_size
        if total > capacity:
            raise ValueError(f"a request of {total} tokens exceeds the KV cache capacity of {capacity} tokens")

    def add_request(self, req: Request) -> None:
        if req.req_id in self.requests:
            raise ValueError(f"request id {req.req_id!r} is already in use")
        if not req.prompt_token_ids:
            raise ValueError("the prompt is empty")
        self.check_fits(req.num_prompt_tokens, req.sampling_params.max_tokens)
        self.requests[req.req_id] = req
        self._enqueue(req)

    def _enqueue(self, req: Request) -> None:
        keys = [(r.priority, r.arrival_time) for r in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, (req.priority, req.arrival_time)), req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- planning -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while self.kv.allocate_slots(req, n) is None:
                victim = self.running.pop()  # newest first
                self._preempt(victim)
                preempted.append(victim.req_id)
                if victim is req:
                    break
            else:
                chunks.append(self._chunk(req, n))
                budget -= n
                i += 1

        # Admit waiting requests only when nothing had to be preempted: memory is tight otherwise.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            # Prompt log-probabilities need every prompt token's logits: no cached prefix for those requests.
            skip_cache = req.num_computed_tokens or req.sampling_params.prompt_logprobs is not None
            hits, num_hit_tokens = ([], 0) if skip_cache else self.kv.get_computed_blocks(req)
            n = min(req.num_tokens - req.num_computed_tokens - num_hit_tokens, budget)
            if self.kv.allocate_slots(req, n, hits) is None:
                break
            self.waiting.pop(0)
            req.num_computed_tokens += num_hit_tokens
            if not req.num_preemptions:
                req.num_cached_tokens = num_hit_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chunks.append(self._chunk(req, n))
            budget -= n
        return SchedulerOutput(chunks, preempted, self.config.max_num_batched_tokens - budget)

    def _chunk(self, req: Request, n: int) -> ScheduledChunk:
        start = req.num_computed_tokens
        return ScheduledChunk(
            req_id=req.req_id,
            token_ids=req.token_buf[start : start + n].copy(),
            start=start,
            block_ids=np.asarray(self.kv.block_ids(req.req_id), np.int32),
            samples=start + n == req.num_tokens,
            params=req.sampling_params,
            seed=req.seed,
            history=req.all_token_ids,  # a view: later appends fall outside it
            num_prompt_tokens=req.num_prompt_tokens,
        )

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, req)

    # -- results --------------------------------------------------------------------------
    def update_from_output(
        self, output: SchedulerOutput, sampled_token_ids: np.ndarray, eos_token_ids: frozenset[int]
    ) -> list[FinishedRequest]:
        """Appends each sampling chunk's new token, applies the token-level stop rules, frees
        finished requests. sampled_token_ids [len(output.chunks)]."""
        finished = []
        for chunk, token in zip(output.chunks, sampled_token_ids.tolist()):
            req = self.requests[chunk.req_id]
            req.num_computed_tokens += len(chunk.token_ids)
            if not chunk.samples:
                continue
            req.append_token(token)
            status = self._stop_status(req, token, eos_token_ids)
            if status is not None:
                self.finish(req.req_id, status)
                finished.append(FinishedRequest(req.req_id, status))
        return finished

    def _stop_status(self, req: Request, token: int, eos_token_ids: frozenset[int]) -> RequestStatus | None:
        p = req.sampling_params
        if req.num_output_tokens >= p.min_tokens and (
            (token in eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids
        ):
            return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish(self, req_id: str, status: RequestStatus) -> None:
        """Ends a request (stop rule, stop string, abort): frees its blocks at once."""
        req = self.requests.pop(req_id, None)
        if req is None:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = status
