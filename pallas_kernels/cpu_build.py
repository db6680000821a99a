"""Builds and loads the C++ CPU kernels (cpu/*.cc), which XLA calls through the FFI.

All sources are compiled on first use with the system C++ compiler, for this machine's CPU,
into one library in a cache folder keyed by the sources, the flags, the jaxlib headers and the
CPU; later processes load it in milliseconds. `unavailable_reason()` says why the kernels cannot
be used here (no compiler: callers fall back to XLA's own ops), or None.
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
import threading
from pathlib import Path

import jax

_SOURCES = sorted((Path(__file__).parent / "cpu").glob("*.cc"))
_HEADERS = sorted((Path(__file__).parent / "cpu").glob("*.h"))
# FFI target name -> the handler symbol that the sources export.
TARGETS = {
    "jpaged_paged_attention_f32": "JpagedPagedAttentionF32",
    "jpaged_linear_f32": "JpagedLinearF32",
    "jpaged_linear_packed_f32": "JpagedLinearPackedF32",
}
# -ffast-math would let the compiler assume no infinities; these are the parts of it that let
# the reductions vectorize.
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno",
          "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    # jpaged.model_files.jpaged_home's default; this package imports only jax and numpy.
    root = os.environ.get("JPAGED_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "jpaged")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """-march=native code must not run on another CPU: the CPU's model and flags go in the key."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(line for line in lines if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        return platform.processor()


def cpu_model() -> str:
    """The CPU's model name with its family/model numbers and vector extensions ("AMD EPYC"
    alone names several generations, whose vector units differ by 2x); else platform's guess."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}
    flags = set(fields.get("flags", "").split())
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, "
            f"model {fields.get('model', '?')}, {vector})")


def _library_path(compiler: str) -> Path:
    key = hashlib.sha256()
    for part in (*(src.read_bytes() for src in (*_SOURCES, *_HEADERS)), " ".join(_FLAGS).encode(), compiler.encode(),
                 jax.ffi.include_dir().encode(), jax.__version__.encode(), _cpu_signature().encode()):
        key.update(part)
    return cache_dir() / f"jpaged_cpu_{key.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a half-written file.
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, _SOURCES), "-o", str(tmp_path)]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling the CPU kernels failed:\n{done.stderr[-2000:]}")
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def library_name() -> str | None:
    """The kernel library's file name, which hashes its sources, flags and the CPU (None: no compiler)."""
    compiler = _compiler()
    return None if compiler is None else _library_path(compiler).name


_lock = threading.Lock()  # one build at a time: a background build and a caller share its result


def unavailable_reason() -> str | None:
    """Builds (once per machine) and registers the kernels; None when they are ready, else why not."""
    with _lock:
        return _build_and_register()


def build_in_background() -> None:
    """Starts the build on a thread: the compiler runs in its own process while the caller
    converts or loads weights, and unavailable_reason() then waits only for what is left."""
    if jax.default_backend() == "cpu":
        threading.Thread(target=unavailable_reason, name="jpaged-kernel-build", daemon=True).start()


@functools.cache
def _build_and_register() -> str | None:
    compiler = _compiler()
    if compiler is None:
        return "no C++ compiler found (set CXX)"
    path = _library_path(compiler)
    try:
        if not path.exists():
            log.info("compiling the CPU kernels (once per machine) into %s", path)
            _build(compiler, path)
        lib = ctypes.cdll.LoadLibrary(str(path))
    except (OSError, RuntimeError) as err:
        return str(err)
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return None


def require(what: str) -> None:
    """Raises RuntimeError naming `what` when the kernels cannot be used here."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the CPU {what} kernel is unavailable: {reason}")
