"""Request bodies of the OpenAI-compatible API, as pydantic models, and their SamplingParams.

Types are checked strictly (a string is not a number); ranges are SamplingParams' to check, so
the API and the offline engine accept exactly the same values. Unknown fields are kept in
`model_extra` (logged and ignored by `errors.parse`). Every field OpenAI or vLLM defines that a
client may send is declared here and either honoured or refused with a 400 naming it: a silently
ignored field (an echo that does not echo) gives clients wrong answers without an error.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from jpaged import SamplingParams, StructuredOutputs
from serve.errors import bad_request, from_value_error

# vLLM's older per-field names of structured_outputs' keys.
_GUIDED = ("json", "regex", "choice", "grammar")
# structured_outputs keys that change nothing here (vLLM's backend choice, whitespace shaping).
_IGNORED_STRUCTURED = ("backend", "disable_fallback", "whitespace_pattern", "disable_additional_properties")

# Names that SamplingParams' ValueErrors may start with, reported as the error's `param`.
_PARAM_NAMES = tuple(SamplingParams.__dataclass_fields__)


# Fields parsed by hand (for messages naming what is wrong) are `Any` to pydantic; /openapi.json
# states what they accept, so clients and schema-driven fuzzers see the real shapes.
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_PROMPT_SCHEMA = WithJsonSchema({"anyOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}, _TOKEN_IDS,
    {"type": "array", "items": _TOKEN_IDS, "minItems": 1}]})
_CONTENT_SCHEMA = WithJsonSchema({"anyOf": [
    {"type": "string"}, {"type": "null"},
    {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                                "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]})


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Model):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage so far in every chunk


# OpenAI's processing tiers; one server has one tier, so only the ones that ask for nothing are honoured.
_SERVICE_TIERS = ("auto", "default")


class GenerationRequest(_Model):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = False  # vLLM: logprob tokens as "token_id:<id>"
    logit_bias: dict[str, float] | None = None  # {token id as a string: bias in [-100, 100]}
    allowed_token_ids: list[int] | None = None  # vLLM: sample only among these token ids
    # vLLM: per prompt token its log-probability, rank and the top k alternatives (not when streaming)
    prompt_logprobs: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the client's own tracking; it changes nothing here
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    use_beam_search: bool = False
    # vLLM's structured outputs: {json | regex | choice | grammar | json_object}, or the older guided_* fields.
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def constraint(self) -> StructuredOutputs | None:
        """The output constraint the request asks for (a 400 naming the field when it is invalid)."""
        sources = []
        if self.structured_outputs is not None:
            so = dict(self.structured_outputs)
            for key in _IGNORED_STRUCTURED:
                so.pop(key, None)
            if "disable_any_whitespace" in so:
                so["any_whitespace"] = not so.pop("disable_any_whitespace")
            unknown = sorted(set(so) - set(StructuredOutputs.__dataclass_fields__))
            if unknown:
                raise bad_request(f"structured_outputs.{unknown[0]} is not supported; use one of json, regex, choice, "
                                  f"grammar, json_object", param="structured_outputs")
            sources.append(("structured_outputs", so))
        for key in _GUIDED:
            if getattr(self, f"guided_{key}") is not None:
                sources.append((f"guided_{key}", {key: getattr(self, f"guided_{key}")}))
        return _one_constraint(sources)

    @property
    def continuous_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.continuous_usage_stats

    def check_fields(self, max_n: int) -> None:
        """400 for values this server cannot honour, naming the field."""
        if not 1 <= self.n <= max_n:
            raise bad_request(f"n must be in [1, {max_n}], got {self.n}", param="n")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options can only be set when stream is true", param="stream_options")
        if self.prompt_logprobs is not None and self.stream:  # as vLLM: a stream has nowhere to put them
            raise bad_request("prompt_logprobs are not available when stream is true", param="prompt_logprobs")
        if self.use_beam_search:
            raise bad_request("use_beam_search is not supported: beam search is not implemented",
                              param="use_beam_search")
        if self.service_tier is not None and self.service_tier not in _SERVICE_TIERS:
            raise bad_request(f"service_tier must be one of {', '.join(_SERVICE_TIERS)} (this server has one tier), "
                              f"got {self.service_tier!r}", param="service_tier")
        if self.store:
            raise bad_request("store is not supported: this server keeps no completions", param="store")
        if self.metadata:
            raise bad_request("metadata is only kept with store, which is not supported", param="metadata")
        tools = getattr(self, "tools", None) or (self.model_extra or {}).get("tools")
        if self.parallel_tool_calls is not None and not tools:
            raise bad_request("parallel_tool_calls is only allowed when tools are given", param="parallel_tool_calls")

    def token_logit_bias(self) -> dict[int, float] | None:
        """logit_bias with integer keys; a 400 for a key that is no token id."""
        if self.logit_bias is None:
            return None
        bias = {}
        for key, value in self.logit_bias.items():
            if not key.lstrip("-").isdigit():
                raise bad_request(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
            bias[int(key)] = value
        return bias

    def sampling_params(self, *, max_tokens: int, logprobs: int | None,
                        prompt_logprobs: int | None = None,
                        constraint: StructuredOutputs | None = None) -> SamplingParams:
        """SamplingParams of this request; a 400 naming the field when a value is out of range."""
        optional = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "seed")
        kwargs = {name: getattr(self, name) for name in optional if getattr(self, name) is not None}
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        try:
            return SamplingParams(
                n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=tuple(stop),
                stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos, logprobs=logprobs,
                skip_special_tokens=self.skip_special_tokens, logit_bias=self.token_logit_bias(),
                allowed_token_ids=self.allowed_token_ids,
                include_stop_str_in_output=self.include_stop_str_in_output, prompt_logprobs=prompt_logprobs,
                structured_outputs=constraint, **kwargs,
            )
        except ValueError as e:
            raise from_value_error(e, _PARAM_NAMES) from None

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def check_n(self, max_n: int) -> None:
        if not 1 <= self.n <= max_n:
            raise bad_request(f"n must be in [1, {max_n}], got {self.n}", param="n")


class CompletionRequest(GenerationRequest):
    """POST /v1/completions."""

    prompt: Annotated[Any, _PROMPT_SCHEMA]  # str | list[str] | list[int] | list[list[int]], checked by prompts()
    logprobs: int | None = None
    max_tokens: int | None = 16
    suffix: str | None = None
    best_of: int | None = None
    echo: bool = False

    def check_fields(self, max_n: int) -> None:
        super().check_fields(max_n)
        if self.suffix:
            raise bad_request("suffix is not supported: the model has no fill-in-the-middle mode", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request(f"best_of must equal n ({self.n}) when given: choosing the best of several "
                              f"completions is not supported, got {self.best_of}", param="best_of")

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request: one text or token-id list, or a batch of them."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p, list) and p:
            if all(_is_token_id(t) for t in p):
                return [p]
            if all(isinstance(x, str) for x in p):
                return list(p)
            if all(isinstance(x, list) and x and all(_is_token_id(t) for t in x) for x in p):
                return list(p)
        raise bad_request("prompt must be a string, a list of strings, a non-empty list of token ids or a list of "
                          "such lists", param="prompt")


def _one_constraint(sources: list[tuple[str, dict]]) -> StructuredOutputs | None:
    """StructuredOutputs from the one field that asks for a constraint; a 400 naming the field otherwise."""
    if not sources:
        return None
    if len(sources) > 1:
        raise bad_request(f"only one output constraint may be given; got {', '.join(n for n, _ in sources)}",
                          param=sources[1][0])
    name, kwargs = sources[0]
    try:
        return StructuredOutputs(**kwargs)
    except (ValueError, TypeError) as e:
        raise bad_request(str(e) if name == "structured_outputs" else f"{name}: {e}", param=name) from None


def _is_token_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class ChatMessage(_Model):
    role: str
    # str | None | list of {"type": "text", "text": str}, checked by as_template_input()
    content: Annotated[Any, _CONTENT_SCHEMA] = None

    def as_template_input(self, index: int) -> dict[str, Any]:
        """The message as chat templates expect it: content as one string (text parts joined)."""
        content = self.content
        if isinstance(content, list) and all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            for part in content
        ):
            content = "".join(part["text"] for part in content)
        if content is not None and not isinstance(content, str):
            raise bad_request("content must be a string or a list of text parts ({'type': 'text', 'text': ...}); "
                              "other content types are not supported", param=f"messages.{index}.content")
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def constraint(self) -> StructuredOutputs | None:
        sources = []
        fmt = self.response_format
        if fmt is not None:
            kind = fmt.get("type")
            if kind == "json_object":
                sources.append(("response_format", {"json_object": True}))
            elif kind == "json_schema":
                spec = fmt.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                    raise bad_request("response_format.json_schema must be an object with a `schema` object",
                                      param="response_format")
                sources.append(("response_format", {"json": spec.get("schema", {"type": "object"})}))
            elif kind != "text":
                raise bad_request(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                                  param="response_format")
        other = super().constraint()
        if other is not None:
            if sources:
                raise bad_request("only one output constraint may be given: response_format or structured_outputs",
                                  param="response_format")
            return other
        return _one_constraint(sources)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: None unless logprobs is true; then top_logprobs alternatives."""
        if not self.logprobs:
            if self.top_logprobs:
                raise bad_request("top_logprobs needs logprobs to be true", param="top_logprobs")
            return None
        return self.top_logprobs or 0


def check_num_logprobs(num: int | None, max_logprobs: int, param: str) -> None:
    """400 when a request asks for more alternatives than the server's --max-logprobs."""
    if num is not None and not 0 <= num <= max_logprobs:
        raise bad_request(f"{param} must be in [0, {max_logprobs}] (the server's --max-logprobs), got {num}",
                          param=param)


class TokenizeRequest(_Model):
    """POST /tokenize: a prompt, or chat messages in the model's template (vLLM's fields)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # None: true for a prompt, false for messages (the template has them)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None  # handed to the chat template
    return_token_strs: bool = False


class DetokenizeRequest(_Model):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]
