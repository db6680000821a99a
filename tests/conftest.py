"""Shared fixtures: tiny random HF models of every supported architecture, converted once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Tests must never write into the user's cache or reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The C++ CPU kernels (pallas_kernels/cpu/) are built on first use by the system compiler.
HAS_COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))

_BASE = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=0.15,  # peaked logits, so greedy choices are not near-ties
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (transformers config class name, overrides)
TINY_MODELS = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama3-rope-tied": (
        "LlamaConfig",
        dict(
            tie_word_embeddings=True,
            num_key_value_heads=1,
            rope_theta=500000.0,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=32),
        ),
    ),
    "llama-bias": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True, num_key_value_heads=4)),
    "mistral": ("MistralConfig", dict(sliding_window=None, head_dim=32)),
    "mistral-window": ("MistralConfig", dict(sliding_window=6)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, use_sliding_window=False)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=32, use_sliding_window=False)),
}


def make_hf_model(name: str, folder: Path, seed: int = 0):
    """Saves a random-weight HF model (float32 safetensors) into folder and returns it (torch, eval mode)."""
    import torch
    import transformers

    config_cls, overrides = TINY_MODELS[name]
    config = getattr(transformers, config_cls)(**{**_BASE, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """name -> (hf_model, hf_folder, converted_folder), built lazily and cached for the session."""
    from convert.convert import convert_checkpoint

    cache: dict[str, tuple] = {}

    class Lazy(dict):
        def __missing__(self, name):
            root = tmp_path_factory.mktemp(name)
            model = make_hf_model(name, root / "hf")
            convert_checkpoint(root / "hf", root / "converted", progress=False)
            cache[name] = (model, root / "hf", root / "converted")
            self[name] = cache[name]
            return cache[name]

    return Lazy()


def default_model_gguf() -> Path:
    from jpaged.model_files import default_model_source

    return default_model_source()


@pytest.fixture(scope="session", autouse=True)
def jpaged_home(tmp_path_factory, worker_id):
    """Every test session converts into its own cache folder, never the user's. pytest-xdist's
    workers share one (beside their own temp folders), so the default model is converted and each
    program compiled once per run: every write there is a temp file or folder renamed into place."""
    if worker_id == "master":
        home = tmp_path_factory.mktemp("jpaged_home")
    else:
        home = tmp_path_factory.getbasetemp().parent / "jpaged_home"
        home.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JPAGED_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def default_llm(jpaged_home):
    """The embedded default model, converted on first use (as a user would get it)."""
    from jpaged import LLM

    return LLM(max_num_seqs=8, max_model_len=512, max_num_batched_tokens=128)


def make_chunk(token_ids, start, block_ids, *, params=None, seed=0, history=None):
    """A ScheduledChunk as the scheduler would build it (greedy unless params say otherwise)."""
    import numpy as np

    from jpaged.core.scheduler import ScheduledChunk
    from jpaged.sampling_params import SamplingParams

    token_ids = np.asarray(token_ids, np.int32)
    if history is None:
        history = np.zeros(start + len(token_ids), np.int32)
        history[start:] = token_ids
    return ScheduledChunk(
        req_id="r", token_ids=token_ids, start=start, block_ids=np.asarray(block_ids, np.int32), samples=True,
        params=params or SamplingParams(temperature=0.0), seed=seed, history=np.asarray(history, np.int32),
        num_prompt_tokens=start + len(token_ids),
    )


def prefill_logits(folder, prompt: list[int], linear: str):
    """Logits [len(prompt), V] of every prompt position of a converted checkpoint (packed or
    float, as stored), in float32 through the model runner, one prefill of up to 32 tokens."""
    import dataclasses

    import jax.numpy as jnp
    import numpy as np

    from jpaged import checkpoint
    from jpaged.models.config import ModelConfig
    from jpaged.models.params import build_model
    from jpaged.runner.batch import BucketSpec, build_batch
    from jpaged.runner.model_runner import ModelRunner

    config = ModelConfig.from_file(folder / "config.json")
    params = checkpoint.load_params(folder, config, jnp.float32)
    quant = checkpoint.stored_quantization(checkpoint.read_manifest(folder))
    spec = BucketSpec((16, 32), 8, (8,), 4, 16)
    runner = ModelRunner(build_model(config, params, linear=linear, quant=quant), spec, kv_dtype=jnp.float32)
    batch = build_batch([make_chunk(prompt, 0, np.arange(1, 9, dtype=np.int32))], spec)
    return runner.logits(dataclasses.replace(batch, logits_indices=np.arange(len(prompt), dtype=np.int32)))
