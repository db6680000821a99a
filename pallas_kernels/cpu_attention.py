"""Ragged paged attention for CPUs: a C++ kernel (cpu/paged_attention.cc) behind the XLA FFI.

The kernel is compiled on first use with the system C++ compiler, for this machine's CPU, into
a cache folder keyed by the source, the jaxlib headers and the CPU; later processes load it in
milliseconds. `unavailable_reason()` says why it cannot be used here, or None (no compiler:
the caller falls back to the XLA formulation).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = Path(__file__).parent / "cpu" / "paged_attention.cc"
_TARGET = "jpaged_paged_attention_f32"
# -ffast-math would let the compiler assume no infinities; these are the parts of it that let
# the reductions vectorize.
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno",
          "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]

log = logging.getLogger(__name__)


def _cache_dir() -> Path:
    root = os.environ.get("JPAGED_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "jpaged")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """-march=native code must not run on another CPU: the CPU's model and flags go in the key."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(line for line in lines if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        return platform.processor()


def _library_path(compiler: str) -> Path:
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), compiler.encode(), jax.ffi.include_dir().encode(),
                 jax.__version__.encode(), _cpu_signature().encode()):
        key.update(part)
    return _cache_dir() / f"paged_attention_{key.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a half-written file.
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(tmp_path)]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@functools.cache
def unavailable_reason() -> str | None:
    """Builds (once per machine) and registers the kernel; None when it is ready, else why not."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        return "no C++ compiler found (set CXX)"
    path = _library_path(compiler)
    try:
        if not path.exists():
            log.info("compiling the CPU paged-attention kernel (once per machine) into %s", path)
            _build(compiler, path)
        lib = ctypes.cdll.LoadLibrary(str(path))
    except (OSError, RuntimeError) as err:
        return str(err)
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.JpagedPagedAttentionF32), platform="cpu")
    return None


def ragged_paged_attention_cpu(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    kv_lens: jax.Array,
    cu_q_lens: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
) -> jax.Array:
    """Same contract as ragged_paged_attention_reference, float32: q [T, N, H] -> [T, N, H]."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the CPU paged-attention kernel is unavailable: {reason}")
    if k_pages.dtype != jnp.float32:
        raise TypeError(f"the CPU paged-attention kernel takes float32 KV pages, not {k_pages.dtype}")
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    out = call(
        q.astype(jnp.float32), k_pages, v_pages,
        block_tables.astype(jnp.int32), kv_lens.astype(jnp.int32), cu_q_lens.astype(jnp.int32),
        scale=np.float32(scale), sliding_window=np.int64(sliding_window or 0),
    )
    return out.astype(q.dtype)
