"""The model with each attention and linear backend against plain XLA, and backend selection."""

import jax.numpy as jnp
import pytest

from jpaged import LLM, SamplingParams
from jpaged.models import kernel_choice
from jpaged.models.backends import resolve_backend, resolve_linear_backend
from tests.conftest import HAS_COMPILER

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


NEEDS_COMPILER = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")


PROMPTS = [[5, 9, 13, 2, 8, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52], [7], list(range(3, 30))]
ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64)


def greedy_tokens(converted: str, attn: str, linear: str) -> list[list[int]]:
    llm = LLM(converted, attn_backend=attn, linear_backend=linear, **ENGINE)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def xla_tokens(tiny_models):
    """Each model's greedy tokens with plain XLA everywhere (the reference), computed once."""
    cache = {}

    def tokens(name: str) -> list[list[int]]:
        if name not in cache:
            cache[name] = greedy_tokens(str(tiny_models[name][2]), "xla", "xla")
        return cache[name]

    return tokens


# (attention, linear): pallas runs in the interpreter on CPU; cpu is a C++ kernel
@pytest.mark.parametrize("backends", [("pallas", "xla"), pytest.param(("cpu", "xla"), marks=NEEDS_COMPILER),
                                      pytest.param(("cpu", "cpu"), marks=NEEDS_COMPILER)])
@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral-window", "qwen2"])
def test_backend_gives_the_same_greedy_tokens(backends, name, tiny_models, xla_tokens):
    assert greedy_tokens(str(tiny_models[name][2]), *backends) == xla_tokens(name)


@NEEDS_COMPILER
@pytest.mark.parametrize("kernel_wins", [True, False])
def test_auto_follows_the_measured_verdict_for_float32_only(kernel_wins, monkeypatch):
    monkeypatch.setattr(kernel_choice, "_verdict", {"linear": kernel_wins, "attention": kernel_wins})
    chosen = "cpu" if kernel_wins else "xla"
    assert resolve_backend("auto", jnp.float32) == chosen
    assert resolve_linear_backend("auto", jnp.float32) == chosen
    assert resolve_backend("auto", jnp.bfloat16) == "xla"
    assert resolve_linear_backend("auto", jnp.bfloat16) == "xla"
    assert resolve_backend("cpu", jnp.float32) == "cpu"  # a named backend is taken as it is
    with pytest.raises(ValueError, match="float32"):
        resolve_backend("cpu", jnp.bfloat16)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        resolve_backend("flash")
    with pytest.raises(ValueError, match="linear backend 'cpu' is unavailable"):
        resolve_linear_backend("cpu", jnp.float16)
    with pytest.raises(ValueError, match="unknown linear backend 'mkl'"):
        resolve_linear_backend("mkl")
