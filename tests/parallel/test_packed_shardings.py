"""Packed weights (jpaged.models.packed) under tensor parallelism: each leaf shards along the
logical axes of the float parameter it stands for, and KV-head repetition commutes with unpacking."""

from __future__ import annotations

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jpaged.models.config import ModelConfig
from jpaged.models.packed import PackedFormat, pack_ints, unpack
from jpaged.models.params import abstract_params, flatten
from jpaged.parallel import param_spec, repeat_kv_heads
from jpaged.quantization import packed_module

FMT = PackedFormat(4, 32)


def _config(**overrides) -> ModelConfig:
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=96, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
    return ModelConfig.from_hf_dict({**base, **overrides})


def test_packed_leaves_shard_as_their_float_parameter():
    config = _config()
    float_shapes = {n: x.shape for n, x in flatten(abstract_params(config)).items()}
    modules = [n.removesuffix(".kernel") for n in float_shapes if n.endswith(".kernel")] + ["embed"]
    packed = flatten(abstract_params(config, quant={m: FMT for m in modules}))
    assert {n for n in packed if packed_module(n)} == {f"{m}.{leaf}" for m in modules
                                                        for leaf in ("qweight", "scales", "mins")}
    for name, x in packed.items():
        if packed_module(name) is None:
            continue
        module = packed_module(name)[0]
        float_name = "embed" if module == "embed" else f"{module}.kernel"
        float_spec = tuple(param_spec(float_name, float_shapes[float_name], 2))
        # Leaves are [out, ...]: a kernel [in, out]'s axes reversed, the embedding's [V, D] as is.
        expected = float_spec if module == "embed" else float_spec[::-1]
        assert tuple(param_spec(name, x.shape, 2)) == expected, name
    assert param_spec("layers.0.attn.q_proj.qweight", (64, 32), 2) == P("tp", None)  # column-parallel: rows
    assert param_spec("layers.0.mlp.down_proj.scales", (64, 4), 2) == P(None, "tp")  # row-parallel: groups


@pytest.mark.parametrize("num_kv_heads,tp", [(1, 2), (2, 4)])
def test_repeating_packed_kv_heads_equals_repeating_the_float_kernel(num_kv_heads, tp):
    config = _config(num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=16)
    rng = np.random.default_rng(0)
    rows = num_kv_heads * 16  # k_proj outputs
    leaves = {"qweight": pack_ints(rng.integers(0, 16, (rows, 64), dtype=np.uint8), 4),
              "scales": rng.standard_normal((rows, 2)).astype(np.float32),
              "mins": rng.standard_normal((rows, 2)).astype(np.float32)}
    repeated = {leaf: repeat_kv_heads(f"layers.0.attn.k_proj.{leaf}", x, config, tp) for leaf, x in leaves.items()}
    kernel = unpack(leaves["qweight"], leaves["scales"], leaves["mins"], FMT, np).T  # [D, K*H]
    expected = repeat_kv_heads("layers.0.attn.k_proj.kernel", kernel, config, tp)
    got = unpack(repeated["qweight"], repeated["scales"], repeated["mins"], FMT, np).T
    np.testing.assert_array_equal(got, expected)
