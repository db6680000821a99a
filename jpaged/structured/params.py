"""`StructuredOutputs`: the constraint a request's output must satisfy, as vLLM's
StructuredOutputsParams. Validated on construction, without a tokenizer (no model needed)."""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclasses.dataclass(frozen=True, eq=False)
class StructuredOutputs:
    """Exactly one constraint. A bad schema, regex or grammar raises ValueError naming it."""

    json: dict | str | None = None
    """A JSON schema (a dict, or its JSON text): the output is one JSON value valid against it."""
    regex: str | None = None
    """The output fully matches this regular expression (Rust regex syntax, no look-around)."""
    choice: tuple[str, ...] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """A context-free grammar in Lark syntax (llguidance's dialect) or GBNF (llama.cpp's)."""
    json_object: bool = False
    """The output is some JSON object (OpenAI's response_format json_object)."""
    any_whitespace: bool = False
    """JSON only: allow free whitespace between tokens. Off by default: JSON then has ", " and
    ": " separators and no newlines, since free whitespace lets a small model emit blank lines
    until max_tokens."""

    def __post_init__(self):
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice):
                raise ValueError(f"structured_outputs.choice must be a list of strings, got {self.choice!r:.200}")
            if not self.choice:
                raise ValueError("structured_outputs.choice must not be empty")
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [k for k in KINDS if (getattr(self, k) not in (None, False))]
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(given) if given else 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (object or JSON text), got {self.json!r:.200}")
        for field in ("regex", "grammar"):
            value = getattr(self, field)
            if value is not None and not (isinstance(value, str) and value):
                raise ValueError(f"structured_outputs.{field} must be a non-empty string, got {value!r:.200}")
        _check(*self.key)

    @property
    def kind(self) -> str:
        """Which constraint: one of KINDS."""
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @functools.cached_property
    def key(self) -> tuple[str, str]:
        """(kind, canonical text): grammars are compiled once per key."""
        kind = self.kind
        if kind == "json":
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"structured_outputs.json must be a JSON schema object, got {schema!r:.200}")
            text = json.dumps(schema, separators=(",", ":"))  # key order kept: it is the output's order
        elif kind == "json_object":
            text = '{"type":"object"}'
            kind = "json"
        elif kind == "choice":
            text = json.dumps(list(self.choice))
        else:
            text = getattr(self, kind)
        return (f"{kind}+ws" if kind == "json" and self.any_whitespace else kind), text

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, StructuredOutputs) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def to_dict(self) -> dict:
        return {self.kind: self.json if self.kind == "json" else (list(self.choice) if self.choice else getattr(self, self.kind))}


def grammar_text(kind: str, text: str) -> str:
    """llguidance's grammar for a key (kind, text): what matchers are built from."""
    import llguidance

    if kind.startswith("json"):
        options = None if kind == "json+ws" else {"whitespace_flexible": False, "item_separator": ", ",
                                                   "key_separator": ": "}
        return llguidance.LLMatcher.grammar_from_json_schema(text, overrides=options)
    if kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(text)))
    return llguidance.grammar_from({"regex": "regex", "grammar": "grammar"}[kind], text)


_NAMES = {"json": "JSON schema", "json+ws": "JSON schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}


@functools.lru_cache(maxsize=512)
def _check(kind: str, text: str) -> None:
    """Raises ValueError naming the constraint when llguidance rejects it (cached by text)."""
    import llguidance

    try:
        grammar = grammar_text(kind, text)
    except ValueError as e:
        raise ValueError(f"invalid {_NAMES[kind]} in structured_outputs.{kind.split('+')[0]}: {e}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        message = messages[0].strip() if messages else "rejected"
        raise ValueError(f"invalid {_NAMES[kind]} in structured_outputs.{kind.split('+')[0]}: {message}")
