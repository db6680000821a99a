"""Host-side batch building: a step's plan -> numpy arrays padded to the step's buckets."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jpaged.core.scheduler import ScheduledChunk
from jpaged.models.attention import AttentionMetadata
from jpaged.runner.buckets import pick_bucket
from jpaged.runner.prompt_logprobs import prompt_targets
from jpaged.runner.sampler import SamplingArrays
from jpaged.sampling_params import MAX_LOGIT_BIAS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BatchInputs:
    """Everything one jitted step reads, padded to (T, B, P) buckets."""

    token_ids: np.ndarray  # int32 [T]
    positions: np.ndarray  # int32 [T]
    meta: AttentionMetadata
    logits_indices: np.ndarray  # int32 [B] flat index of each sequence's last token this step
    sampling: SamplingArrays
    # int32 [T_max] (the largest T bucket, so one program reads it): the prompt token after each
    # token of the step where its request asks for prompt logprobs; else -1 (padding too).
    prompt_targets: np.ndarray


@dataclasses.dataclass(frozen=True)
class BucketSpec:
    """The fixed shapes a step may take. B follows T (min(T, largest B bucket)) to keep warm-up short."""

    token_buckets: tuple[int, ...]  # T
    max_num_seqs_bucket: int  # largest B
    page_buckets: tuple[int, ...]  # P, the last one enough for max_model_len
    page_size: int  # L
    num_pages: int  # NP; slot NP * L is the "drop" slot for padding tokens
    vocab_size: int = 0  # V; the sampler's token bitmask has ceil(V / 32) words a row (0: one word, tests)

    @property
    def bitmask_width(self) -> int:
        """W of the token bitmask [B, W]: fixed, so a constrained step never recompiles."""
        return max(1, -(-self.vocab_size // 32))

    @property
    def history_len(self) -> int:
        """Width of the sampler's token-history rows: the longest sequence, so it never recompiles."""
        return self.page_buckets[-1] * self.page_size

    def seq_bucket(self, t_pad: int) -> int:
        return min(t_pad, self.max_num_seqs_bucket)

    def shapes(self) -> list[tuple[int, int, int]]:
        """Every (T, B, P) a step can have: what warm-up compiles."""
        return [(t, self.seq_bucket(t), p) for t in self.token_buckets for p in self.page_buckets]


def _padded(values, size: int, fill, dtype) -> np.ndarray:
    out = np.full(size, fill, dtype)
    out[: len(values)] = values
    return out


def build_batch(chunks: list[ScheduledChunk], spec: BucketSpec) -> BatchInputs:
    """Lays chunks end to end and pads every array to its bucket.

    Padding tokens write to the drop slot and belong to no sequence; padding sequences have
    zero tokens, kv_len 0 and a block table of null pages.
    """
    lens = np.array([len(c.token_ids) for c in chunks], dtype=np.int32)
    num_tokens, num_seqs = int(lens.sum()), len(chunks)
    t_pad = pick_bucket(num_tokens, spec.token_buckets)
    b_pad = spec.seq_bucket(t_pad)
    if num_seqs > b_pad:
        raise ValueError(f"{num_seqs} sequences exceed the batch bucket {b_pad}")
    starts = np.array([c.start for c in chunks], dtype=np.int32)
    kv_lens = starts + lens
    # Block tables only as wide as this step's longest context: the XLA attention gathers every
    # page of the table, so a full max_model_len table would multiply its work.
    p_pad = pick_bucket(int(-(-kv_lens.max() // spec.page_size)), spec.page_buckets)

    cu_q_lens = np.zeros(b_pad + 1, np.int32)
    cu_q_lens[1 : num_seqs + 1] = np.cumsum(lens)
    cu_q_lens[num_seqs + 1 :] = num_tokens
    seq_of_token = np.repeat(np.arange(num_seqs), lens)
    positions = starts[seq_of_token] + (np.arange(num_tokens) - cu_q_lens[seq_of_token])

    block_tables = np.zeros((b_pad, p_pad), np.int32)
    history = np.full((b_pad, spec.history_len), -1, np.int32)
    for i, c in enumerate(chunks):
        used = c.block_ids[:p_pad]
        block_tables[i, : len(used)] = used
        history[i, : len(c.history)] = c.history
    bias_ids, bias_values = np.zeros((b_pad, MAX_LOGIT_BIAS), np.int32), np.zeros((b_pad, MAX_LOGIT_BIAS), np.float32)
    for i, c in enumerate(chunks):
        if c.params.logit_bias:
            bias_ids[i, : len(c.params.logit_bias)] = list(c.params.logit_bias)
            bias_values[i, : len(c.params.logit_bias)] = list(c.params.logit_bias.values())
    pages = block_tables[seq_of_token, positions // spec.page_size]
    drop_slot = spec.num_pages * spec.page_size

    def per_seq(field: str, fill, dtype) -> np.ndarray:
        return _padded([getattr(c.params, field) for c in chunks], b_pad, fill, dtype)

    return BatchInputs(
        token_ids=_padded(np.concatenate([c.token_ids for c in chunks]), t_pad, 0, np.int32),
        positions=_padded(positions, t_pad, 0, np.int32),
        meta=AttentionMetadata(
            slot_mapping=_padded(pages * spec.page_size + positions % spec.page_size, t_pad, drop_slot, np.int32),
            block_tables=block_tables,
            kv_lens=_padded(kv_lens, b_pad, 0, np.int32),
            cu_q_lens=cu_q_lens,
        ),
        logits_indices=_padded(cu_q_lens[1 : num_seqs + 1] - 1, b_pad, 0, np.int32),
        sampling=SamplingArrays(
            temperature=per_seq("temperature", 0.0, np.float32),
            top_k=per_seq("top_k", 0, np.int32),
            top_p=per_seq("top_p", 1.0, np.float32),
            min_p=per_seq("min_p", 0.0, np.float32),
            presence_penalty=per_seq("presence_penalty", 0.0, np.float32),
            frequency_penalty=per_seq("frequency_penalty", 0.0, np.float32),
            repetition_penalty=per_seq("repetition_penalty", 1.0, np.float32),
            seeds=_padded([c.seed for c in chunks], b_pad, 0, np.uint32),
            sample_index=_padded([c.sample_index for c in chunks], b_pad, 0, np.int32),
            history=history,
            prompt_lens=_padded([c.num_prompt_tokens for c in chunks], b_pad, 0, np.int32),
            num_logprobs=_padded([-1 if c.params.logprobs is None else c.params.logprobs for c in chunks],
                                 b_pad, -1, np.int32),
            # all allowed; the engine fills constrained rows (ModelRunner.step's fill_bitmask)
            token_bitmask=np.full((b_pad, spec.bitmask_width), -1, np.int32),
            bias_ids=bias_ids,
            bias_values=bias_values,
        ),
        prompt_targets=prompt_targets(chunks, spec.token_buckets[-1]),
    )


def dummy_batch(spec: BucketSpec, t_pad: int, b_pad: int, p_pad: int) -> BatchInputs:
    """An all-padding batch of the given shape (warm-up): every token writes to the drop slot."""
    z = lambda n, dtype=np.int32: np.zeros(n, dtype)  # noqa: E731
    return BatchInputs(
        token_ids=z(t_pad),
        positions=z(t_pad),
        meta=AttentionMetadata(
            slot_mapping=np.full(t_pad, spec.num_pages * spec.page_size, np.int32),
            block_tables=np.zeros((b_pad, p_pad), np.int32),
            kv_lens=z(b_pad),
            cu_q_lens=z(b_pad + 1),
        ),
        logits_indices=z(b_pad),
        sampling=SamplingArrays(
            temperature=z(b_pad, np.float32), top_k=z(b_pad), top_p=np.ones(b_pad, np.float32),
            min_p=z(b_pad, np.float32), presence_penalty=z(b_pad, np.float32),
            frequency_penalty=z(b_pad, np.float32), repetition_penalty=np.ones(b_pad, np.float32),
            seeds=z(b_pad, np.uint32), sample_index=z(b_pad),
            history=np.full((b_pad, spec.history_len), -1, np.int32), prompt_lens=z(b_pad),
            num_logprobs=np.full(b_pad, -1, np.int32),
            token_bitmask=np.full((b_pad, spec.bitmask_width), -1, np.int32),
            bias_ids=np.zeros((b_pad, MAX_LOGIT_BIAS), np.int32), bias_values=np.zeros((b_pad, MAX_LOGIT_BIAS), np.float32),
        ),
        prompt_targets=np.full(spec.token_buckets[-1], -1, np.int32),
    )
