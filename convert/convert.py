"""`jpaged convert SRC OUT`: an HF folder or a GGUF file -> a jpaged checkpoint folder.

The output is built in a temporary sibling folder and renamed into place at the end, so OUT
is either complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from convert.errors import ConversionError
from convert.gguf_source import GGUFSource
from convert.hf_source import PICKLE_SUFFIXES, HFSource
from convert.names import map_name
from jpaged import checkpoint
from jpaged.models.config import ModelConfig
from jpaged.models.params import abstract_params, flatten, unflatten

DTYPES = ("float32", "bfloat16", "float16")


def open_source(src: Path) -> HFSource | GGUFSource:
    if not src.exists():
        raise ConversionError(f"{src}: no such file or folder")
    if src.is_dir():
        return HFSource(src)
    if src.suffix == ".gguf":
        return GGUFSource(src)
    if src.suffix in PICKLE_SUFFIXES:
        raise ConversionError(f"{src.name}: refusing pickle checkpoint (it can run arbitrary code); use safetensors")
    raise ConversionError(f"{src}: expected an HF model folder or a .gguf file")


def _numpy_dtype(name: str):
    import ml_dtypes

    return {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[name]


def _collect_params(source, config: ModelConfig, dtype: str, progress: bool) -> dict[str, np.ndarray]:
    """Maps every source tensor to our tree; every expected parameter must be filled exactly once."""
    from tqdm import tqdm

    expected = {name: x.shape for name, x in flatten(abstract_params(config)).items()}
    params: dict[str, np.ndarray] = {}
    target = _numpy_dtype(dtype)
    with tqdm(total=source.num_tensors(), desc="converting", unit="tensor", disable=not progress) as bar:
        for hf_name, tensor in source.tensors():
            bar.update(1)
            try:
                mapped = map_name(hf_name, tied_embeddings=config.tie_word_embeddings)
            except KeyError:
                raise ConversionError(f"unknown tensor {hf_name} for {config.architecture}") from None
            if mapped is None:
                continue
            path, transform = mapped
            if path not in expected:
                raise ConversionError(f"tensor {hf_name} maps to {path}, which {config.architecture} does not have")
            value = transform(np.asarray(tensor)).astype(target)
            if value.shape != expected[path]:
                raise ConversionError(
                    f"tensor {hf_name} has shape {tuple(tensor.shape)}; config expects {path} of shape {expected[path]}"
                )
            params[path] = value
    missing = sorted(set(expected) - set(params))
    if missing:
        raise ConversionError(f"missing tensor for {missing[0]} ({len(missing)} missing in all)")
    return params


def convert_checkpoint(src: str | Path, out: str | Path, *, dtype: str | None = None, progress: bool = True) -> Path:
    """Converts src into a jpaged checkpoint at out. Raises ConversionError with a one-line reason."""
    src, out = Path(src), Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"unsupported --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if out.exists():
        raise ConversionError(f"{out} already exists; remove it or choose another output folder")
    start = time.perf_counter()
    source = open_source(src)
    try:
        config = ModelConfig.from_hf_dict(source.hf_config)
    except (ValueError, KeyError) as e:
        raise ConversionError(f"{src}: {e}") from None
    dtype = dtype or (source.dtype if source.dtype in DTYPES else "float32")
    params = _collect_params(source, config, dtype, progress)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(source.hf_config, indent=2))
        source.copy_side_files(tmp)
        tree = unflatten(params)
        checkpoint.save_params(tmp, tree)
        checkpoint.write_manifest(tmp, tree, dtype, source=src.name)
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"converted {src.name} -> {out} ({dtype}, {config.num_params() / 1e6:.1f}M params) "
              f"in {time.perf_counter() - start:.1f}s")
    return out
