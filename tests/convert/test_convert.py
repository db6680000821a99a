"""Conversion: the name table covers every HF key, and every bad input is a one-line error with no OUT."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert.names import map_name
from jpaged import checkpoint
from jpaged.cli import main
from jpaged.models.config import ModelConfig
from jpaged.models.params import abstract_params, flatten
from tests.conftest import TINY_MODELS


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_every_hf_key_is_mapped_or_dropped(name, tiny_models):
    hf_model, hf_folder, _ = tiny_models[name]
    config = ModelConfig.from_file(hf_folder / "config.json")
    keys = set(hf_model.state_dict()) | set(load_file(hf_folder / "model.safetensors"))
    mapped = {}
    for key in keys:
        entry = map_name(key, tied_embeddings=config.tie_word_embeddings)  # KeyError = unmapped key
        if entry is not None:
            assert entry[0] not in mapped, f"{key} and {mapped.get(entry[0])} map to the same parameter"
            mapped[entry[0]] = key
    assert set(mapped) == set(flatten(abstract_params(config)))


def test_converted_values_are_hf_weights(tiny_models):
    hf_model, _, converted = tiny_models["llama"]
    config = ModelConfig.from_file(converted / "config.json")
    params = flatten(checkpoint.load_params(converted, config, jnp.float32))
    sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    np.testing.assert_array_equal(params["layers.1.attn.k_proj.kernel"], sd["model.layers.1.self_attn.k_proj.weight"].T)
    np.testing.assert_array_equal(params["embed"], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["lm_head.kernel"], sd["lm_head.weight"].T)


def test_dtype_option_rounds_weights(tiny_models, tmp_path):
    hf_model, hf_folder, _ = tiny_models["qwen2"]
    out = tmp_path / "bf16"
    assert main(["convert", str(hf_folder), str(out), "--dtype", "bfloat16"]) == 0
    assert checkpoint.read_manifest(out)["dtype"] == "bfloat16"
    config = ModelConfig.from_file(out / "config.json")
    params = flatten(checkpoint.load_params(out, config, jnp.float32))
    ref = hf_model.state_dict()["model.layers.0.self_attn.q_proj.bias"].numpy()
    np.testing.assert_array_equal(params["layers.0.attn.q_proj.bias"], ref.astype(ml_dtypes.bfloat16).astype(np.float32))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _corrupt_header(folder):
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))


def _truncate(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_tensor(folder):
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")


def _unsupported_arch(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))


def _pickle_only(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def _missing_shard(folder):
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


BAD_SOURCES = {
    "corrupted": (_corrupt_header, "model.safetensors"),
    "truncated": (_truncate, "model.safetensors"),
    "missing-tensor": (_drop_tensor, "layers.1.mlp.up_proj"),
    "unsupported-arch": (_unsupported_arch, "GPT2LMHeadModel"),
    "pickle": (_pickle_only, "pytorch_model.bin"),
    "missing-config": (lambda f: (f / "config.json").unlink(), "config.json"),
    "missing-shard": (_missing_shard, "model-00002-of-00002.safetensors"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source_is_one_line_error_without_output(case, tiny_models, tmp_path, capsys):
    damage, must_mention = BAD_SOURCES[case]
    src = _copy(tiny_models["llama"][1], tmp_path / "src")
    damage(src)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["convert", str(src), str(out)]) == 1
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # earlier lines can only be the progress bar
    assert last.startswith("jpaged convert: error:") and must_mention in last, err
    assert "Traceback" not in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no half-written temp folder either


def test_pickle_file_and_existing_output_are_refused(tiny_models, tmp_path, capsys):
    (tmp_path / "model.pt").write_bytes(b"\x80\x04not really")
    assert main(["convert", str(tmp_path / "model.pt"), str(tmp_path / "out")]) == 1
    assert "pickle" in capsys.readouterr().err
    existing = tmp_path / "existing"
    existing.mkdir()
    assert main(["convert", str(tiny_models["llama"][1]), str(existing)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert list(existing.iterdir()) == []


def test_module_entry_point_exits_nonzero_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jpaged", "convert", str(tmp_path / "nope"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("jpaged convert: error:")
    assert "no such file" in proc.stderr


def test_load_rejects_corrupted_files_and_mismatched_config(tiny_models, tmp_path):
    ckpt = _copy(tiny_models["llama"][2], tmp_path / "ckpt")
    config = ModelConfig.from_file(ckpt / "config.json")
    victim = next(p for p in sorted((ckpt / "params").rglob("*")) if p.is_file() and p.stat().st_size > 100)
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    with pytest.raises(checkpoint.CheckpointError, match="corrupted"):
        checkpoint.load_params(ckpt, config, jnp.float32)

    bigger = ModelConfig.from_hf_dict({**json.loads((ckpt / "config.json").read_text()), "intermediate_size": 256})
    with pytest.raises(checkpoint.CheckpointError, match=r"layers.0.mlp.down_proj.kernel has shape \(128, 64\)"):
        checkpoint.load_params(tiny_models["llama"][2], bigger, jnp.float32)
