"""Tool calling on /v1/chat/completions: tools into the prompt, tool calls out of the text.

- Prompt: the model's chat template gets `tools=` when it renders them (Qwen2/Qwen3, Llama 3.1+,
  Hermes). A template that ignores them (SmolLM2's) gets DEFAULT_TOOL_PROMPT, Hermes' format, as
  the system message (appended to one already there); assistant `tool_calls` in the history
  become `<tool_call>` blocks and `role: "tool"` messages `<tool_response>` blocks in a user turn,
  as Qwen2's template writes them.
- `tool_choice` "required" or a named function: the output is constrained by a JSON schema
  (structured outputs), as vLLM does: a named function's output is its arguments object; "required"
  is a JSON array of {"name", "arguments"} objects, one of each tool's shape (one item when
  parallel_tool_calls is false).
- `tool_choice` "auto": the model writes freely; a parser (`--tool-call-parser`) finds the calls:
  `hermes` (`<tool_call>{...}</tool_call>`, Qwen2/Qwen3, Hermes) or `llama3_json` (a JSON object
  {"name", "parameters"} as the whole reply, several separated by ";", Llama 3.1+).
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from typing import Any

from jpaged import StructuredOutputs
from serve.errors import bad_request

TOOL_CALL_PARSERS = ("hermes", "llama3_json")

DEFAULT_TOOL_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def check_tools(tools: list[dict] | None, tool_choice: str | dict | None) -> tuple[list[dict], str | dict]:
    """(function definitions, tool_choice) after checking them; a 400 naming the field otherwise."""
    functions = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request("each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': {...}}}",
                              param=f"tools.{i}")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad_request("function.parameters must be a JSON schema object", param=f"tools.{i}.function.parameters")
        functions.append({**fn, "parameters": params})
    choice = tool_choice if tool_choice is not None else ("auto" if functions else "none")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}",
                              param="tool_choice")
        if choice != "none" and not functions:
            raise bad_request(f"tool_choice {choice!r} needs `tools`", param="tool_choice")
    else:
        name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
        if not isinstance(name, str):
            raise bad_request("a named tool_choice is {'type': 'function', 'function': {'name': ...}}", param="tool_choice")
        if name not in {f["name"] for f in functions}:
            raise bad_request(f"tool_choice names the function {name!r}, which is not in `tools`", param="tool_choice")
    return functions, choice


def tool_constraint(functions: list[dict], choice: str | dict, parallel: bool) -> StructuredOutputs | None:
    """The output constraint of "required" or a named function; None for "auto" and "none"."""
    try:
        if isinstance(choice, dict):
            fn = next(f for f in functions if f["name"] == choice["function"]["name"])
            return StructuredOutputs(json=fn["parameters"])
        if choice == "required":
            call = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                     "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": call} if len(call) > 1 else call[0]}
            if not parallel:
                schema["maxItems"] = 1
            return StructuredOutputs(json=schema)
    except ValueError as e:
        raise bad_request(f"a tool's parameters are not a usable JSON schema: {e}", param="tools") from None
    return None


@functools.lru_cache(maxsize=8)
def template_renders_tools(tokenizer) -> bool:
    """Whether the chat template writes `tools` into the prompt (tried once with a probe tool)."""
    probe = [{"type": "function", "function": {"name": "jpaged_probe_tool", "description": "", "parameters": {}}}]
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=probe, tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot take tools does not render them
        return False
    return "jpaged_probe_tool" in text


def _call_text(call: dict) -> str:
    fn = call.get("function") or {}
    args = fn.get("arguments", "{}")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        pass
    return "<tool_call>\n" + json.dumps({"name": fn.get("name"), "arguments": args}) + "\n</tool_call>"


def default_tool_messages(messages: list[dict], functions: list[dict]) -> list[dict]:
    """The conversation for a template without tool support: DEFAULT_TOOL_PROMPT in the system
    message, tool calls and tool results as Hermes' text blocks."""
    out: list[dict] = []
    if functions:
        prompt = DEFAULT_TOOL_PROMPT.format(tools="\n".join(json.dumps({"type": "function", "function": f})
                                                            for f in functions))
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{prompt}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": prompt})
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            text = "\n".join(([m["content"]] if m.get("content") else []) + [_call_text(c) for c in m["tool_calls"]])
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        else:
            out.append({k: v for k, v in m.items() if k != "tool_calls"})
    return [{k: v for k, v in m.items() if k != "_tool"} for m in out]


def _call(name: str, arguments: Any) -> dict:
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments if arguments is not None else {})
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}


def calls_from_constrained(text: str, choice: str | dict) -> list[dict] | None:
    """The tool calls of a "required" or named-function output; None if the text is cut short."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(choice, dict):
        return [_call(choice["function"]["name"], text)]
    return [_call(item["name"], item.get("arguments", {})) for item in value
            if isinstance(item, dict) and isinstance(item.get("name"), str)] or None


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_tool_calls(text: str, parser: str, names: set[str]) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a free-form reply; calls to functions not in `names` are left as text."""
    calls = []
    if parser == "hermes":
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        for body in _HERMES.findall(text[start:]):
            try:
                obj = json.loads(body)
            except json.JSONDecodeError:
                return text, []
            if not isinstance(obj, dict) or obj.get("name") not in names:
                return text, []
            calls.append(_call(obj["name"], obj.get("arguments", obj.get("parameters", {}))))
        content = text[:start].strip()
        return (content or None), calls
    if parser == "llama3_json":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        decoder = json.JSONDecoder()
        pos = 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return text, []
            if not isinstance(obj, dict) or obj.get("name") not in names:
                return text, []
            calls.append(_call(obj["name"], obj.get("parameters", obj.get("arguments", {}))))
            pos = end
            while pos < len(body) and body[pos] in " \n\t;":
                pos += 1
        return None, calls
    raise ValueError(f"unknown tool-call parser {parser!r}; known: {', '.join(TOOL_CALL_PARSERS)}")
