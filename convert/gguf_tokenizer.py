"""Rebuild Hugging Face tokenizer files from the metadata of a GGUF file.

A GGUF carries no ``tokenizer.json``: the vocabulary, merges, token types and special token ids
live in its ``tokenizer.*`` metadata, under llama.cpp's key names. transformers can turn that into
a tokenizer (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``), but its GGUF path imports
torch, which this JAX runtime must not depend on. So this module redoes the same conversion with
the ``tokenizers`` library alone and writes ordinary tokenizer files, which transformers (or
``tokenizers``) can load afterwards without touching the GGUF again.

The aim is to be token-for-token identical to transformers' GGUF tokenizer (see
``transformers/integrations/gguf/gguf_tokenizer_mapping.py``), quirks included;
``tests/convert/test_gguf_tokenizer.py`` holds us to that.
"""

from __future__ import annotations

import json
import pathlib
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

if TYPE_CHECKING:
    import gguf

# llama.cpp's token types (llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# The split regex transformers installs per `tokenizer.ggml.pre`. Any other value (e.g. SmolLM2's
# "smollm", or "gpt2") keeps the plain GPT-2 byte-level regex.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0"], _LLAMA3),
    **dict.fromkeys(["lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"], _LLAMA3),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O),
}

# Sentencepiece GGUFs of these architectures need respelled tokens and file-order merges in
# transformers; not worth carrying here until a model needs it.
_UNSUPPORTED_SENTENCEPIECE = ("gemma", "gemma2", "gemma3")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (transformers' `bytes_to_unicode`)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges for a sentencepiece vocabulary that lists none (transformers' `generate_merges`):
    every split of a token into two known pieces, best-scoring token first."""
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = []
    for token, score in dict(zip(tokens, scores)).items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))]
        local = [m for m in local if m[0] in vocab and m[1] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _byte_level(meta: dict) -> Tokenizer:
    # Tokens are normally spelled in GPT-2's byte alphabet already; the odd one that is not gets
    # respelled from its UTF-8 bytes, as transformers does, so BPE can reach it.
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(meta["tokens"])
    }
    merges = [tuple(m.split(" ")) for m in meta["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = _SPLITS.get(meta["pre"])
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(meta: dict) -> Tokenizer:
    tokens = meta["tokens"]
    if "merges" in meta:
        merges = [tuple(m.split(" ")) for m in meta["merges"]]
    else:
        merges = _merges_from_scores(tokens, meta["scores"])
    vocab = {token: index for index, token in enumerate(tokens)}
    # No unk_token on the model, like transformers' LlamaTokenizer: byte fallback covers unknown text.
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True))
    if meta["architecture"] == "phi3":
        # Phi-3 adds its prefix space in a normalizer, which differs on text starting with spaces.
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def _write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(reader: "gguf.GGUFReader", out_dir: pathlib.Path) -> None:
    """Build the HF tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json) from GGUF metadata into out_dir."""

    def field(key, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    name, arch = field("tokenizer.ggml.model"), field("general.architecture")
    meta = {"architecture": arch, "pre": field("tokenizer.ggml.pre")}
    for key in ("tokens", "merges", "scores"):
        if f"tokenizer.ggml.{key}" in reader.fields:
            meta[key] = field(f"tokenizer.ggml.{key}")
    if name == "gpt2":
        tok = _byte_level(meta)
    elif name == "llama" and arch not in _UNSUPPORTED_SENTENCEPIECE:
        tok = _sentencepiece(meta)
    else:
        suffix = f" (architecture {arch!r})" if name == "llama" else ""
        raise ValueError(f"unsupported GGUF tokenizer model {name!r}{suffix}")

    # Control tokens become special added tokens and user-defined ones plain added tokens, so
    # neither gets cut into pieces. In a byte-level vocabulary a "control" token outside the byte
    # alphabet is a llama.cpp mislabel, which transformers skips.
    tokens, types = meta["tokens"], field("tokenizer.ggml.token_type", [])
    alphabet = set(_bytes_to_unicode().values()) if name == "gpt2" else None
    control = [t for t, ty in zip(tokens, types) if ty == _CONTROL and (alphabet is None or set(t) <= alphabet)]
    vocab = tok.get_vocab()
    user_defined = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])

    specials = {}
    for attr, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        if (token_id := field(f"tokenizer.ggml.{key}_token_id")) is not None:
            specials[attr] = tokens[token_id]
    # transformers makes named special tokens that are not control tokens (Llama 2's <unk> is typed
    # UNKNOWN) special added tokens at load time; doing it here keeps tokenizer.json self-contained.
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials.values() if t not in added])

    # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise; transformers too.
    add_bos = bool(field("tokenizer.ggml.add_bos_token", name == "llama")) and "bos_token" in specials
    add_eos = bool(field("tokenizer.ggml.add_eos_token", False)) and "eos_token" in specials
    # The template transformers' `update_post_processor` builds. transformers >= 5 ignores
    # add_bos_token/add_eos_token in the config once a tokenizer.json exists, so this is what counts.
    bos = [specials["bos_token"]] if add_bos else []
    eos = [specials["eos_token"]] if add_eos else []
    single = " ".join([f"{t}:0" for t in bos] + ["$A:0"] + [f"{t}:0" for t in eos])
    pair = " ".join([single] + [f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos])
    marks = [(t, tok.token_to_id(t)) for t in bos + eos]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=marks)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # loads in transformers 4 and 5 alike
        **specials,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    # transformers leaves this unset (effectively infinite); the model's context is the honest limit.
    if (context := field(f"{arch}.context_length")) is not None:
        config["model_max_length"] = context
    if (template := field("tokenizer.chat_template")) is not None:
        config["chat_template"] = template

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", specials)
