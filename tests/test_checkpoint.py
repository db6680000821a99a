"""Loading a converted checkpoint: values as orbax restores them, the hash paid once, every corruption caught."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jpaged import checkpoint
from jpaged.models.config import ModelConfig
from jpaged.models.params import flatten, unflatten


@pytest.fixture
def ckpt(tiny_models, tmp_path, monkeypatch):
    """A private copy of the converted tiny llama, with the racy-stamp window off (see test_fresh_file_...)."""
    monkeypatch.setattr(checkpoint, "RACY_WINDOW_NS", 0)
    monkeypatch.delenv(checkpoint.VERIFY_ENV, raising=False)
    return shutil.copytree(tiny_models["llama"][2], tmp_path / "ckpt")


@pytest.fixture
def num_hashed(monkeypatch):
    """Counts sha256 computations per file name."""
    counts: dict[str, int] = {}
    real = checkpoint._sha256

    def counting(path):
        counts[path.name] = counts.get(path.name, 0) + 1
        return real(path)

    monkeypatch.setattr(checkpoint, "_sha256", counting)
    return counts


def _config(folder):
    return ModelConfig.from_file(folder / "config.json")


def _weight_file(folder):
    """The largest file under params/: array data, not metadata."""
    return max((p for p in (folder / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _orbax_reference(folder):
    """What orbax's own restore gives, as numpy, by dotted name."""
    tree = ocp.PyTreeCheckpointer().restore((folder / "params").absolute())
    return {name: np.asarray(x) for name, x in flatten(tree).items()}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_are_what_orbax_restores_on_device_0(ckpt, dtype):
    params = flatten(checkpoint.load_params(ckpt, _config(ckpt), dtype))
    ref = _orbax_reference(ckpt)
    assert set(params) == set(ref)
    for name, x in params.items():
        assert isinstance(x, jax.Array) and x.dtype == dtype and x.devices() == {jax.devices()[0]}, name
        np.testing.assert_array_equal(np.asarray(x), ref[name].astype(dtype), err_msg=name)


@pytest.mark.parametrize("use_ocdbt", [True, False])
@pytest.mark.parametrize("use_zarr3", [True, False])
def test_every_orbax_layout_loads(ckpt, use_ocdbt, use_zarr3):
    """Checkpoints written with other orbax options (older or future defaults) still load."""
    rng = np.random.default_rng(0)
    tree = {name: rng.standard_normal(x.shape).astype(np.float32) for name, x in _orbax_reference(ckpt).items()}
    shutil.rmtree(ckpt / "params")
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)
    ocp.Checkpointer(handler).save((ckpt / "params").absolute(), unflatten(tree))
    checkpoint.write_manifest(ckpt, unflatten(tree), "float32", source="test")
    params = flatten(checkpoint.load_params(ckpt, _config(ckpt), jnp.float32))
    for name, x in tree.items():
        np.testing.assert_array_equal(np.asarray(params[name]), x, err_msg=name)


def test_sharding_is_chosen_per_parameter(ckpt):
    device = jax.devices()[0]
    asked = []

    def sharding(name):
        asked.append(name)
        return jax.sharding.SingleDeviceSharding(device)

    params = flatten(checkpoint.load_params(ckpt, _config(ckpt), jnp.float32, sharding=sharding))
    assert sorted(asked) == sorted(params) == sorted(checkpoint.read_manifest(ckpt)["params"])


def test_second_load_hashes_nothing(ckpt, num_hashed):
    config = _config(ckpt)
    checkpoint.load_params(ckpt, config, jnp.float32)
    assert sum(num_hashed.values()) == len(checkpoint.read_manifest(ckpt)["files"])
    num_hashed.clear()
    checkpoint.load_params(ckpt, config, jnp.float32)
    assert num_hashed == {}
    assert not any(p.suffix == ".tmp" for p in checkpoint._stamp_file(ckpt).parent.iterdir())


@pytest.mark.parametrize("restore_mtime", [False, True])
def test_flipped_byte_after_first_load_is_caught(ckpt, num_hashed, restore_mtime):
    config = _config(ckpt)
    checkpoint.load_params(ckpt, config, jnp.float32)
    victim = _weight_file(ckpt)
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    if restore_mtime:  # os.utime can reset mtime, not ctime
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert victim.stat().st_mtime_ns == st.st_mtime_ns and victim.stat().st_size == st.st_size
    num_hashed.clear()
    name = str(victim.relative_to(ckpt))
    with pytest.raises(checkpoint.CheckpointError, match=f"file {name} is corrupted"):
        checkpoint.load_params(ckpt, config, jnp.float32)
    assert num_hashed == {victim.name: 1}  # only the changed file was hashed again
    with pytest.raises(checkpoint.CheckpointError, match="corrupted"):  # a failed check records nothing
        checkpoint.load_params(ckpt, config, jnp.float32)


def test_truncated_file_is_a_clear_error_with_or_without_hashes(ckpt):
    config = _config(ckpt)
    checkpoint.load_params(ckpt, config, jnp.float32)
    victim = _weight_file(ckpt)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match=f"file {victim.relative_to(ckpt)} is corrupted"):
        checkpoint.load_params(ckpt, config, jnp.float32)
    with pytest.raises(checkpoint.CheckpointError, match="cannot read the parameters"):
        checkpoint.load_params(ckpt, config, jnp.float32, check_hashes=False)


@pytest.mark.parametrize("garbage", [b"{not json", b"[1, 2]", b'{"config.json": "x"}', b""])
def test_corrupt_stamp_file_means_verify_everything(ckpt, num_hashed, garbage):
    config = _config(ckpt)
    checkpoint.load_params(ckpt, config, jnp.float32)
    stamp_file = checkpoint._stamp_file(ckpt)
    stamp_file.write_bytes(garbage)
    num_hashed.clear()
    checkpoint.load_params(ckpt, config, jnp.float32)
    assert sum(num_hashed.values()) == len(checkpoint.read_manifest(ckpt)["files"])
    assert set(json.loads(stamp_file.read_text())) == set(checkpoint.read_manifest(ckpt)["files"])  # rewritten


def test_stamps_live_in_jpaged_home_not_in_the_checkpoint(ckpt, jpaged_home):
    checkpoint.load_params(ckpt, _config(ckpt), jnp.float32)
    assert checkpoint._stamp_file(ckpt).parent == jpaged_home / "verified"
    assert checkpoint._stamp_file(ckpt).is_file()
    assert checkpoint._stamp_file(ckpt) != checkpoint._stamp_file(ckpt.parent)


def test_env_forces_full_rehash(ckpt, num_hashed, monkeypatch):
    config = _config(ckpt)
    checkpoint.load_params(ckpt, config, jnp.float32)
    num_hashed.clear()
    monkeypatch.setenv(checkpoint.VERIFY_ENV, "always")
    checkpoint.load_params(ckpt, config, jnp.float32)
    assert sum(num_hashed.values()) == len(checkpoint.read_manifest(ckpt)["files"])
    monkeypatch.setenv(checkpoint.VERIFY_ENV, "sometimes")
    with pytest.raises(ValueError, match="JPAGED_VERIFY_CHECKPOINT='sometimes'"):
        checkpoint.load_params(ckpt, config, jnp.float32)


def test_check_hashes_false_hashes_nothing(ckpt, num_hashed):
    checkpoint.load_params(ckpt, _config(ckpt), jnp.float32, check_hashes=False)
    assert num_hashed == {}


def test_fresh_file_is_not_trusted_by_its_stamp(ckpt, num_hashed, monkeypatch):
    """A file changed within the timestamp granularity could change again unseen, so it is hashed again."""
    monkeypatch.setattr(checkpoint, "RACY_WINDOW_NS", 3600 * 10**9)
    config = _config(ckpt)
    checkpoint.load_params(ckpt, config, jnp.float32)
    num_hashed.clear()
    checkpoint.load_params(ckpt, config, jnp.float32)
    assert sum(num_hashed.values()) == len(checkpoint.read_manifest(ckpt)["files"])


def test_bf16_checkpoint_widens_exactly(tiny_models, tmp_path):
    """Stored bfloat16 read as float32: the cast is exact, so values equal orbax's bf16 widened by numpy."""
    from jpaged.cli import main

    out = tmp_path / "bf16"
    assert main(["convert", str(tiny_models["qwen2"][1]), str(out), "--dtype", "bfloat16"]) == 0
    params = flatten(checkpoint.load_params(out, _config(out), jnp.float32))
    ref = _orbax_reference(out)
    assert ref["embed"].dtype == ml_dtypes.bfloat16
    for name, x in params.items():
        np.testing.assert_array_equal(np.asarray(x), ref[name].astype(np.float32), err_msg=name)
