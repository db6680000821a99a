"""jpaged's converted-checkpoint folder: HF config + tokenizer files, orbax params, sha256 manifest.

    OUT/
      config.json               the HF config (what ModelConfig reads)
      generation_config.json    when the source had one
      tokenizer.json, tokenizer_config.json, ...   with the chat template
      params/                   orbax checkpoint of the parameter tree
      jpaged_manifest.json      format version, dtype, every parameter's shape, every file's sha256,
                                and "quantization": {module path: {bits, group_size}} for packed modules

Every file is sha256-checked against the manifest once; afterwards a stamp of it (size, mtime, ctime,
inode) in $JPAGED_HOME/verified/ stands in for the hash, and only files whose stamp changed are hashed
again. A stamp rather than hashing in a background thread: any write through the filesystem changes
ctime, which os.utime cannot set back, so nothing unverified is ever served and there is no race with
the first request; hashing the default model's 349 MB took 0.35-0.45 s of every load here. Damage below
the filesystem (bit rot) is caught only by JPAGED_VERIFY_CHECKPOINT=always, which re-hashes everything.

The arrays are read with TensorStore straight from orbax's files (orbax stays the format). Orbax's own
restore zero-fills each output, then reads, casts and device_puts one array at a time: 2.2-2.5 CPU-s for
the default model, a third of it in 272 device_puts. All reads at once, cast during the decode, into
64-byte-aligned arrays that XLA's CPU client adopts without a copy, take 1.2-1.4 CPU-s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jpaged.models.config import ModelConfig
from jpaged.models.params import ParamTree, abstract_params, flatten, unflatten
from jpaged.quantization import (
    Quantization, check_choice, dequantize_flat, describe, packed_module, quant_from_json,
    quant_to_json, quantize_flat, rtn_plan,
)

MANIFEST = "jpaged_manifest.json"
PARAMS_DIR = "params"
FORMAT = "jpaged-checkpoint"
VERSION = 1
VERIFY_ENV = "JPAGED_VERIFY_CHECKPOINT"
# A file changed this recently is hashed again next load: a second write in the same timestamp tick
# (1 s on some filesystems) would leave its stamp as it was.
RACY_WINDOW_NS = 2_000_000_000


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


def write_manifest(out_dir: Path, params: ParamTree, dtype: str, source: str,
                   quant: Quantization | None = None) -> None:
    """Records every parameter's shape, the packed modules' formats and every file's sha256; written last."""
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype,
        "source": source,
        "quantization": quant_to_json(quant or {}),
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


def _stamp_file(ckpt_dir: Path) -> Path:
    from jpaged.model_files import jpaged_home  # imported here: model_files imports this module

    key = hashlib.sha256(str(ckpt_dir.resolve()).encode()).hexdigest()[:16]
    return jpaged_home() / "verified" / f"{key}.json"


def _read_stamps(path: Path) -> dict[str, Any]:
    """name -> [sha256, size, mtime_ns, ctime_ns, ino]; unreadable or corrupt means nothing is trusted."""
    try:
        stamps = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _write_stamps(path: Path, stamps: dict[str, Any]) -> None:
    # temp file + rename: a concurrent load reads the old stamps or the new ones, never half a file.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    except OSError:
        return  # a read-only cache only costs the next load a full re-hash
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(stamps, f)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def verify_files(ckpt_dir: Path, manifest: dict[str, Any]) -> int:
    """Checks that the folder holds exactly the manifest's files, each with its sha256.

    Files whose stamp (see the module docstring) is unchanged since they last verified are not
    re-hashed, unless JPAGED_VERIFY_CHECKPOINT=always. Returns how many files were hashed.
    """
    mode = os.environ.get(VERIFY_ENV, "")
    if mode not in ("", "always"):
        raise ValueError(f"{VERIFY_ENV}={mode!r}: expected 'always' or unset")
    listed = manifest["files"]
    present = {str(p.relative_to(ckpt_dir)) for p in _files(ckpt_dir)}
    for name in sorted(set(listed) - present):
        raise CheckpointError(f"{ckpt_dir}: file {name} listed in the manifest is missing")
    for name in sorted(present - set(listed)):
        raise CheckpointError(f"{ckpt_dir}: unexpected file {name} not in the manifest")
    stamp_file = _stamp_file(ckpt_dir)
    old = {} if mode == "always" else _read_stamps(stamp_file)
    stamps, num_hashed = {}, 0
    settled = time.time_ns() - RACY_WINDOW_NS
    for name, digest in sorted(listed.items()):
        path = ckpt_dir / name
        stat = _stat(path)  # taken before reading: a write during hashing changes it, so it re-hashes next time
        if old.get(name) != [digest, *stat]:
            num_hashed += 1
            if _sha256(path) != digest:
                raise CheckpointError(f"{ckpt_dir}: file {name} is corrupted (sha256 mismatch)")
        if stat[2] < settled:  # see RACY_WINDOW_NS
            stamps[name] = [digest, *stat]
    if stamps != old:
        _write_stamps(stamp_file, stamps)
    return num_hashed


def stored_quantization(manifest: dict[str, Any], ckpt_dir: Path | None = None) -> Quantization:
    """The packed modules' formats the manifest records ({} for a float checkpoint)."""
    try:
        return quant_from_json(manifest.get("quantization"))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{ckpt_dir}: bad quantization entry in the manifest: {e}") from None


def verify_shapes(ckpt_dir: Path, config: ModelConfig, manifest: dict[str, Any]) -> None:
    """Checks every stored parameter's shape against the config (and the packed formats the
    manifest names), before anything reaches the device."""
    try:
        abstract = abstract_params(config, quant=stored_quantization(manifest, ckpt_dir))
    except ValueError as e:  # a group size that does not divide a layer's input
        raise CheckpointError(f"{ckpt_dir}: {e}") from None
    expected = {name: list(x.shape) for name, x in flatten(abstract).items()}
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


def _array_specs(params_dir: Path, names: list[str]) -> list[dict[str, Any]]:
    """TensorStore specs of orbax's own files: one zarr array per parameter, keyed by its dotted name."""
    try:
        meta = json.loads((params_dir / "_METADATA").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{params_dir}: unreadable orbax metadata: {e}") from None
    driver = "zarr3" if meta.get("use_zarr3", False) else "zarr"
    if meta.get("use_ocdbt", True):
        base = {"driver": "ocdbt", "base": f"file://{params_dir}"}
        return [{"driver": driver, "kvstore": {**base, "path": f"{name}/"}} for name in names]
    return [{"driver": driver, "kvstore": {"driver": "file", "path": f"{params_dir / name}/"}} for name in names]


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized array on a 64-byte boundary, which XLA's CPU client adopts without copying."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buf = np.empty(nbytes + 64, np.uint8)
    start = -buf.ctypes.data % 64
    return buf[start : start + nbytes].view(dtype).reshape(shape)


def _start_reads(params_dir: Path, shapes: dict[str, list[int]], dtype) -> tuple[list[np.ndarray], list[Any]]:
    """Starts reading each parameter {name: shape} into a new host array in `dtype` (packed leaves
    in their stored dtype: uint8 integers, float32 scales); returns the arrays and TensorStore's
    futures. All reads are in flight at once on its threads, each cast during its decode.
    """
    import tensorstore as ts

    specs = _array_specs(params_dir, list(shapes))
    context = ts.Context()  # shared: one OCDBT manifest read and one thread pool for all arrays
    dtypes = [np.dtype(np.uint8 if name.endswith(".qweight") else np.float32 if packed_module(name) else dtype)
              for name in shapes]
    with _reading(params_dir):
        opening = [ts.open(spec, read=True, context=context) for spec in specs]
        stores = [ts.cast(future.result(), ts.dtype(dt.name)) for future, dt in zip(opening, dtypes)]
    for (name, shape), store in zip(shapes.items(), stores):
        if list(store.shape) != shape:  # TensorStore would broadcast a size-1 dimension
            raise CheckpointError(
                f"{params_dir}: {name} is stored as {tuple(store.shape)}, the manifest says {tuple(shape)}"
            )
    arrays = [_aligned_empty(tuple(shape), dt) for shape, dt in zip(shapes.values(), dtypes)]
    with _reading(params_dir):
        return arrays, [ts.array(out, copy=False, write=True).write(store) for out, store in zip(arrays, stores)]


@contextlib.contextmanager
def _reading(params_dir: Path):
    try:
        yield
    except ValueError as e:  # TensorStore reports missing, bad or truncated data as ValueError
        raise CheckpointError(f"{params_dir}: cannot read the parameters: {e}") from None


def served_quantization(ckpt_dir: str | Path, config: ModelConfig, quantization: str = "auto") -> Quantization:
    """The packed modules the model is served with, for a `--quantization` choice: the checkpoint's
    own (auto), none, or a round-to-nearest scheme of a float checkpoint's layers."""
    check_choice(quantization)
    stored = stored_quantization(read_manifest(Path(ckpt_dir)), ckpt_dir)
    if quantization == "auto":
        return stored
    if quantization == "none":
        return {}
    if stored:
        raise ValueError(f"{Path(ckpt_dir).name} is already quantized ({describe(stored)}); "
                         f"use quantization auto (as stored) or none (float), not {quantization}")
    return rtn_plan({name: x.shape for name, x in flatten(abstract_params(config)).items()}, quantization)


def load_params(
    ckpt_dir: str | Path,
    config: ModelConfig,
    dtype,
    *,
    check_hashes: bool = True,
    sharding: jax.sharding.Sharding | Callable[[str], jax.sharding.Sharding] | None = None,
    transform: Callable[[str, np.ndarray], np.ndarray] | None = None,
    quantization: str = "auto",
) -> ParamTree:
    """Verifies a checkpoint and restores its parameters as jax arrays in `dtype` (packed leaves
    keep theirs: uint8 integers, float32 scales and minimums).

    Args:
        sharding: where each array goes: one Sharding for all, or a function of the dotted parameter
            name; SingleDeviceSharding(jax.devices()[0]) by default.
        transform: (dotted name, host array) -> the host array to place, applied after the shape
            check and before the transfer (tensor parallelism repeats KV heads here).
    """
    ckpt_dir = Path(ckpt_dir).absolute()
    manifest = read_manifest(ckpt_dir)
    if check_hashes:
        verify_files(ckpt_dir, manifest)
    names = sorted(manifest["params"])
    arrays, reads = _start_reads(ckpt_dir / PARAMS_DIR, {name: manifest["params"][name] for name in names}, dtype)
    # The shape check runs while TensorStore decodes; nothing reaches the device before the shapes match.
    verify_shapes(ckpt_dir, config, manifest)
    with _reading(ckpt_dir / PARAMS_DIR):
        for read in reads:
            read.result()
    stored = stored_quantization(manifest, ckpt_dir)
    for name, x in zip(names, arrays):
        # A NaN or infinite scale would silently poison every weight of its group.
        if name.endswith((".scales", ".mins")) and not np.isfinite(x).all():
            raise CheckpointError(f"{ckpt_dir}: packed tensor {name} holds non-finite values")
    if quantization != "auto" and (stored or quantization != "none"):
        flat = dict(zip(names, arrays))
        if quantization == "none":
            flat = dequantize_flat(flat, stored)
        else:
            served_quantization(ckpt_dir, config, quantization)  # refuses an already packed checkpoint
            flat, _ = quantize_flat(flat, quantization)
        names = sorted(flat)
        arrays = [flat[name] if packed_module(name) else np.asarray(flat[name], dtype) for name in names]
    if transform is not None:
        arrays = [transform(name, x) for name, x in zip(names, arrays)]
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = [sharding(name) if callable(sharding) else sharding for name in names]
    # One batched transfer; on the CPU backend the aligned host arrays become the jax arrays, no copy.
    return unflatten(dict(zip(names, jax.device_put(arrays, shardings))))
