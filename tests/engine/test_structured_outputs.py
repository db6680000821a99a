"""Structured outputs end to end on the default model: every output satisfies its constraint,
greedy or sampled, in mixed batches, with n > 1, chunked prefill, preemption, stop strings and
max_tokens; unconstrained requests beside them are unchanged."""

from __future__ import annotations

import json
import logging
import re

import jsonschema
import pytest

from benchmarks.structured_cases import SCHEMAS
from jpaged import LLM, SamplingParams, StructuredOutputs

pytestmark = pytest.mark.default_model

OUTSIDE = "outside its structured-output constraint"


def chat(llm, text: str) -> dict:
    return {"prompt_token_ids": llm.apply_chat_template([{"role": "user", "content": text}])}


def schema_prompt(llm, name: str, schema: dict) -> dict:
    return chat(llm, f"Write one example {name.replace('_', ' ')} as JSON matching this schema: {json.dumps(schema)}")


def assert_valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


@pytest.fixture(autouse=True)
def no_refused_tokens(caplog):
    """A token outside a constraint means the mask was not applied: the engine logs it."""
    with caplog.at_level(logging.WARNING, logger="jpaged"):
        yield
    assert OUTSIDE not in caplog.text


@pytest.mark.parametrize("temperature, seeds", [(0.0, [None]), (1.0, [0, 1])])
def test_every_schema_gives_valid_json(default_llm, temperature, seeds):
    prompts, params, names = [], [], []
    for seed in seeds:
        for name, (schema, _) in SCHEMAS.items():
            prompts.append(schema_prompt(default_llm, name, schema))
            params.append(SamplingParams(temperature=temperature, seed=seed, max_tokens=160,
                                         structured_outputs=StructuredOutputs(json=schema)))
            names.append(name)
    outs = default_llm.generate(prompts, params, use_tqdm=False)
    assert len(SCHEMAS) >= 8
    for name, out in zip(names, outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (name, c.text)
        assert_valid(c.text, SCHEMAS[name][0])


def test_regex_choice_and_grammar_match_fully(default_llm):
    regex = r"\(\d{3}\) \d{3}-\d{4}"
    grammar = """
start: expr
expr: NUMBER " " OP " " NUMBER
OP: "+" | "-" | "*"
NUMBER: /[1-9][0-9]?/
"""
    params = [
        SamplingParams(temperature=0.0, max_tokens=30, structured_outputs=StructuredOutputs(regex=regex)),
        SamplingParams(temperature=1.0, seed=5, max_tokens=30, structured_outputs=StructuredOutputs(regex=regex)),
        SamplingParams(temperature=0.0, max_tokens=10, structured_outputs=StructuredOutputs(choice=["Paris", "London", "Rome"])),
        SamplingParams(temperature=1.0, seed=3, max_tokens=10, structured_outputs=StructuredOutputs(choice=["yes", "no"])),
        SamplingParams(temperature=0.0, max_tokens=20, structured_outputs=StructuredOutputs(grammar=grammar)),
        SamplingParams(temperature=0.0, max_tokens=20, structured_outputs=StructuredOutputs(json_object=True)),
    ]
    prompts = [chat(default_llm, "Give me a US phone number."), chat(default_llm, "A phone number, please."),
               chat(default_llm, "What is the capital of France?"), chat(default_llm, "Is the sky blue?"),
               chat(default_llm, "Write a simple arithmetic expression."), chat(default_llm, "Describe a cat in JSON.")]
    outs = [o.outputs[0] for o in default_llm.generate(prompts, params, use_tqdm=False)]
    assert all(re.fullmatch(regex, o.text) for o in outs[:2]), [o.text for o in outs[:2]]
    assert outs[2].text in ("Paris", "London", "Rome") and outs[3].text in ("yes", "no")
    assert re.fullmatch(r"[1-9][0-9]? [-+*] [1-9][0-9]?", outs[4].text), outs[4].text
    assert all(o.finish_reason == "stop" for o in outs[:5])
    if outs[5].finish_reason == "stop":
        assert isinstance(json.loads(outs[5].text), dict)
    else:  # an open-ended object may run to max_tokens; what there is, is a JSON object's start
        assert outs[5].text.startswith("{")


def test_unconstrained_requests_are_unchanged_in_a_mixed_batch_and_nothing_recompiles(default_llm):
    runner = default_llm.engine.runner
    runner.prepare(runner.spec.shapes())  # warm-up: every bucket
    compiles = runner.num_compiles
    free = [chat(default_llm, "Write a haiku about the sea."), chat(default_llm, "Name three fruits.")]
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    sampled = SamplingParams(temperature=0.8, seed=7, max_tokens=24)
    alone = default_llm.generate(free, [greedy, sampled], use_tqdm=False)
    schema = SCHEMAS["person"][0]
    constrained = SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=StructuredOutputs(json=schema))
    mixed = default_llm.generate(
        [schema_prompt(default_llm, "person", schema), free[0], chat(default_llm, "Pick one."), free[1]],
        [constrained, greedy, SamplingParams(temperature=0.0, max_tokens=5,
                                             structured_outputs=StructuredOutputs(choice=["red", "blue"])), sampled],
        use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert mixed[3].outputs[0].token_ids == alone[1].outputs[0].token_ids
    assert_valid(mixed[0].outputs[0].text, schema)
    assert mixed[2].outputs[0].text in ("red", "blue")
    assert runner.num_compiles == compiles


def test_n_sequences_each_follow_the_constraint(default_llm):
    schema = SCHEMAS["enum"][0]
    out = default_llm.generate(schema_prompt(default_llm, "review", schema),
                               SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=60,
                                              structured_outputs=StructuredOutputs(json=schema)), use_tqdm=False)[0]
    assert len(out.outputs) == 4
    for c in out.outputs:
        assert c.finish_reason == "stop"
        assert_valid(c.text, schema)


def test_max_tokens_first_gives_length_and_stop_strings_still_apply(default_llm):
    schema = SCHEMAS["list_of_objects"][0]
    prompt = schema_prompt(default_llm, "shopping list", schema)
    cut = default_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=5,
                                                      structured_outputs=StructuredOutputs(json=schema)),
                               use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 5
    whole = default_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=160,
                                                        structured_outputs=StructuredOutputs(json=schema)),
                                 use_tqdm=False)[0].outputs[0]
    assert whole.token_ids[:5] == cut.token_ids
    stopped = default_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=160, stop=['"qty"'],
                                                          structured_outputs=StructuredOutputs(json=schema)),
                                   use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and whole.text.startswith(stopped.text) and '"qty"' not in stopped.text


def test_single_token_choice_with_max_tokens_1_is_complete(default_llm):
    out = default_llm.generate(chat(default_llm, "Is water wet?"),
                               SamplingParams(temperature=0.0, max_tokens=1,
                                              structured_outputs=StructuredOutputs(choice=["yes", "no"])),
                               use_tqdm=False)[0].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop"  # the constraint is whole


def test_preempted_sequences_keep_their_matchers(jpaged_home):
    # 4 sequences of ~40 prompt + up to 100 output tokens need ~36 blocks of 16; 16 force preemptions.
    llm = LLM(max_num_seqs=4, max_model_len=192, max_num_batched_tokens=64, num_kv_blocks=16)
    names = ["list_of_objects", "refs", "nested", "any_of"]
    outs = llm.generate([chat(llm, f"Write an example {n.replace('_', ' ')} in JSON.") for n in names],
                        [SamplingParams(temperature=1.0, seed=i, max_tokens=100,
                                        structured_outputs=StructuredOutputs(json=SCHEMAS[n][0]))
                         for i, n in enumerate(names)], use_tqdm=False)
    assert llm.get_stats()["num_preemptions"] > 0
    for name, out in zip(names, outs):
        c = out.outputs[0]
        if c.finish_reason == "stop":
            assert_valid(c.text, SCHEMAS[name][0])
        else:
            assert c.finish_reason == "length"


def test_allowed_token_ids_intersect_the_constraint(default_llm, caplog):
    tok = default_llm.get_tokenizer()
    prompt = chat(default_llm, "Is the sky blue?")
    choice = StructuredOutputs(choice=["yes", "no"])

    def answer(allowed: list[int]) -> str:
        params = SamplingParams(temperature=0.0, max_tokens=5, structured_outputs=choice, allowed_token_ids=allowed)
        return default_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text

    # Each word is only reachable through its own tokens: both masks decide.
    assert [answer(tok.encode(word) + [tok.eos_token_id]) for word in ("yes", "no")] == ["yes", "no"]
    assert "allows none of its allowed_token_ids" not in caplog.text
    # Disjoint: the constraint alone decides those steps (an empty mask would leave nothing to sample).
    assert answer(tok.encode(" maybe")) in ("yes", "no")
    assert "allows none of its allowed_token_ids" in caplog.text
