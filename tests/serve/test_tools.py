"""serve.tools without a server: the parsers on recorded model text, the default tool prompt, the constraints."""

import json

import jsonschema
import pytest

from serve.errors import APIError
from serve.tools import (DEFAULT_TOOL_PROMPT, calls_from_constrained, check_tools, default_tool_messages,
                         parse_tool_calls, tool_constraint)

WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                 "required": ["city"]}}
NAMES = {"get_weather", "get_time"}

# What Qwen2.5-Instruct (Hermes format) and Llama-3.1-Instruct write when they call tools.
QWEN = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}\n</tool_call>')
LLAMA = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}'


def test_hermes_parser():
    content, calls = parse_tool_calls(QWEN, "hermes", NAMES)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert parse_tool_calls("Just text.", "hermes", NAMES) == ("Just text.", [])
    assert parse_tool_calls('<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', "hermes", NAMES)[1] == []
    assert parse_tool_calls("<tool_call>{not json", "hermes", NAMES)[1] == []
    # cut short by max_tokens after a whole call: the whole call counts
    _, calls = parse_tool_calls('<tool_call>{"name": "get_time", "arguments": {}}', "hermes", NAMES)
    assert [c["function"]["name"] for c in calls] == ["get_time"]


def test_llama3_json_parser():
    content, calls = parse_tool_calls(LLAMA, "llama3_json", NAMES)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert parse_tool_calls("The weather is nice.", "llama3_json", NAMES) == ("The weather is nice.", [])
    assert parse_tool_calls('{"name": "get_weather", "parameters": {"city": ', "llama3_json", NAMES)[1] == []


def test_constraints_of_required_and_named():
    functions, choice = check_tools([{"type": "function", "function": WEATHER}], "required")
    schema = json.loads(tool_constraint(functions, choice, parallel=False).key[1])
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Rome"}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "arguments": {}}], schema)
    with pytest.raises(jsonschema.ValidationError):  # one call only without parallel_tool_calls
        jsonschema.validate([{"name": "get_weather", "arguments": {"city": "A"}}] * 2, schema)
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert json.loads(tool_constraint(functions, named, parallel=True).key[1]) == WEATHER["parameters"]
    assert calls_from_constrained('{"city": "Rome"}', named)[0]["function"]["arguments"] == '{"city": "Rome"}'
    assert calls_from_constrained('[{"name": "get_weather", "arguments": {"city": "Rome"}}]', "required")[0][
        "function"]["name"] == "get_weather"
    assert calls_from_constrained('[{"name": "get_weather", "argu', "required") is None
    assert tool_constraint(functions, "auto", parallel=True) is None
    with pytest.raises(APIError):
        check_tools([{"type": "function", "function": WEATHER}], "sometimes")


def test_default_tool_prompt_and_history():
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    out = default_tool_messages(history, [WEATHER])
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\n# Tools")
    assert '"name": "get_weather"' in out[0]["content"] and "<tool_call>" in DEFAULT_TOOL_PROMPT
    assert out[2] == {"role": "assistant", "content":
                      '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'}
    assert out[3] == {"role": "user", "content": '<tool_response>\n{"temp": 21}\n</tool_response>'}
