"""The llguidance backend on the default model's tokenizer (rebuilt from its GGUF; no model loaded)."""

import json

import numpy as np
import pytest

from benchmarks.grammar_backends import default_tokenizer
from jpaged.structured import StructuredOutputs, bitmask_width, make_backend

V = 49152


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return default_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def backend(tokenizer):
    return make_backend(tokenizer, V)


def allowed(row: np.ndarray) -> np.ndarray:
    return np.nonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))[0]


def test_regex_mask_allows_digits_then_only_eos(backend, tokenizer):
    m = backend.matcher(StructuredOutputs(regex="[0-9]{2}").key)
    mask = np.full((3, bitmask_width(V)), -1, np.int32)
    backend.fill_bitmask([(m, 1)], mask)
    assert (mask[0] == -1).all() and (mask[2] == -1).all(), "other rows untouched"
    texts = {tokenizer.decode([t]) for t in allowed(mask[1])}
    assert texts and all(t.isdigit() and len(t) <= 2 for t in texts)
    assert m.accept_token(tokenizer.convert_tokens_to_ids("4"))
    assert m.accept_token(tokenizer.convert_tokens_to_ids("2"))
    assert m.is_terminated() and not m.is_error()
    backend.fill_bitmask([(m, 0)], mask)
    assert allowed(mask[0]).tolist() == [tokenizer.eos_token_id]


def test_a_refused_token_leaves_only_eos(backend, tokenizer):
    m = backend.matcher(StructuredOutputs(choice=["yes", "no"]).key)
    assert not m.accept_token(tokenizer.encode("maybe")[0])
    assert m.is_error()
    mask = np.full((1, bitmask_width(V)), -1, np.int32)
    backend.fill_bitmask([(m, 0)], mask)
    assert allowed(mask[0]).tolist() == [tokenizer.eos_token_id]


def test_grammars_compile_once_per_text(backend):
    before = backend.num_compiles
    schema = {"type": "object", "properties": {"k": {"type": "string"}}, "required": ["k"]}
    matchers = [backend.matcher(StructuredOutputs(json=schema).key) for _ in range(5)]
    matchers.append(backend.matcher(StructuredOutputs(json=json.dumps(schema, indent=2)).key))
    assert backend.num_compiles == before + 1
    # every matcher is its own: advancing one leaves the others at the start
    mask = np.zeros((2, bitmask_width(V)), np.int32)
    backend.fill_bitmask([(matchers[0], 0), (matchers[1], 1)], mask)
    assert (mask[0] == mask[1]).all()
    assert matchers[0].accept_token(allowed(mask[0])[0])
    backend.fill_bitmask([(matchers[0], 0), (matchers[1], 1)], mask)
    assert not (mask[0] == mask[1]).all()


def test_bitmask_shape_is_checked(backend):
    m = backend.matcher(StructuredOutputs(regex="a").key)
    with pytest.raises(ValueError, match="bitmask must be"):
        backend.fill_bitmask([(m, 0)], np.zeros((1, 10), np.int32))
