"""Incremental detokenization and stop strings, on the default model's real tokenizer."""

import pytest

from jpaged.engine.detokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.default_model

TEXT = "Hello wörld! 你好, naïve café 🙂 — tabs\tand  double  spaces.\nNew line ends."


@pytest.fixture(scope="module")
def tok(default_llm):
    return default_llm.get_tokenizer()


def feed(tok, text, stop=(), prompt="Say:"):
    detok = IncrementalDetokenizer(tok, tok.encode(prompt), skip_special_tokens=True, stop=tuple(stop))
    visible = []
    for t in tok.encode(text, add_special_tokens=False):
        detok.append(t)
        visible.append(detok.visible_text(finished=False))
        if detok.stopped:
            break
    return detok, visible


def test_incremental_text_equals_one_shot_decode(tok):
    detok, visible = feed(tok, TEXT)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert detok.text == tok.decode(ids, skip_special_tokens=True) == TEXT
    assert all(b.startswith(a) for a, b in zip(visible, visible[1:]))  # streamed text only grows
    assert "\ufffd" not in "".join(visible)  # never half a character


def test_stop_string_cuts_the_text(tok):
    detok, _ = feed(tok, "The answer is forty-two, I think.", stop=["two,", "zzz"])
    assert detok.stopped and detok.text == "The answer is forty-"


def test_partial_stop_string_is_held_back_until_resolved(tok):
    detok, visible = feed(tok, "one two STOP three", stop=["STOP"])
    assert detok.stopped and detok.text == "one two "
    assert not any("ST" in v for v in visible)  # a possible stop prefix never reached the stream
    detok, visible = feed(tok, "one STAR two", stop=["STOP"])
    assert not detok.stopped and detok.visible_text(finished=True) == "one STAR two"
    assert visible[-1] == "one STAR two"  # released once it could no longer become "STOP"
