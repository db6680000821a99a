"""The sharding table, the head-count check and KV-head repetition, on their own (one device)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jpaged.models.config import ModelConfig
from jpaged.models.params import abstract_params, flatten
from jpaged.parallel import (
    PARAM_SPECS, kv_head_repeats, param_spec, repeat_kv_heads, sharded_model_config, validate, vocab_parts,
)
from jpaged.parallel.shardings import matching_rules
from tests.conftest import TINY_MODELS


def _config(**overrides) -> ModelConfig:
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=96, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rms_norm_eps=1e-5)
    return ModelConfig.from_hf_dict({**base, **overrides})


def _smollm2_like() -> ModelConfig:
    return _config(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_every_parameter_matches_exactly_one_rule(name, tiny_models):
    config = ModelConfig.from_file(tiny_models[name][2] / "config.json")
    names = list(flatten(abstract_params(config)))
    assert names
    for param in names:
        assert len(matching_rules(param)) == 1, (param, matching_rules(param))


def test_every_rule_is_used():
    """No dead rule: the union of the tiny architectures (biases, q/k norms, tied and untied heads)."""
    used = set()
    for cfg in (_config(tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
                dataclasses.replace(_config(), qk_norm=True)):
        for param in flatten(abstract_params(cfg)):
            used.update(matching_rules(param))
    assert used == set(range(len(PARAM_SPECS)))


def test_specs_of_the_megatron_split():
    assert param_spec("layers.3.attn.q_proj.kernel", (64, 64), 4) == P(None, "tp")
    assert param_spec("layers.3.attn.v_proj.bias", (32,), 4) == P("tp")
    assert param_spec("layers.0.attn.o_proj.kernel", (64, 64), 4) == P("tp", None)
    assert param_spec("layers.0.mlp.down_proj.kernel", (128, 64), 4) == P("tp", None)
    assert param_spec("layers.0.mlp.down_proj.bias", (64,), 4) == P()
    assert param_spec("layers.1.input_norm.scale", (64,), 4) == P()
    assert param_spec("layers.1.attn.q_norm.scale", (16,), 4) == P()
    assert param_spec("embed", (96, 64), 4) == P("tp", None)
    assert param_spec("lm_head.kernel", (64, 96), 4) == P(None, "tp")
    # A vocabulary the devices do not divide stays whole (correct, only bigger).
    assert param_spec("embed", (97, 64), 4) == P(None, None)
    assert vocab_parts(97, 4) == 1 and vocab_parts(96, 4) == 4
    with pytest.raises(KeyError, match="matches 0 sharding rules"):
        param_spec("layers.0.attn.mystery", (4,), 2)


@pytest.mark.parametrize("tp", [2, 4])
def test_smollm2_heads_are_refused_with_the_numbers_and_the_sizes_that_work(tp):
    with pytest.raises(ValueError) as err:
        validate(_smollm2_like(), tp)
    message = str(err.value)
    assert f"tensor_parallel_size {tp} " in message
    assert "9 attention heads" in message and "3 KV heads" in message
    assert message.endswith("sizes that work: 1, 3")


def test_smollm2_heads_split_three_ways():
    validate(_smollm2_like(), 3)
    validate(_smollm2_like(), 1)


def test_other_refusals_name_their_dimension():
    with pytest.raises(ValueError, match="not a multiple of the model's 2 KV heads"):
        validate(_config(num_attention_heads=6, num_key_value_heads=2, hidden_size=60, intermediate_size=96), 3)
    with pytest.raises(ValueError, match="does not divide the model's intermediate_size 102; sizes that work: 1, 2$"):
        validate(_config(intermediate_size=102), 4)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        validate(_config(), 0)


def _repeat_reference(w: np.ndarray, num_kv_heads: int, head_dim: int, repeats: int) -> np.ndarray:
    """Column block of KV head j copied `repeats` times in place: [.., K*H] -> [.., K*repeats*H]."""
    cols = []
    for j in range(num_kv_heads):
        for _ in range(repeats):
            cols.append(w[..., j * head_dim : (j + 1) * head_dim])
    return np.concatenate(cols, axis=-1)


@pytest.mark.parametrize("num_kv_heads,tp", [(1, 2), (1, 4), (2, 4), (2, 8), (4, 4), (4, 2)])
def test_kv_head_repetition(num_kv_heads, tp):
    config = _config(num_attention_heads=8, num_key_value_heads=num_kv_heads, head_dim=4, hidden_size=32)
    repeats = kv_head_repeats(config, tp)
    assert repeats == max(tp // num_kv_heads, 1)
    assert sharded_model_config(config, tp).num_kv_heads == num_kv_heads * repeats
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((32, num_kv_heads * 4)).astype(np.float32)
    bias = rng.standard_normal(num_kv_heads * 4).astype(np.float32)
    for name, w in [("layers.1.attn.k_proj.kernel", kernel), ("layers.0.attn.v_proj.bias", bias)]:
        ref = _repeat_reference(w, num_kv_heads, 4, repeats)
        np.testing.assert_array_equal(repeat_kv_heads(name, w, config, tp), ref)  # numpy on the host
        np.testing.assert_array_equal(np.asarray(repeat_kv_heads(name, jnp.asarray(w), config, tp)), ref)  # jax
    q = rng.standard_normal((32, 32)).astype(np.float32)
    assert repeat_kv_heads("layers.0.attn.q_proj.kernel", q, config, tp) is q  # other parameters untouched


@pytest.mark.parametrize("num_heads,num_kv_heads,tp", [(8, 2, 4), (8, 1, 4), (4, 2, 4), (8, 4, 2)])
def test_repetition_keeps_each_query_head_on_its_kv_head(num_heads, num_kv_heads, tp):
    """Query head h must still read original KV head h // (N / K) once each device holds
    N / tp query heads and K' / tp repeated KV heads (the GQA mapping jpaged's kernels use)."""
    config = _config(num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=1,
                     hidden_size=num_heads)
    repeated = sharded_model_config(config, tp).num_kv_heads
    # Tag each original KV head's single column with its index and repeat it.
    tags = repeat_kv_heads("layers.0.attn.k_proj.kernel", np.arange(num_kv_heads, dtype=np.float32)[None],
                           config, tp)[0]
    q_per_device, kv_per_device = num_heads // tp, repeated // tp
    for h in range(num_heads):
        device, local = divmod(h, q_per_device)
        local_kv = local // (q_per_device // kv_per_device)  # the GQA group inside the device
        assert tags[device * kv_per_device + local_kv] == h // (num_heads // num_kv_heads)
