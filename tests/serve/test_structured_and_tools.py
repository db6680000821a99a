"""Structured outputs and tool calling through the official openai client against `jpaged serve`."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pydantic
import pytest

from tests.serve.test_server import MODEL, SERVER_ARGS

pytestmark = pytest.mark.default_model

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}},
                   "required": ["zone"], "additionalProperties": False}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)
    population_millions: int = pydantic.Field(ge=0, le=100)


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(*SERVER_ARGS)


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


def test_parse_with_a_pydantic_model(client):
    messages = [{"role": "user", "content": "Describe Paris as JSON with name, country and population."}]
    done = client.chat.completions.parse(model=MODEL, messages=messages, response_format=City, temperature=0,
                                         max_tokens=80)
    parsed = done.choices[0].message.parsed
    assert isinstance(parsed, City) and done.choices[0].finish_reason == "stop"
    with client.chat.completions.stream(model=MODEL, messages=messages, response_format=City, temperature=0,
                                        max_tokens=80) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == parsed


def test_json_object_and_vllm_constraints_on_both_endpoints(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A cat, as JSON."}],
                                       response_format={"type": "json_object"}, temperature=0, max_tokens=60)
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{")
    regex = r"[0-9]{3}-[0-9]{4}"
    r = client.completions.create(model=MODEL, prompt="Call me at", max_tokens=12, temperature=0,
                                  extra_body={"structured_outputs": {"regex": regex}})
    assert re.fullmatch(regex, r.choices[0].text) and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0,
                                  extra_body={"guided_choice": ["blue", "green"]})
    assert r.choices[0].text in ("blue", "green")
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 10}},
              "required": ["answer"], "additionalProperties": False}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2 + 3?"}],
                                       temperature=0, max_tokens=20, extra_body={"guided_json": schema})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Yes or no?"}],
                                       temperature=0, max_tokens=5,
                                       extra_body={"structured_outputs": {"grammar": 'start: "yes" | "no"'}})
    assert r.choices[0].message.content in ("yes", "no")
    stream = client.completions.create(model=MODEL, prompt="Call me at", max_tokens=12, temperature=0, stream=True,
                                       extra_body={"guided_regex": regex})
    assert re.fullmatch(regex, "".join(c.choices[0].text for c in stream))


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_choice_give_valid_calls(client, stream):
    def call(**kwargs):
        if not stream:
            r = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, temperature=0, max_tokens=80,
                                               tools=[WEATHER, TIME], **kwargs)
            return r.choices[0].message.tool_calls, r.choices[0].finish_reason
        calls, reason = {}, None
        for chunk in client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, temperature=0, max_tokens=80,
                                                    tools=[WEATHER, TIME], stream=True, **kwargs):
            for delta in chunk.choices[0].delta.tool_calls or []:
                calls[delta.index] = delta
            reason = chunk.choices[0].finish_reason or reason
        return [calls[i] for i in sorted(calls)], reason

    named, reason = call(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert reason == "tool_calls" and len(named) == 1
    assert named[0].function.name == "get_weather" and named[0].id and named[0].type == "function"
    jsonschema.validate(json.loads(named[0].function.arguments), WEATHER["function"]["parameters"])
    required, reason = call(tool_choice="required", parallel_tool_calls=False)
    assert reason == "tool_calls" and len(required) == 1
    fn = {"get_weather": WEATHER, "get_time": TIME}[required[0].function.name]["function"]
    jsonschema.validate(json.loads(required[0].function.arguments), fn["parameters"])


def test_auto_and_a_conversation_with_a_tool_result(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="auto",
                                       temperature=0, max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    if choice.finish_reason == "tool_calls":
        assert choice.message.tool_calls[0].function.name == "get_weather"
    first = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], temperature=0,
                                           max_tokens=80, tool_choice="required")
    call = first.choices[0].message.tool_calls[0]
    history = ASK_WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=40)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("kwargs, param, words", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}),
     "response_format", "Invalid type: foo"),
    (dict(response_format={"type": "xml"}), "response_format", "response_format.type"),
    (dict(extra_body={"guided_regex": "(unclosed"}), "guided_regex", "invalid regex"),
    (dict(extra_body={"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}), "structured_outputs",
     "exactly one"),
    (dict(extra_body={"structured_outputs": {"structural_tag": "x"}}), "structured_outputs", "not supported"),
    (dict(extra_body={"guided_choice": ["a"], "guided_regex": "b"}), "guided_choice", "only one output constraint"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice", "not in"),
    (dict(tool_choice="required"), "tool_choice", "needs `tools`"),
    (dict(tools=[{"type": "function"}]), "tools.0", "each tool"),
    (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "tool_choice",
     "cannot be combined"),
])
def test_errors_are_400s_naming_the_field(client, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=5, **kwargs)
    assert e.value.status_code == 400
    error = e.value.body
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_completions_reject_a_bad_schema(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=5,
                                  extra_body={"structured_outputs": {"json": {"type": "object", "properties": {
                                      "a": {"$ref": "#/$defs/missing"}}}}})
    assert e.value.body["param"] == "structured_outputs" and "JSON schema" in e.value.body["message"]
