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
from convert.packed_tensor import PackedTensor
from jpaged import checkpoint
from jpaged.models.config import ModelConfig
from jpaged.models.params import abstract_params, flatten, unflatten
from jpaged.quantization import CHOICES, Quantization, describe, quantize_flat, weight_bytes

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


def _collect_params(source, config: ModelConfig, dtype: str, progress: bool,
                    packed: bool = False) -> tuple[dict[str, np.ndarray], Quantization]:
    """Maps every source tensor to our tree; every expected parameter must be filled exactly once.
    With packed=True (--quantization auto) a GGUF's block-typed tensors and an AWQ/GPTQ
    checkpoint's quantized layers stay packed."""
    from tqdm import tqdm

    expected = {name: x.shape for name, x in flatten(abstract_params(config)).items()}
    params: dict[str, np.ndarray] = {}
    quant: Quantization = {}
    target = _numpy_dtype(dtype)
    tensors = source.tensors(packed=packed)
    with tqdm(total=source.num_tensors(), desc="converting", unit="tensor", disable=not progress) as bar:
        for hf_name, tensor in tensors:
            bar.update(1)
            try:
                mapped = map_name(hf_name, tied_embeddings=config.tie_word_embeddings)
            except KeyError:
                raise ConversionError(f"unknown tensor {hf_name} for {config.architecture}") from None
            if mapped is None:
                continue
            path, transform = mapped
            if path not in expected and path.endswith(".bias") and not np.any(tensor):
                continue  # GPTQ checkpoints of bias-free models may store a zero bias for each layer
            if path not in expected:
                raise ConversionError(f"tensor {hf_name} maps to {path}, which {config.architecture} does not have")
            if isinstance(tensor, PackedTensor):
                _add_packed(params, quant, hf_name, path, tensor, expected[path])
                continue
            value = transform(np.asarray(tensor)).astype(target)
            if value.shape != expected[path]:
                raise ConversionError(
                    f"tensor {hf_name} has shape {tuple(tensor.shape)}; config expects {path} of shape {expected[path]}"
                )
            params[path] = value
    missing = sorted(set(expected) - set(params) - {"embed" if m == "embed" else f"{m}.kernel" for m in quant})
    if missing:
        raise ConversionError(f"missing tensor for {missing[0]} ({len(missing)} missing in all)")
    return params, quant


def _add_packed(params: dict, quant: Quantization, hf_name: str, path: str, tensor: PackedTensor, shape) -> None:
    """A packed GGUF tensor as the packed leaves of the module that `path` (a kernel or the embedding) names."""
    out, inp = tensor.shape
    logical = (out, inp) if path == "embed" else (inp, out)  # kernels are [in, out], the embedding [V, D]
    if logical != tuple(shape) or not (path == "embed" or path.endswith(".kernel")):
        raise ConversionError(f"tensor {hf_name} ({tensor.type_name}) has shape {(out, inp)}; "
                              f"config expects {path} of shape {tuple(shape)}")
    module = path.removesuffix(".kernel")
    params.update({f"{module}.{leaf}": value for leaf, value in tensor.leaves.items()})
    quant[module] = tensor.fmt


def convert_checkpoint(src: str | Path, out: str | Path, *, dtype: str | None = None, progress: bool = True,
                       quantization: str = "auto") -> Path:
    """Converts src into a jpaged checkpoint at out. Raises ConversionError with a one-line reason.

    quantization (jpaged.quantization): auto keeps a GGUF's block types and an AWQ/GPTQ
    checkpoint's layers packed and float float; none stores float; int8/int4/int4-g128 round a
    float source's layers to nearest.
    """
    src, out = Path(src), Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"unsupported --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if quantization not in CHOICES:
        raise ConversionError(f"unsupported --quantization {quantization!r}; choose one of {', '.join(CHOICES)}")
    if out.exists():
        raise ConversionError(f"{out} already exists; remove it or choose another output folder")
    start = time.perf_counter()
    source = open_source(src)
    try:
        config = ModelConfig.from_hf_dict(source.hf_config)
    except (ValueError, KeyError) as e:
        raise ConversionError(f"{src}: {e}") from None
    dtype = dtype or (source.dtype if source.dtype in DTYPES else "float32")
    if quantization not in ("auto", "none") and source.is_quantized():
        raise ConversionError(f"{src.name} is already quantized; use --quantization auto (keep it) or none (float)")
    params, quant = _collect_params(source, config, dtype, progress, packed=quantization == "auto")
    if quantization not in ("auto", "none"):
        params, quant = quantize_flat(params, quantization)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(source.hf_config, indent=2))
        source.copy_side_files(tmp)
        tree = unflatten(params)
        checkpoint.save_params(tmp, tree)
        checkpoint.write_manifest(tmp, tree, dtype, source=src.name, quant=quant)
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"converted {src.name} -> {out} ({dtype}, {describe(quant)}, {config.num_params() / 1e6:.1f}M params, "
              f"{weight_bytes(params.values()) / 2**20:.1f} MiB of weights) in {time.perf_counter() - start:.1f}s")
    return out
