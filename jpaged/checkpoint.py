"""jpaged's converted-checkpoint folder: HF config + tokenizer files, orbax params, sha256 manifest.

    OUT/
      config.json               the HF config (what ModelConfig reads)
      generation_config.json    when the source had one
      tokenizer.json, tokenizer_config.json, ...   with the chat template
      params/                   orbax checkpoint of the parameter tree
      jpaged_manifest.json      format version, dtype, every parameter's shape, every file's sha256
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jpaged.models.config import ModelConfig
from jpaged.models.params import ParamTree, abstract_params, flatten, unflatten

MANIFEST = "jpaged_manifest.json"
PARAMS_DIR = "params"
FORMAT = "jpaged-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A converted checkpoint is missing, corrupted or does not match its config."""


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def save_params(out_dir: Path, params: ParamTree) -> None:
    """Writes the parameter tree (numpy or jax arrays) as an orbax checkpoint under out_dir/params."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((out_dir / PARAMS_DIR).absolute(), params)
    checkpointer.wait_until_finished()


def write_manifest(out_dir: Path, params: ParamTree, dtype: str, source: str) -> None:
    """Records every parameter's shape and every file's sha256; written last."""
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype,
        "source": source,
        "params": {name: list(np.shape(x)) for name, x in flatten(params).items()},
        "files": {str(p.relative_to(out_dir)): _sha256(p) for p in _files(out_dir)},
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a jpaged checkpoint (no {MANIFEST}); run `jpaged convert` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: unknown checkpoint format {manifest.get('format')!r} v{manifest.get('version')}")
    return manifest


def verify_files(ckpt_dir: Path, manifest: dict[str, Any]) -> None:
    """Checks that the folder holds exactly the manifest's files, each with its sha256."""
    listed = manifest["files"]
    present = {str(p.relative_to(ckpt_dir)) for p in _files(ckpt_dir)}
    for name in sorted(set(listed) - present):
        raise CheckpointError(f"{ckpt_dir}: file {name} listed in the manifest is missing")
    for name in sorted(present - set(listed)):
        raise CheckpointError(f"{ckpt_dir}: unexpected file {name} not in the manifest")
    for name, digest in listed.items():
        if _sha256(ckpt_dir / name) != digest:
            raise CheckpointError(f"{ckpt_dir}: file {name} is corrupted (sha256 mismatch)")


def verify_shapes(ckpt_dir: Path, config: ModelConfig, manifest: dict[str, Any]) -> None:
    """Checks every stored parameter's shape against the config, before anything is allocated."""
    expected = {name: list(x.shape) for name, x in flatten(abstract_params(config)).items()}
    stored = manifest["params"]
    for name in sorted(set(expected) | set(stored)):
        if name not in stored:
            raise CheckpointError(f"{ckpt_dir}: parameter {name} is missing")
        if name not in expected:
            raise CheckpointError(f"{ckpt_dir}: parameter {name} is not part of {config.architecture}")
        if stored[name] != expected[name]:
            raise CheckpointError(
                f"{ckpt_dir}: parameter {name} has shape {tuple(stored[name])}, config expects {tuple(expected[name])}"
            )


def load_params(ckpt_dir: str | Path, config: ModelConfig, dtype, *, check_hashes: bool = True) -> ParamTree:
    """Verifies a checkpoint and restores its parameters onto the default device in `dtype`."""
    import orbax.checkpoint as ocp

    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    if check_hashes:
        verify_files(ckpt_dir, manifest)
    verify_shapes(ckpt_dir, config, manifest)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {
        name: jax.ShapeDtypeStruct(x.shape, dtype, sharding=sharding)
        for name, x in flatten(abstract_params(config)).items()
    }
    return ocp.StandardCheckpointer().restore((ckpt_dir / PARAMS_DIR).absolute(), unflatten(target))
