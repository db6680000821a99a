"""What jpaged keeps under $JPAGED_HOME, by kind: `jpaged cache info|clear`."""

from __future__ import annotations

import shutil
from pathlib import Path

from jpaged.model_files import jpaged_home

# folder under $JPAGED_HOME -> what it holds
KINDS = {
    "models": "converted checkpoints of HF folders and GGUF files",
    "executables": "compiled step executables, one folder per program key",
    "kernels": "the C++ CPU kernel library and its measured kernel choice",
    "verified": "stamps of checkpoint files whose sha256 was verified",
    "xla_cache": "jax's persistent compilation cache (earlier versions)",
}


def _size(path: Path) -> tuple[int, int]:
    """(bytes, files) under path."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    return sum(p.stat().st_size for p in files), len(files)


def info(home: Path | None = None) -> list[tuple[str, int, int, str]]:
    """(kind, bytes, files, what) for every kind, present or not."""
    home = home or jpaged_home()
    return [(kind, *_size(home / kind), what) for kind, what in KINDS.items()]


def clear(kinds: list[str] | None = None, home: Path | None = None) -> list[str]:
    """Removes the given kinds (all by default); returns those that were there."""
    home = home or jpaged_home()
    unknown = sorted(set(kinds or ()) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown cache kind {', '.join(unknown)}; kinds: {', '.join(KINDS)}")
    removed = []
    for kind in kinds or list(KINDS):
        if (home / kind).exists():
            shutil.rmtree(home / kind)
            removed.append(kind)
    return removed


def format_info(rows: list[tuple[str, int, int, str]], home: Path) -> str:
    lines = [f"{home}", f"{'kind':<12} {'size':>10} {'files':>6}  what"]
    for kind, size, files, what in rows:
        lines.append(f"{kind:<12} {size / 2**20:>8.1f} MiB {files:>6}  {what}")
    lines.append(f"{'total':<12} {sum(r[1] for r in rows) / 2**20:>8.1f} MiB {sum(r[2] for r in rows):>6}")
    return "\n".join(lines)
