"""Collectives of the tensor-parallel step at Llama-3-8B's shapes, compiled for 8 host devices.

The same program tests/kernels/test_kernel_lowering.py lowers for 8 abstract H100s, with the
XLA attention in place of the Triton kernel (a CPU cannot compile that one): XLA's SPMD
partitioner, which inserts the collectives, runs the same way for either platform.
"""

from __future__ import annotations

import re

import pytest

from tests.parallel.tp_job import run_job

NUM_LAYERS = 2  # enough to show the per-layer pattern; all 32 take minutes to compile on 2 cores
TP = 8


@pytest.fixture(scope="module")
def hlo(tmp_path_factory):
    return run_job("llama8b_step", {"num_layers": NUM_LAYERS, "tp": TP}, num_devices=TP,
                   tmp_path=tmp_path_factory.mktemp("hlo"))


def test_forward_all_reduces_twice_per_layer_and_gathers_nothing(hlo):
    # After o_proj and after down_proj in each layer, and once for the vocabulary-split
    # embedding lookup (each device has its tokens' rows or zeros); no weight all-gathered.
    assert hlo["forward"] == {"all-reduce": 2 * NUM_LAYERS + 1}
    assert hlo["forward_gathered"] == []
    # Each all-reduce spans the one mesh axis, all 8 devices (XLA names its partitioner's axis_0).
    for groups in hlo["forward_groups"]:
        assert re.fullmatch(rf"mesh\['\w+'={TP}\] \{{'\w+'\}}", groups), groups


def test_sampler_never_gathers_the_vocabulary(hlo):
    vocab = hlo["vocab_size"]
    assert hlo["sample_gathered"], "the top-k candidates are gathered"
    for shape in hlo["sample_gathered"]:
        rows, *cols = (int(d) for d in shape[shape.index("[") + 1 : shape.index("]")].split(","))
        # top-k candidates (8 devices x 64 or x 20) or the inverse-CDF's block sums; never V (the token
        # bitmask, [B, V / 32] replicated, is unpacked on each device for its own columns).
        assert max(cols) <= TP * 64 < vocab // TP, shape
