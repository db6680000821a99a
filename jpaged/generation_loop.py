"""A simple continuous-batching loop over the paged runner.

Pages are reserved for a sequence's whole length when it is admitted, so nothing is ever
preempted. Each step carries every running sequence: one token for those decoding, a chunk of
the prompt for those prefilling, within the token budget.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable

import numpy as np

from jpaged.runner.batch import BucketSpec, SeqChunk, build_batch
from jpaged.runner.model_runner import ModelRunner
from jpaged.sampling_params import SamplingParams


@dataclasses.dataclass
class Sequence:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    max_len: int  # prompt + output tokens this sequence may reach
    output_ids: list[int] = dataclasses.field(default_factory=list)
    pages: np.ndarray | None = None
    num_computed: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


def run(
    runner: ModelRunner,
    spec: BucketSpec,
    seqs: list[Sequence],
    *,
    eos_ids: frozenset[int],
    max_num_seqs: int,
    max_num_batched_tokens: int,
    on_finish: Callable[[Sequence], None] = lambda seq: None,
) -> None:
    """Generates until every sequence has finished; fills output_ids and finish_reason in place."""
    free_pages = collections.deque(range(1, spec.num_pages))  # page 0 is the null page
    waiting = collections.deque(seqs)
    running: list[Sequence] = []
    for seq in seqs:
        need = math.ceil(seq.max_len / spec.page_size)
        if need > spec.num_pages - 1:
            raise ValueError(
                f"request {seq.index} needs {need} KV pages but the cache has {spec.num_pages - 1}"
            )
    while waiting or running:
        while waiting and len(running) < max_num_seqs:
            need = math.ceil(waiting[0].max_len / spec.page_size)
            if need > len(free_pages):
                break
            seq = waiting.popleft()
            seq.pages = np.array([free_pages.popleft() for _ in range(need)], np.int32)
            running.append(seq)

        chunks, stepped, budget = [], [], max_num_batched_tokens
        # Decoding sequences first (one token each), then prompt chunks with what budget is left.
        for seq in sorted(running, key=lambda s: s.num_computed < len(s.prompt_ids)):
            todo = len(seq.all_ids) - seq.num_computed
            n = min(todo, budget)
            if n == 0:
                continue
            ids = np.asarray(seq.all_ids[seq.num_computed : seq.num_computed + n], np.int32)
            chunks.append(
                SeqChunk(ids, seq.num_computed, seq.pages, seq.params.temperature, seq.seed, len(seq.output_ids))
            )
            stepped.append((seq, n, n == todo))
            budget -= n
        sampled = runner.step(build_batch(chunks, spec))

        for (seq, n, completes), token in zip(stepped, sampled):
            seq.num_computed += n
            if not completes:
                continue  # a partial prompt chunk: its sample is meaningless
            seq.output_ids.append(int(token))
            if int(token) in eos_ids and not seq.params.ignore_eos:
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens or len(seq.all_ids) >= seq.max_len:
                seq.finish_reason = "length"
        for seq in [s for s in running if s.finish_reason]:
            running.remove(seq)
            free_pages.extend(seq.pages.tolist())
            on_finish(seq)
