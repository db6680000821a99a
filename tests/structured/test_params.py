"""StructuredOutputs: exactly one constraint, validated at construction with the constraint named."""

import pytest

from jpaged import SamplingParams, StructuredOutputs


@pytest.mark.parametrize("kwargs, message", [
    (dict(json={"type": "foo"}), "invalid JSON schema in structured_outputs.json: Invalid type: foo"),
    (dict(json={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), "structured_outputs.json"),
    (dict(json="{not json"), "structured_outputs.json is not valid JSON"),
    (dict(json=[1, 2]), "structured_outputs.json must be a JSON schema"),
    (dict(regex="(ab"), "invalid regex in structured_outputs.regex"),
    (dict(regex=""), "structured_outputs.regex must be a non-empty string"),
    (dict(grammar="start: undefined_rule"), "invalid grammar in structured_outputs.grammar"),
    (dict(choice=[]), "structured_outputs.choice must not be empty"),
    (dict(choice="yes"), "structured_outputs.choice must be a list of strings"),
    (dict(choice=["a", 1]), "structured_outputs.choice must be a list of strings"),
    (dict(), "needs exactly one of json, regex, choice, grammar, json_object; got none"),
    (dict(json={"type": "object"}, regex="a+"), "got json, regex"),
])
def test_bad_constraints_raise_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        StructuredOutputs(**kwargs)


def test_sampling_params_take_a_dict_and_validate_it():
    p = SamplingParams(structured_outputs={"choice": ["yes", "no"]})
    assert p.structured_outputs == StructuredOutputs(choice=("yes", "no"))
    with pytest.raises(ValueError, match="structured_outputs.regex"):
        SamplingParams(structured_outputs={"regex": "[a-"})
    with pytest.raises(ValueError, match="structured_outputs must be a StructuredOutputs"):
        SamplingParams(structured_outputs="json")


def test_keys_are_the_canonical_text():
    # the same schema as a dict or as text, with any spacing: one key, so one compile
    a = StructuredOutputs(json={"type": "object", "properties": {"b": {"type": "integer"}}})
    b = StructuredOutputs(json='{"type":  "object", "properties": {"b": {"type": "integer"}}}')
    assert a.key == b.key and a == b and hash(a) == hash(b)
    # property order is the output's order: not canonicalized away
    c = StructuredOutputs(json={"properties": {"b": {"type": "integer"}}, "type": "object"})
    assert c.key != a.key
    assert StructuredOutputs(json_object=True).key == ("json", '{"type":"object"}')
    assert StructuredOutputs(json={"type": "object"}, any_whitespace=True).key[0] == "json+ws"
    assert StructuredOutputs(grammar='start: "a" | "b"').kind == "grammar"
    assert StructuredOutputs(grammar='root ::= "a" | "b"').kind == "grammar"  # GBNF is accepted too
