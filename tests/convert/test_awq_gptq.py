"""AWQ (GEMM) and GPTQ int4 checkpoints of a tiny Llama, written here by a numpy packer that follows
AutoAWQ's and AutoGPTQ's own pack loops, converted into jpaged's packed format: the unpacked
weights equal the reference dequantization (q - z) * s bit for bit, the logits equal HF's on those
weights, and what cannot be read exactly is refused with one line."""

from __future__ import annotations

import copy
import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from convert.convert import convert_checkpoint
from convert.errors import ConversionError
from jpaged import LLM, SamplingParams, checkpoint
from jpaged.models.config import ModelConfig
from jpaged.models.packed import PackedFormat, unpack
from jpaged.models.params import flatten
from tests.conftest import HAS_COMPILER, prefill_logits

# D and F multiples of 128, so every projection's input holds whole groups of 128.
TINY = dict(vocab_size=160, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
# The nibble order of AutoAWQ's pack loop (awq/modules/linear/gemm.py, order_map).
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
# name -> (quantization_config, the group jpaged stores)
FORMATS = {
    "awq": (dict(quant_method="awq", bits=4, group_size=128, zero_point=True, version="gemm"), 128),
    "gptq": (dict(quant_method="gptq", bits=4, group_size=64, desc_act=False, sym=False), 64),
    # desc_act with the trivial g_idx (static groups) reads; one group over all inputs -> groups of 128
    "gptq-sym-all-inputs": (dict(quant_method="gptq", bits=4, group_size=-1, desc_act=True, sym=True), 128),
    "gptq-v2": (dict(quant_method="gptq", bits=4, group_size=32, desc_act=False, sym=False,
                     checkpoint_format="gptq_v2"), 32),
}


def _pack_columns(x: np.ndarray, order: list[int]) -> np.ndarray:
    """AutoAWQ's / AutoGPTQ's qzeros loop: x [R, C] -> int32 [R, C / 8], word c's nibble i = column 8c + order[i]."""
    out = np.zeros((x.shape[0], x.shape[1] // 8), np.uint32)
    for col in range(out.shape[1]):
        for i in range(8):
            out[:, col] |= x[:, col * 8 + order[i]].astype(np.uint32) << (4 * i)
    return out.view(np.int32)


def _pack_rows(x: np.ndarray) -> np.ndarray:
    """AutoGPTQ's qweight loop: x [K, N] -> int32 [K / 8, N], row r's nibble j = input 8r + j."""
    out = np.zeros((x.shape[0] // 8, x.shape[1]), np.uint32)
    for row in range(out.shape[0]):
        for j in range(8):
            out[row] |= x[8 * row + j].astype(np.uint32) << (4 * j)
    return out.view(np.int32)


def _quantize(w: np.ndarray, config: dict, rng) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A float weight [out, in] -> (the module's AWQ/GPTQ tensors, the reference float32 kernel [in, out]).

    Round to nearest with a float16 scale per group and a random zero point (8 if symmetric); the
    reference is (q - z) * s computed in float32, which is exact for these integers and scales.
    """
    n, k = w.shape
    group = k if config["group_size"] == -1 else config["group_size"]
    kernel = w.T.reshape(k // group, group, n)  # [K/G, G, N]
    scales = (np.abs(kernel).max(axis=1) / 7).astype(np.float16)  # [K/G, N]
    v1 = config["quant_method"] == "gptq" and config.get("checkpoint_format", "gptq") == "gptq"
    # GPTQ v1 stores z - 1, so z = 0 has no stored form (AutoGPTQ's cast of -1 spills into the
    # neighbouring nibbles); a stored 15 is z = 16.
    zeros = np.full(scales.shape, 8) if config.get("sym") else rng.integers(1 if v1 else 0, 16, scales.shape)
    q = np.clip(np.rint(kernel / scales[:, None].astype(np.float32)) + zeros[:, None], 0, 15).astype(np.int64)
    if v1 and not config.get("sym"):
        zeros[0, :3] = 16  # stored as 15
    reference = ((q - zeros[:, None]).astype(np.float32) * scales[:, None].astype(np.float32)).reshape(k, n)
    q = q.reshape(k, n)
    if config["quant_method"] == "awq":
        parts = {"qweight": _pack_columns(q, AWQ_PACK_ORDER), "qzeros": _pack_columns(zeros, AWQ_PACK_ORDER)}
    else:
        stored = zeros - 1 if v1 else zeros
        parts = {"qweight": _pack_rows(q), "qzeros": _pack_columns(stored, list(range(8))),
                 "g_idx": (np.arange(k) // group).astype(np.int32)}
    return {**parts, "scales": scales}, reference


def write_checkpoint(hf_model, config: dict, folder):
    """Saves hf_model as an AWQ/GPTQ checkpoint in two shards (a module's scales apart from its
    qweight) and returns (reference HF model with the dequantized weights, {hf name: kernel [in, out]})."""
    rng = np.random.default_rng(0)
    tensors, kernels = {}, {}
    reference = copy.deepcopy(hf_model)
    state = reference.state_dict()
    for name, value in hf_model.state_dict().items():
        w = value.numpy()
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            module = name.removesuffix(".weight")
            parts, kernels[name] = _quantize(w, config, rng)
            tensors.update({f"{module}.{part}": x for part, x in parts.items()})
            if config["quant_method"] == "gptq":  # GPTQ-for-LLaMa era: a zero bias on every layer
                tensors[f"{module}.bias"] = np.zeros(w.shape[0], np.float16)
            state[name].copy_(torch.from_numpy(kernels[name].T))
        else:
            tensors[name] = w.astype(np.float16)  # AWQ and GPTQ keep the rest in float16
            state[name].copy_(torch.from_numpy(tensors[name].astype(np.float32)))
    folder.mkdir(parents=True)
    second = {name: x for name, x in tensors.items() if name.startswith("model.layers.1.mlp.up_proj.s")}
    shards = {"model-00001-of-00002.safetensors": {n: x for n, x in tensors.items() if n not in second},
              "model-00002-of-00002.safetensors": second}
    for file, shard in shards.items():
        # safetensors writes an array's buffer as it lies: a reduction's result may be F-ordered
        save_file({n: np.ascontiguousarray(x) for n, x in shard.items()}, str(folder / file))
    weight_map = {name: file for file, shard in shards.items() for name in shard}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    hf_config = {**hf_model.config.to_dict(), "torch_dtype": "float16", "quantization_config": config}
    (folder / "config.json").write_text(json.dumps(hf_config))
    return reference.eval(), kernels


@pytest.fixture(scope="module")
def float_model():
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def checkpoints(float_model, tmp_path_factory):
    """format -> (HF folder, converted folder, reference HF model, reference kernels), built on first use."""

    class Lazy(dict):
        def __missing__(self, name):
            root = tmp_path_factory.mktemp(name)
            reference, kernels = write_checkpoint(float_model, FORMATS[name][0], root / "hf")
            converted = convert_checkpoint(root / "hf", root / "converted", progress=False)
            self[name] = (root / "hf", converted, reference, kernels)
            return self[name]

    return Lazy()


def _load(folder, quantization: str = "auto") -> tuple[dict, dict]:
    config = ModelConfig.from_file(folder / "config.json")
    params = flatten(checkpoint.load_params(folder, config, jnp.float32, quantization=quantization))
    quant = checkpoint.stored_quantization(checkpoint.read_manifest(folder))
    return {k: np.asarray(v) for k, v in params.items()}, quant


def _module(hf_name: str) -> str:
    """"model.layers.0.self_attn.q_proj.weight" -> "layers.0.attn.q_proj"."""
    return hf_name.removeprefix("model.").removesuffix(".weight").replace("self_attn", "attn")


@pytest.mark.parametrize("name", list(FORMATS))
def test_unpacked_weights_equal_the_reference_bit_for_bit(name, checkpoints, float_model):
    _, folder, _, kernels = checkpoints[name]
    params, quant = _load(folder)
    assert set(quant) == {_module(n) for n in kernels} and len(quant) == 14
    assert set(quant.values()) == {PackedFormat(4, FORMATS[name][1])}
    for hf_name, kernel in kernels.items():
        module = _module(hf_name)
        w = unpack(*(params[f"{module}.{leaf}"] for leaf in ("qweight", "scales", "mins")), quant[module], np)
        np.testing.assert_array_equal(w, kernel.T, err_msg=module)  # [out, in]
    # The rest is float, as stored (float16); no zero biases were kept.
    embed = float_model.state_dict()["model.embed_tokens.weight"].numpy().astype(np.float16)
    np.testing.assert_array_equal(params["embed"], embed.astype(np.float32))
    assert "lm_head.kernel" in params and not any(k.endswith(".bias") for k in params)
    assert checkpoint.read_manifest(folder)["dtype"] == "float16"


# Both formats and both linear backends in two runs (each model build compiles its own step).
@pytest.mark.parametrize("name,linear", [("gptq", "xla"), ("awq", "cpu" if HAS_COMPILER else "xla")])
def test_logits_equal_hf_on_the_dequantized_weights(name, linear, checkpoints):
    _, folder, reference, _ = checkpoints[name]
    prompt = np.random.default_rng(1).integers(3, 160, size=12).tolist()
    ours = prefill_logits(folder, prompt, linear)
    with torch.no_grad():
        ref = reference(torch.tensor([prompt])).logits[0].numpy()
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-5


def test_llm_serves_the_hf_folder_packed_and_dequantized(checkpoints):
    """LLM(model=folder) converts into the cache with the packing kept; quantization="none"
    unpacks the same checkpoint to float at load."""
    hf_folder, _, reference, kernels = checkpoints["gptq"]
    prompt = np.random.default_rng(2).integers(3, 160, size=9).tolist()
    # XLA's backends: the C++ kernels' start-up measurement would double the test's time.
    llm = LLM(str(hf_folder), max_num_seqs=2, max_model_len=64, max_num_batched_tokens=32,
              attn_backend="xla", linear_backend="xla")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    with torch.no_grad():
        greedy = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out[0].outputs[0].token_ids == greedy[0, len(prompt):].tolist()
    assert llm.engine.weight_format == "packed int4-g64 x 14"
    params, _ = _load(llm.model_dir, quantization="none")
    for hf_name, kernel in kernels.items():
        np.testing.assert_array_equal(params[_module(hf_name) + ".kernel"], kernel)


def test_convert_none_stores_the_exact_float_weights(checkpoints, tmp_path):
    hf_folder, _, _, kernels = checkpoints["awq"]
    out = convert_checkpoint(hf_folder, tmp_path / "float", dtype="float32", quantization="none", progress=False)
    params, quant = _load(out)
    assert quant == {}
    for hf_name, kernel in kernels.items():
        np.testing.assert_array_equal(params[_module(hf_name) + ".kernel"], kernel)
    with pytest.raises(ConversionError, match="already quantized; use --quantization auto"):
        convert_checkpoint(hf_folder, tmp_path / "int8", quantization="int8", progress=False)


def _edit_config(src, dst, **changes):
    folder = shutil.copytree(src, dst)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# (format, quantization_config changes, the one line's text)
BAD_CONFIGS = [
    ("awq", dict(bits=8), "quantization_config.bits is 8; only 4-bit AWQ"),
    ("gptq", dict(bits=8), "quantization_config.bits is 8; only 4-bit GPTQ"),
    ("awq", dict(version="gemv"), 'quantization_config.version is "gemv"; only AWQ\'s gemm'),
    ("awq", dict(zero_point=False), "quantization_config.zero_point is false"),
    ("gptq", dict(checkpoint_format="marlin"), 'quantization_config.checkpoint_format is "marlin"'),
    ("gptq", dict(is_marlin_format=True), "quantization_config.is_marlin_format is true"),
    ("gptq", dict(group_size=100), "quantization_config.group_size is 100"),
    ("gptq", dict(quant_method="bitsandbytes"), 'quantization_config.quant_method is "bitsandbytes"; supported'),
]


@pytest.mark.parametrize("name,changes,message", BAD_CONFIGS)
def test_unsupported_configs_are_refused_with_one_line(name, changes, message, checkpoints, tmp_path, capsys):
    from jpaged.cli import main

    folder = _edit_config(checkpoints[name][0], tmp_path / "hf", **changes)
    assert main(["convert", str(folder), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def _replace_tensor(folder, name: str, value: np.ndarray) -> None:
    shard = folder / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    tensors[name] = value
    save_file(tensors, str(shard))


def test_act_order_g_idx_is_refused_naming_the_tensor(checkpoints, tmp_path):
    folder = _edit_config(checkpoints["gptq"][0], tmp_path / "hf", desc_act=True)
    name = "model.layers.0.mlp.down_proj.g_idx"
    act_order = np.random.default_rng(0).permutation(np.arange(256) // 64).astype(np.int32)  # groups interleaved
    _replace_tensor(folder, name, act_order)
    with pytest.raises(ConversionError, match="^" + re.escape(f"{name} is not input // group_size (act-order")):
        convert_checkpoint(folder, tmp_path / "out", progress=False)


def test_autogptq_quantize_config_json_is_read(checkpoints, tmp_path):
    """AutoGPTQ before transformers' integration: no quantization_config, a quantize_config.json."""
    folder = shutil.copytree(checkpoints["gptq"][0], tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    legacy = config.pop("quantization_config")
    del legacy["quant_method"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "quantize_config.json").write_text(json.dumps(legacy))
    out = convert_checkpoint(folder, tmp_path / "out", progress=False)
    assert set(_load(out)[1].values()) == {PackedFormat(4, 64)}


@pytest.mark.parametrize("name,shape", [("awq", (256, 15)), ("gptq", (128, 32))])  # [in, out/8 - 1], transposed
def test_qweight_of_the_wrong_shape_is_refused_naming_the_tensor(name, shape, checkpoints, tmp_path):
    folder = shutil.copytree(checkpoints[name][0], tmp_path / "hf")
    _replace_tensor(folder, "model.layers.1.mlp.down_proj.qweight", np.zeros(shape, np.int32))
    message = f"model.layers.1.mlp.down_proj.qweight is int32 {shape}; expected int32"
    with pytest.raises(ConversionError, match="^" + re.escape(message)):
        convert_checkpoint(folder, tmp_path / "out", progress=False)
