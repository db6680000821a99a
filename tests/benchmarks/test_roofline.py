"""benchmarks.roofline: the bytes a decode step must read, counted by hand for a tiny model, and
the fraction of the roofline reached."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.roofline import DecodeRoofline, DecodeStepTimer, decode_step_shape, kv_bytes_per_position, weight_bytes
from jpaged.config import EngineConfig
from jpaged.engine.llm_engine import LLMEngine
from jpaged.runner.batch import build_batch
from jpaged.sampling_params import SamplingParams
from tests.conftest import make_chunk


@pytest.fixture(scope="module")
def engine(tiny_models):
    _, _, converted = tiny_models["llama"]  # untied: lm_head [64, 160] and an embedding only gathered from
    return LLMEngine(EngineConfig(model=str(converted), max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
                                  linear_backend="xla"))


def test_decode_positions_only_for_decode_only_steps(engine):
    spec = engine.runner.spec
    decode = [make_chunk([5], 9, [1]), make_chunk([7], 20, [2, 3])]  # kv_lens 10 and 21
    assert decode_step_shape(build_batch(decode, spec)) == (2, 31)
    mixed = decode + [make_chunk([4, 5, 6], 0, [4])]
    assert decode_step_shape(build_batch(mixed, spec)) is None


def test_bytes_counted_by_hand(engine):
    # llama tiny: V 160, D 64, F 128, 2 layers, N 4, K 2, H 16, float32, untied.
    per_layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * (64 * 128) + 2 * 64  # q, k+v, o, MLP, two norms
    expected = (2 * per_layer + 64 + 64 * 160) * 4  # + final norm + lm_head; the embedding is only gathered
    assert weight_bytes(engine.runner) == expected
    assert kv_bytes_per_position(engine.runner) == 2 * 2 * 2 * 16 * 4  # layers x (K, V) x K x H x 4 bytes


def test_fraction_is_roofline_over_measured():
    roof = DecodeRoofline(bandwidth_bytes_per_s=1e4, weight_bytes=1000, kv_bytes_per_position=10)
    roof.add(num_seqs=2, kv_positions=50, seconds=0.5)  # 1500 bytes: 0.15 s at the roofline
    roof.add(num_seqs=4, kv_positions=150, seconds=0.5)  # 2500 bytes: 0.25 s
    d = roof.as_dict()
    assert d["decode_steps"] == 2 and d["mean_batch"] == 3
    assert d["roofline_fraction"] == pytest.approx(0.4 / 1.0)
    assert d["mean_step_ms"] == pytest.approx(500) and d["mean_roofline_step_ms"] == pytest.approx(200)


def test_timer_counts_each_decode_step(engine):
    roof = DecodeRoofline(bandwidth_bytes_per_s=1e9, weight_bytes=weight_bytes(engine.runner),
                          kv_bytes_per_position=kv_bytes_per_position(engine.runner))
    # Two prompts of 10 tokens fit one step (budget 32); then 4 decode steps of both sequences
    # (the fifth sampled token comes with the prefill), each attending to 11..14 positions.
    for i in range(2):
        engine.add_request(f"r{i}", list(range(3, 13)), SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    with DecodeStepTimer(engine.runner, roof):
        while engine.has_unfinished():
            engine.step()
    assert "step" not in vars(engine.runner)  # unwrapped again
    assert roof.num_steps == 4 and roof.num_seqs == 8
    kv = 2 * sum(range(11, 15))
    assert roof.bytes == 4 * roof.weight_bytes + kv * roof.kv_bytes_per_position
    assert roof.seconds > 0 and np.isfinite(roof.as_dict()["roofline_fraction"])


def test_tied_head_reads_the_embedding_once(tiny_models):
    _, _, converted = tiny_models["llama3-rope-tied"]  # K 1; lm_head is the embedding (xla linear backend)
    engine = LLMEngine(EngineConfig(model=str(converted), max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16,
                                    linear_backend="xla"))
    per_layer = 64 * 64 + 2 * (64 * 16) + 64 * 64 + 3 * (64 * 128) + 2 * 64
    assert weight_bytes(engine.runner) == (2 * per_layer + 64 + 160 * 64) * 4
