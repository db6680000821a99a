"""Warm-up policies and the on-disk executables: what compiles when, and that nothing changes the tokens."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from jpaged import LLM, SamplingParams
from tests.conftest import HAS_COMPILER

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 160, size=int(rng.integers(2, 30))).tolist() for _ in range(n)]


def token_ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def model(tiny_models):
    hf_model, _, converted = tiny_models["llama"]
    return str(converted), hf_model


@pytest.fixture(scope="module")
def hf_reference(model):
    """HF greedy continuations: the independent reference."""
    ps = prompts(3)
    refs = []
    for p in ps:
        with torch.no_grad():
            out = model[1].generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                    max_new_tokens=GREEDY.max_tokens, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)
        refs.append(out[0, len(p):].tolist())
    return ps, refs


def test_lazy_compiles_each_new_shape_once_and_matches_full(model, hf_reference, monkeypatch):
    monkeypatch.setenv("JPAGED_COMPILATION_CACHE", "0")  # every executable compiled in this process
    ps, refs = hf_reference
    lazy = LLM(model[0], warmup="lazy", enable_prefix_caching=False, **ENGINE)  # a rerun takes the same shapes
    runner = lazy.engine.runner
    assert runner.num_compiles == 0 and lazy.get_stats()["num_compiles_after_warmup"] == 0
    first = lazy.generate([ps[0]], GREEDY, use_tqdm=False)
    compiles = lazy.get_stats()["num_compiles_after_warmup"]
    # One forward + one sampler executable per distinct step shape that prefill and decode used.
    assert compiles == len(runner._executables) > 0
    again = lazy.generate([ps[0]], GREEDY, use_tqdm=False)  # the same shapes: nothing new
    assert lazy.get_stats()["num_compiles_after_warmup"] == compiles
    assert token_ids(again) == token_ids(first)

    full = LLM(model[0], warmup="full", **ENGINE)
    assert full.get_stats()["num_compiles_after_warmup"] == 0
    assert not full.engine.runner.missing(full.engine.runner.spec.shapes())
    out_full = full.generate(ps, GREEDY, use_tqdm=False)
    out_lazy = lazy.generate(ps, GREEDY, use_tqdm=False)
    assert token_ids(out_lazy) == token_ids(out_full) == refs
    assert full.get_stats()["num_compiles_after_warmup"] == 0
    # Each executable compiled exactly once, however many steps used it.
    assert lazy.engine.runner.num_compiles == len(lazy.engine.runner._executables)


@pytest.mark.parametrize("backend", ["xla", "cpu"])
def test_steps_write_the_kv_pools_in_place(model, monkeypatch, backend):
    """No step program needs scratch memory the size of one layer's KV pool: the stacked pools
    are donated and each step writes its tokens into them in place, and each layer's attention
    reads its pages where they are. (The XLA backend's one-token decode once copied every pool
    each step, its scatter going through a flat view of the pool that its attention loop then
    read; a reshape of the stacked pools read in that loop did the same.)"""
    monkeypatch.setenv("JPAGED_COMPILATION_CACHE", "0")  # compiled here, so their analyses are at hand
    # Pools far larger than any activation of this tiny model, so a copy of one would stand out.
    llm = LLM(model[0], attn_backend=backend, linear_backend=backend, warmup="lazy", num_kv_blocks=2048, **ENGINE)
    llm.generate(prompts(1), GREEDY, use_tqdm=False)  # one sequence: prefill, then one-token steps
    llm.generate(prompts(3, seed=1), GREEDY, use_tqdm=False)  # several: mixed and batched decode steps
    runner = llm.engine.runner
    pool_bytes = runner.kv_caches[0].nbytes * runner.spec.num_pages // runner.kv_caches[0].shape[0]  # one layer's K
    forwards = {name: c for name, c in runner._executables.items() if name.startswith("forward")}
    assert any(name.startswith("forward-T1-") for name in forwards) and len(forwards) > 2
    for name, compiled in forwards.items():
        assert compiled.memory_analysis().temp_size_in_bytes < pool_bytes, name


# Backends named, not "auto": the FFI kernels' custom calls must survive serialization too.
_JOB = """
import json, sys
from jpaged import LLM, SamplingParams
backend = sys.argv[3]
llm = LLM(sys.argv[1], warmup="full", max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64,
          attn_backend=backend, linear_backend=backend)
llm.engine.runner.wait_for_loads()  # stored executables load on a thread once warm-up has checked them
before = dict(llm.get_stats())
outs = llm.generate(json.loads(sys.argv[2]), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                    use_tqdm=False)
print("RESULT", json.dumps({"stats": before, "tokens": [o.outputs[0].token_ids for o in outs]}))
"""


def _run_job(model_dir: str, ps, home) -> dict:
    env = {**os.environ, "JPAGED_HOME": str(home)}
    env.pop("JPAGED_COMPILATION_CACHE", None)
    backend = "cpu" if HAS_COMPILER else "xla"
    done = subprocess.run([sys.executable, "-c", _JOB, model_dir, json.dumps(ps), backend], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_warm_restart_loads_executables_and_traces_nothing(model, hf_reference, tmp_path):
    ps, refs = hf_reference
    cold = _run_job(model[0], ps, tmp_path)
    assert cold["stats"]["num_traces"] > 0 and cold["stats"]["num_compiles"] > 0
    assert cold["stats"]["num_executables_loaded"] == 0
    warm = _run_job(model[0], ps, tmp_path)
    assert warm["stats"]["num_traces"] == 0 and warm["stats"]["num_compiles"] == 0
    assert warm["stats"]["num_executables_loaded"] == cold["stats"]["num_compiles"]
    assert warm["tokens"] == cold["tokens"] == refs


def test_full_warm_up_over_a_filled_store_is_ready_before_loading(model, hf_reference):
    """Warm-up only checks stored entries; they load on a thread, and a step that comes first
    waits for that load, never compiles."""
    ps, refs = hf_reference
    kw = dict(ENGINE, max_num_seqs=3)  # a program key of its own
    LLM(model[0], warmup="full", **kw).engine.runner.wait_for_loads()  # fills the store
    llm = LLM(model[0], warmup="full", **kw)
    runner = llm.engine.runner
    assert runner.num_compiles == 0 and runner.num_deferred_loads == len(_entries(llm)) > 0
    assert token_ids(llm.generate(ps, GREEDY, use_tqdm=False)) == refs  # racing the loader
    runner.wait_for_loads()
    assert runner.num_executables_loaded == runner.num_deferred_loads
    assert runner.num_compiles == runner.num_traces == 0


def _entries(llm):
    return sorted(llm.engine.runner.store.folder.glob("*.jex"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "swap"])
def test_a_bad_executable_entry_is_rebuilt(model, hf_reference, damage, caplog):
    ps, refs = hf_reference
    kw = dict(ENGINE, max_num_seqs=2)  # a program key of its own
    first = LLM(model[0], warmup="full", **kw)
    entries = _entries(first)
    forward = [p for p in entries if p.name.startswith("forward")]
    victim = forward[0]
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) // 3]
    elif damage == "garbage":
        data = b"not an executable"
    else:  # a valid entry of another shape under this shape's name
        data = forward[1].read_bytes()
    victim.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="jpaged"):
        second = LLM(model[0], warmup="full", **kw)
    assert any(victim.name in r.getMessage() for r in caplog.records), caplog.text
    runner = second.engine.runner
    runner.wait_for_loads()
    # The damaged entry was found while warming up: nothing compiles once the engine is ready.
    assert second.get_stats()["num_compiles_after_warmup"] == 0
    assert runner.num_compiles == 1 and runner.num_executables_loaded == len(entries) - 1
    assert token_ids(second.generate(ps, GREEDY, use_tqdm=False)) == refs
    # The rebuilt entry was written back: a third start loads everything.
    third = LLM(model[0], warmup="full", **kw)
    third.engine.runner.wait_for_loads()
    assert third.engine.runner.num_compiles == 0 and third.engine.runner.num_traces == 0
