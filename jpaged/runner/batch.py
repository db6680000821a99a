"""Host-side batch building: the plan of one step -> padded numpy arrays for the jitted step."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jpaged.models.attention import AttentionMetadata
from jpaged.runner.buckets import pick_bucket


@dataclasses.dataclass(frozen=True)
class SeqChunk:
    """One sequence's share of a step: tokens [start, start + len(token_ids)) of the sequence."""

    token_ids: np.ndarray  # int32 [n] tokens whose K/V this step computes
    start: int  # position of token_ids[0] (= tokens already in the cache)
    block_table: np.ndarray  # int32 [pages] the sequence's pages, enough for start + n tokens
    temperature: float = 0.0
    seed: int = 0
    sample_index: int = 0  # how many tokens this sequence has sampled so far (varies its random stream)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BatchInputs:
    """Everything one jitted step reads, padded to (T, B, P) buckets."""

    token_ids: np.ndarray  # int32 [T]
    positions: np.ndarray  # int32 [T]
    meta: AttentionMetadata
    logits_indices: np.ndarray  # int32 [B] flat index of each sequence's last token this step
    temperature: np.ndarray  # float32 [B] 0 = greedy
    seeds: np.ndarray  # uint32 [B]
    sample_index: np.ndarray  # int32 [B]


@dataclasses.dataclass(frozen=True)
class BucketSpec:
    token_buckets: tuple[int, ...]  # T
    seq_buckets: tuple[int, ...]  # B
    page_buckets: tuple[int, ...]  # P, the last one enough for max_model_len
    page_size: int  # L
    num_pages: int  # NP; slot NP * L is the "drop" slot for padding tokens


def build_batch(chunks: list[SeqChunk], spec: BucketSpec) -> BatchInputs:
    """Lays chunks end to end and pads every array to its bucket.

    Padding tokens write to the drop slot and belong to no sequence; padding sequences have
    zero tokens, kv_len 0 and a block table of null pages.
    """
    lens = np.array([len(c.token_ids) for c in chunks], dtype=np.int32)
    num_tokens, num_seqs = int(lens.sum()), len(chunks)
    t_pad = pick_bucket(num_tokens, spec.token_buckets)
    b_pad = pick_bucket(num_seqs, spec.seq_buckets)
    starts = np.array([c.start for c in chunks], dtype=np.int32)
    # Block tables only as wide as this step's longest context: the XLA attention gathers every
    # page of the table, so a full max_model_len table would multiply its work.
    p_pad = pick_bucket(int(-(-(starts + lens).max() // spec.page_size)), spec.page_buckets)

    cu_q_lens = np.zeros(b_pad + 1, np.int32)
    cu_q_lens[1 : num_seqs + 1] = np.cumsum(lens)
    cu_q_lens[num_seqs + 1 :] = num_tokens
    seq_of_token = np.repeat(np.arange(num_seqs), lens)
    positions = starts[seq_of_token] + (np.arange(num_tokens) - cu_q_lens[seq_of_token])

    block_tables = np.zeros((b_pad, p_pad), np.int32)
    for i, c in enumerate(chunks):
        used = c.block_table[:p_pad]
        block_tables[i, : len(used)] = used
    pages = block_tables[seq_of_token, positions // spec.page_size]
    drop_slot = spec.num_pages * spec.page_size

    def padded(values, size, fill, dtype):
        out = np.full(size, fill, dtype)
        out[: len(values)] = values
        return out

    kv_lens = padded(starts + lens, b_pad, 0, np.int32)
    return BatchInputs(
        token_ids=padded(np.concatenate([c.token_ids for c in chunks]), t_pad, 0, np.int32),
        positions=padded(positions, t_pad, 0, np.int32),
        meta=AttentionMetadata(
            slot_mapping=padded(pages * spec.page_size + positions % spec.page_size, t_pad, drop_slot, np.int32),
            block_tables=block_tables,
            kv_lens=kv_lens,
            cu_q_lens=cu_q_lens,
        ),
        logits_indices=padded(cu_q_lens[1 : num_seqs + 1] - 1, b_pad, 0, np.int32),
        temperature=padded([c.temperature for c in chunks], b_pad, 0.0, np.float32),
        seeds=padded([c.seed for c in chunks], b_pad, 0, np.uint32),
        sample_index=padded([c.sample_index for c in chunks], b_pad, 0, np.int32),
    )
