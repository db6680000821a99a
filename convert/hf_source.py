"""Reads an HF model folder: config.json, *.safetensors shards, tokenizer files. An AWQ or GPTQ
checkpoint's quantized layers come out packed (convert/hf_quantized.py)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from convert.errors import ConversionError
from convert.hf_quantized import read_quantization
from convert.packed_tensor import PackedTensor

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


class HFSource:
    """An HF folder. Nothing is read past config.json until `tensors()` is iterated."""

    def __init__(self, folder: Path):
        self.folder = folder
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"{folder}: missing config.json")
        try:
            self.hf_config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{config_path}: invalid JSON ({e})") from None
        self.files = self._weight_files()
        self.quantization = read_quantization(self.hf_config, folder)

    def _weight_files(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            for shard in shards:
                if not (self.folder / shard).is_file():
                    raise ConversionError(f"{self.folder}: missing shard {shard} named in {index.name}")
            return [self.folder / s for s in shards]
        files = sorted(self.folder.glob("*.safetensors"))
        if files:
            return files
        pickles = sorted(p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ConversionError(
                f"{self.folder}: refusing pickle checkpoint {pickles[0]} (it can run arbitrary code); "
                "save the model as safetensors first"
            )
        raise ConversionError(f"{self.folder}: no *.safetensors weights found")

    @property
    def dtype(self) -> str:
        return str(self.hf_config.get("torch_dtype") or self.hf_config.get("dtype") or "float32")

    def is_quantized(self) -> bool:
        """Whether the checkpoint is AWQ or GPTQ."""
        return self.quantization is not None

    def num_tensors(self) -> int:
        names = self._names()
        return len(names) if self.quantization is None else self.quantization.num_tensors(names)

    def _names(self) -> list[str]:
        names = []
        for path in self.files:
            with self._open(path) as f:
                names.extend(f.keys())
        return names

    def _open(self, path: Path):
        from safetensors import safe_open

        try:
            return safe_open(path, framework="numpy")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ConversionError(f"{path.name}: corrupted or truncated safetensors file ({e})") from None

    def tensors(self, *, packed: bool = False) -> Iterator[tuple[str, np.ndarray | PackedTensor]]:
        """(HF name, tensor) in the files' order; an AWQ/GPTQ layer as `<module>.weight`: a
        PackedTensor with packed=True, else its exact float32 [out, in]."""
        with contextlib.ExitStack() as stack:
            # All shards open at once: a quantized module's parts may sit in different ones.
            where = {}
            for path in self.files:
                f = stack.enter_context(self._open(path))
                where.update({name: (path, f) for name in f.keys()})

            def read(name: str) -> np.ndarray:
                path, f = where[name]
                try:
                    return f.get_tensor(name)
                except Exception as e:
                    raise ConversionError(f"{path.name}: cannot read tensor {name} ({e})") from None

            names = list(where)
            if self.quantization is None:
                yield from ((name, read(name)) for name in names)
            else:
                yield from self.quantization.tensors(names, read, packed=packed)

    def copy_side_files(self, out: Path) -> None:
        """Tokenizer and generation config files, copied as they are."""
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            src = self.folder / name
            if src.is_file():
                (out / name).write_bytes(src.read_bytes())
