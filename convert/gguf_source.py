"""Reads a llama.cpp GGUF file: metadata -> HF config, tensors with HF names: packed as they are
stored (convert/gguf_packed.py, exact) or dequantized to float32 by the gguf package's numpy code.
 llama.cpp stores the q/k projection rows of
Llama models permuted for its interleaved rotary layout; we undo that the way transformers'
GGUF loader does, so the result is exactly the HF checkpoint transformers would build.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from convert.errors import ConversionError
from convert.gguf_packed import to_packed
from convert.packed_tensor import PackedTensor

log = logging.getLogger(__name__)

# GGUF architectures we read, with the HF architecture they become.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def reverse_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation: per head, interleaved (x0, y0, x1, y1, ...)
    rotary pairs back to HF's halves (x0, x1, ..., y0, y1, ...). weight [num_heads * H, D]."""
    half = weight.shape[0] // num_heads // 2
    w = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def _reader_class(gguf):
    class PlainArrayReader(gguf.GGUFReader):
        """gguf's reader over a plain ndarray view of its memory map: its parser slices the file
        ~250k times for a 49k-token vocabulary, and np.memmap's Python-level slicing hooks
        doubled the time to open the default model (5.7 s -> 2.8 s here)."""

        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray)

    return PlainArrayReader


class GGUFSource:
    def __init__(self, path: Path):
        import gguf

        self.path = path
        try:
            self.reader = _reader_class(gguf)(path)
        except Exception as e:
            raise ConversionError(f"{path.name}: not a readable GGUF file ({e})") from None
        arch = self._field("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ConversionError(
                f"{path.name}: unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}"
            )
        self.arch = arch
        self.tensor_names = [t.name for t in self.reader.tensors]
        if "rope_freqs.weight" in self.tensor_names:
            raise ConversionError(f"{path.name}: per-frequency rope factors (rope_freqs.weight) are not supported")
        self.hf_config = self._hf_config()

    def _field(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def _hf_config(self) -> dict[str, Any]:
        a = self.arch
        num_heads = self._field(f"{a}.attention.head_count")
        hidden = self._field(f"{a}.embedding_length")
        config = {
            "architectures": [GGUF_ARCHITECTURES[a]],
            "model_type": a,
            "vocab_size": self._field(f"{a}.vocab_size") or len(self._field("tokenizer.ggml.tokens")),
            "hidden_size": hidden,
            "intermediate_size": self._field(f"{a}.feed_forward_length"),
            "num_hidden_layers": self._field(f"{a}.block_count"),
            "num_attention_heads": num_heads,
            "num_key_value_heads": self._field(f"{a}.attention.head_count_kv", num_heads),
            "head_dim": self._field(f"{a}.attention.key_length", hidden // num_heads),
            "rms_norm_eps": float(np.float32(self._field(f"{a}.attention.layer_norm_rms_epsilon", 1e-6))),
            "rope_theta": float(self._field(f"{a}.rope.freq_base", 10000.0)),
            "max_position_embeddings": self._field(f"{a}.context_length", 2048),
            "tie_word_embeddings": "output.weight" not in self.tensor_names,
            "hidden_act": "silu",
            "dtype": "float32",
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._field("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self._field("tokenizer.ggml.padding_token_id"),
        }
        scaling = self._field(f"{a}.rope.scaling.type", "none")
        if scaling == "linear":
            config["rope_scaling"] = {"rope_type": "linear", "factor": self._field(f"{a}.rope.scaling.factor")}
        elif scaling != "none":
            raise ConversionError(f"{self.path.name}: unsupported GGUF rope scaling {scaling!r}")
        return config

    @property
    def dtype(self) -> str:
        return "float32"

    def num_tensors(self) -> int:
        return len(self.reader.tensors)

    def _hf_name(self, name: str) -> str:
        if name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[name]
        match = _BLOCK.fullmatch(name)
        if not match or match.group(2) not in _BLOCK_NAMES:
            raise ConversionError(f"{self.path.name}: unknown GGUF tensor {name}")
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"

    def is_quantized(self) -> bool:
        """Whether any tensor is stored in a block type (anything but F32/F16/BF16)."""
        return any(t.tensor_type.name not in ("F32", "F16", "BF16") for t in self.reader.tensors)

    def tensors(self, *, packed: bool = False) -> Iterator[tuple[str, np.ndarray | PackedTensor]]:
        """(HF name, float32 weight) per tensor; with packed=True, 2-D tensors of a type with an
        exact packed form come as PackedTensor instead (others dequantized, with a log line)."""
        from gguf.quants import dequantize

        cfg = self.hf_config
        for tensor in self.reader.tensors:
            hf_name = self._hf_name(tensor.name)
            type_name = tensor.tensor_type.name
            weight = None
            if packed and type_name not in ("F32", "F16", "BF16") and len(tensor.shape) == 2:
                mapped = to_packed(tensor.data, type_name)
                if mapped is None:
                    log.info("%s: %s is %s, which has no exact packed form; dequantized to float32",
                             self.path.name, tensor.name, type_name)
                else:
                    weight = PackedTensor(*mapped, type_name)
            if weight is None:
                try:
                    weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
                except Exception as e:
                    raise ConversionError(f"{self.path.name}: cannot dequantize {tensor.name} ({e})") from None
            heads = {"q_proj.weight": cfg["num_attention_heads"], "k_proj.weight": cfg["num_key_value_heads"]}
            for suffix, num_heads in heads.items():
                if hf_name.endswith(suffix):  # rows are outputs, in both forms
                    if isinstance(weight, PackedTensor):
                        weight.leaves = {k: reverse_permute(v, num_heads) for k, v in weight.leaves.items()}
                    else:
                        weight = reverse_permute(weight, num_heads)
            yield hf_name, weight

    def copy_side_files(self, out: Path) -> None:
        from convert.gguf_tokenizer import write_tokenizer_files

        write_tokenizer_files(self.reader, out)
