"""The model with each attention backend against the XLA formulation, and backend selection."""

import shutil

import jax.numpy as jnp
import pytest

from jpaged import LLM, SamplingParams
from jpaged.models.attention import resolve_backend

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
HAS_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None


# pallas runs in the interpreter on CPU; cpu is the C++ kernel
@pytest.mark.parametrize("backend", ["pallas", pytest.param("cpu", marks=pytest.mark.skipif(
    not HAS_COMPILER, reason="no C++ compiler"))])
@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral-window"])
def test_backend_gives_the_same_greedy_tokens(backend, name, tiny_models):
    converted = str(tiny_models[name][2])
    prompts = [[5, 9, 13, 2, 8, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52], [7], list(range(3, 30))]
    kw = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64)
    xla = LLM(converted, attn_backend="xla", **kw).generate(prompts, GREEDY, use_tqdm=False)
    other = LLM(converted, attn_backend=backend, **kw).generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in other] == [o.outputs[0].token_ids for o in xla]


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")
def test_auto_picks_the_cpu_kernel_for_float32_only():
    assert resolve_backend("auto", jnp.float32) == "cpu"
    assert resolve_backend("auto", jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match="float32"):
        resolve_backend("cpu", jnp.bfloat16)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        resolve_backend("flash")
