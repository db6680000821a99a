"""A tiny Llama GGUF of mixed block types converted with --quantization auto: mapped types stay
packed, the rest becomes float with a log line, and unpacking the result gives exactly the
checkpoint that --quantization none converts (gguf's dequantization, q/k rows un-permuted)."""

from __future__ import annotations

import logging

import gguf
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from convert.convert import convert_checkpoint
from jpaged import checkpoint
from jpaged.models.config import ModelConfig
from jpaged.models.params import flatten

D, F, HEADS, KV_HEADS = 64, 128, 4, 2
TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
# GGUF tensor -> (type, [rows, columns]): rows are outputs. IQ4_NL has no exact packed form.
TENSORS = {
    "token_embd.weight": ("Q8_0", (len(TOKENS), D)),
    "blk.0.attn_q.weight": ("Q4_0", (D, D)),
    "blk.0.attn_k.weight": ("Q5_0", (D // HEADS * KV_HEADS, D)),
    "blk.0.attn_v.weight": ("Q5_1", (D // HEADS * KV_HEADS, D)),
    "blk.0.attn_output.weight": ("Q4_1", (D, D)),
    "blk.0.ffn_gate.weight": ("IQ4_NL", (F, D)),
    "blk.0.ffn_up.weight": ("F32", (F, D)),
    "blk.0.ffn_down.weight": ("Q8_0", (D, F)),
}
F16_SCALES = {"Q8_0": [0], "Q4_0": [0], "Q5_0": [0], "Q5_1": [0, 2], "Q4_1": [0, 2], "IQ4_NL": [0]}


def _write_gguf(path, rng) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in [("context_length", 256), ("embedding_length", D), ("block_count", 1),
                       ("feed_forward_length", F), ("head_count", HEADS), ("head_count_kv", KV_HEADS)]:
        getattr(writer, f"add_{add}")(value)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(TOKENS)
    writer.add_token_types([2, 3, 3] + [6] * 256)
    writer.add_token_scores([0.0] * len(TOKENS))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        writer.add_tensor(name, rng.uniform(0.5, 1.5, D).astype(np.float32))
    for name, (type_name, (rows, cols)) in TENSORS.items():
        if type_name == "F32":
            writer.add_tensor(name, rng.standard_normal((rows, cols)).astype(np.float32))
            continue
        block, size = GGML_QUANT_SIZES[T[type_name]]
        blocks = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
        for offset in F16_SCALES[type_name]:  # random bytes there could be NaN
            scales = (rng.standard_normal(len(blocks)) * 0.05).astype(np.float16)
            blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
        writer.add_tensor(name, blocks.reshape(rows, -1), raw_dtype=T[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_mixed_types_convert_packed_and_unpack_to_the_float_conversion(tmp_path, caplog):
    src = tmp_path / "tiny.gguf"
    _write_gguf(src, np.random.default_rng(0))
    with caplog.at_level(logging.INFO, logger="convert.gguf_source"):
        packed = convert_checkpoint(src, tmp_path / "packed", progress=False)
    assert "blk.0.ffn_gate.weight is IQ4_NL, which has no exact packed form" in caplog.text
    as_float = convert_checkpoint(src, tmp_path / "float", quantization="none", progress=False)

    quant = checkpoint.stored_quantization(checkpoint.read_manifest(packed))
    assert {m: (f.bits, f.group_size) for m, f in quant.items()} == {
        "embed": (8, 32), "layers.0.attn.q_proj": (4, 32), "layers.0.attn.k_proj": (8, 32),
        "layers.0.attn.v_proj": (8, 32), "layers.0.attn.o_proj": (4, 32), "layers.0.mlp.down_proj": (8, 32)}
    assert checkpoint.stored_quantization(checkpoint.read_manifest(as_float)) == {}

    config = ModelConfig.from_file(packed / "config.json")
    unpacked = flatten(checkpoint.load_params(packed, config, jnp.float32, quantization="none"))
    reference = flatten(checkpoint.load_params(as_float, config, jnp.float32))
    assert unpacked.keys() == reference.keys()
    for name, ref in reference.items():
        np.testing.assert_array_equal(np.asarray(unpacked[name]), np.asarray(ref), err_msg=name)
