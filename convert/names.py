"""HF parameter names -> jpaged parameter paths: the whole conversion, as data.

Keys use `{}` for the layer index. A value is (our path, transform) or None for a key that is
deliberately dropped. HF stores linear weights as [out, in]; our kernels are [in, out].
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


_LAYER = "model.layers.{}."
_OURS = "layers.{}."

HF_TO_JPAGED: dict[str, tuple[str, Transform] | None] = {
    "model.embed_tokens.weight": ("embed", _same),
    "model.norm.weight": ("norm.scale", _same),
    "lm_head.weight": ("lm_head.kernel", _transpose),
    _LAYER + "input_layernorm.weight": (_OURS + "input_norm.scale", _same),
    _LAYER + "post_attention_layernorm.weight": (_OURS + "post_attn_norm.scale", _same),
    **{
        _LAYER + f"self_attn.{p}_proj.weight": (_OURS + f"attn.{p}_proj.kernel", _transpose)
        for p in ("q", "k", "v", "o")
    },
    **{_LAYER + f"self_attn.{p}_proj.bias": (_OURS + f"attn.{p}_proj.bias", _same) for p in ("q", "k", "v", "o")},
    _LAYER + "self_attn.q_norm.weight": (_OURS + "attn.q_norm.scale", _same),
    _LAYER + "self_attn.k_norm.weight": (_OURS + "attn.k_norm.scale", _same),
    **{_LAYER + f"mlp.{p}_proj.weight": (_OURS + f"mlp.{p}_proj.kernel", _transpose) for p in ("gate", "up", "down")},
    **{_LAYER + f"mlp.{p}_proj.bias": (_OURS + f"mlp.{p}_proj.bias", _same) for p in ("gate", "up", "down")},
    # Recomputed from the config by jpaged/models/rope.py.
    _LAYER + "self_attn.rotary_emb.inv_freq": None,
}

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def map_name(hf_name: str, *, tied_embeddings: bool) -> tuple[str, Transform] | None:
    """Our (path, transform) for an HF tensor name; None if dropped. KeyError if unknown."""
    if tied_embeddings and hf_name == "lm_head.weight":
        return None  # some tied checkpoints still store a copy of the embedding
    match = _LAYER_INDEX.search(hf_name)
    template = _LAYER_INDEX.sub(".{}.", hf_name, count=1) if match else hf_name
    entry = HF_TO_JPAGED[template]
    if entry is None:
        return None
    path, transform = entry
    return (path.format(match.group(1)) if match else path), transform
