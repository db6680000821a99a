"""Compiled step executables kept on disk, so a warm restart neither traces nor compiles.

    $JPAGED_HOME/executables/<key>/key.json             what the key was made of (for `jpaged cache info`)
    $JPAGED_HOME/executables/<key>/forward-T64-B16-P128.jex
    $JPAGED_HOME/executables/<sampler key>/sample-B16-V49152-H2048.jex    (shared by models of one vocabulary)

The key hashes everything that changes the program (see `program_key`), so an entry is only ever
loaded into the program it was compiled for. Each file is MAGIC + sha256(payload) + payload,
where the payload pickles the serialized executable and its argument/result tree structures
(`jax.experimental.serialize_executable`). A truncated, corrupted or undeserializable entry is
logged, removed and rebuilt by the caller; files are written to a temporary name and renamed,
so concurrent processes never read half an entry.

Why serialized executables rather than jax's persistent compilation cache: the cache is keyed
by the lowered program, so every start still traces each bucket (~1 s of Python per bucket of
the unrolled 30-layer default model); a serialized executable loads in milliseconds with no
tracing at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import jax
import jaxlib
from jax.experimental import serialize_executable

logger = logging.getLogger("jpaged")

MAGIC = b"jpaged-executable-v1\n"
SUFFIX = ".jex"


def _source_digest() -> str:
    """The Python sources that define the traced program: an edit to any of them is a new program."""
    import jpaged
    import pallas_kernels

    digest = hashlib.sha256()
    for package in (jpaged, pallas_kernels):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def tree_signature(tree: Any) -> str:
    """A digest of a pytree's structure and every leaf's shape, dtype and sharding."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    parts = [str(treedef)] + [f"{x.shape}|{x.dtype}|{getattr(x, 'sharding', None)}" for x in leaves]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def program_key(**parts: Any) -> dict[str, Any]:
    """The key's contents: the caller's parts (model config, dtype, buckets, backends, kernel
    library, parameter/KV signatures) plus what jax and the machine contribute."""
    devices = jax.devices()
    return {
        **{k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v) for k, v in parts.items()},
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "sources": _source_digest(),
    }


class ExecutableStore:
    """Loads and saves the compiled executables of one program key under `root`.

    `devices` are the ones the executables run on (a tensor-parallel mesh's, or the one device);
    None means all of the default backend's. They must be named: an executable deserialized for
    more devices than it was compiled for aborts the process inside XLA (not an exception), which
    is what a 2-device program on a 4-device host, or a 1-device one among forced host devices, hits.
    """

    def __init__(self, root: Path, key: dict[str, Any], devices: list[jax.Device] | None = None):
        self.devices = devices
        text = json.dumps(key, sort_keys=True)
        self.folder = root / hashlib.sha256(text.encode()).hexdigest()[:20]
        self.folder.mkdir(parents=True, exist_ok=True)
        key_file = self.folder / "key.json"
        if not key_file.is_file():
            _write_atomically(key_file, text.encode())

    def path(self, name: str) -> Path:
        return self.folder / f"{name}{SUFFIX}"

    def _read(self, name: str) -> tuple[bytes | None, str | None]:
        """(payload, None) of an intact entry, (None, None) for none, (None, why) for a bad one."""
        path = self.path(name)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None, None
        except OSError as err:
            return None, f"cannot be read ({err})"
        head = len(MAGIC) + 32
        if len(blob) < head or not blob.startswith(MAGIC):
            return None, "not an executable-cache entry (truncated or foreign)"
        if hashlib.sha256(blob[head:]).digest() != blob[len(MAGIC):head]:
            return None, "checksum mismatch (truncated or corrupted)"
        return blob[head:], None

    def has(self, name: str) -> bool:
        """Whether an intact entry of this name is stored: its checksum holds and it names itself
        `name` (cheap: no deserialization, which may still fail, e.g. for a foreign jaxlib)."""
        payload = self._read(name)[0]
        try:
            return payload is not None and pickle.loads(payload)[0] == name
        except Exception:  # unpicklable: load() will say why and remove it
            return False

    def load(self, name: str, args: tuple) -> jax.stages.Compiled | None:
        """The stored executable for abstract `args`, or None when there is none or it cannot be
        used (then removed): a bad file, or one compiled for other argument shapes."""
        path = self.path(name)
        payload, problem = self._read(name)
        if payload is None and problem is None:
            return None
        if payload is not None:
            try:
                stored_name, serialized, in_tree, out_tree = pickle.loads(payload)
                compiled = serialize_executable.deserialize_and_load(
                    serialized, in_tree, out_tree, execution_devices=self.devices)
            except Exception as err:  # a stale or foreign payload: any failure means "rebuild"
                problem = f"cannot be loaded ({type(err).__name__}: {str(err)[:200]})"
            else:
                if stored_name == name and _arg_signature(compiled.args_info) == _arg_signature((args, {})):
                    return compiled
                problem = f"holds {stored_name}, compiled for other arguments"
        logger.warning("executable cache: %s: %s; compiling it again", path.name, problem)
        with contextlib.suppress(OSError):
            path.unlink()
        return None

    def save(self, name: str, compiled: jax.stages.Compiled) -> None:
        """Stores an executable; a backend that cannot serialize it only costs the cache entry."""
        try:
            payload = pickle.dumps((name, *serialize_executable.serialize(compiled)))
        except Exception as err:
            logger.warning("executable cache: cannot serialize %s (%s)", name, err)
            return
        try:
            _write_atomically(self.path(name), MAGIC + hashlib.sha256(payload).digest() + payload)
        except OSError as err:
            logger.warning("executable cache: cannot write %s (%s)", self.path(name), err)


def _arg_signature(args) -> tuple:
    """Tree structure and (shape, dtype) of every argument: what an executable must have been compiled for."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


def _write_atomically(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)
