"""Errors as OpenAI returns them: `{"error": {"message", "type", "param", "code"}}` with the right status.

Handlers raise `APIError`; the one error middleware turns it, aiohttp's own HTTP errors (404 route,
405, 413 body too large), and anything unexpected (500, logged) into that JSON body.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pydantic
from aiohttp import web

logger = logging.getLogger("jpaged.serve")

# Statuses and the OpenAI error type each gets.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error response: status, message and the OpenAI fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_value_error(error: ValueError, params: tuple[str, ...] = ()) -> APIError:
    """A ValueError of SamplingParams / the engine as a 400; `param` is the field it names, if known."""
    message = str(error)
    match = re.match(r"(\w+) must ", message)
    param = match.group(1) if match and match.group(1) in params else None
    code = "context_length_exceeded" if message.startswith("This model's maximum context length") else None
    return bad_request(message, param=param, code=code)


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|.*\[.*\])$")


def from_validation_error(error: pydantic.ValidationError) -> APIError:
    """One problem pydantic found, naming the field (dotted path) in `param`."""
    # Of a union's failed branches, the deepest one says most ("stop.0", not "stop is not a string").
    first = max(error.errors(include_url=False), key=lambda e: len(e["loc"]))
    # Drop the union member tags pydantic puts in the path ("stop.list[str].0" -> "stop.0").
    loc = ".".join(str(part) for part in first["loc"] if not _UNION_TAG.match(str(part)))
    if first["type"] == "missing":
        message = f"'{loc}' is a required property"
    else:
        message = f"{loc}: {first['msg']}" if loc else first["msg"]
    return bad_request(message, param=loc or None)


def _is_json_type(content_type: str) -> bool:
    # No Content-Type header reads as aiohttp's default, application/octet-stream: accepted, as
    # OpenAI does; a form or text body is a client that did not mean to send JSON.
    return (content_type in ("application/json", "application/octet-stream")
            or (content_type.startswith("application/") and content_type.endswith("+json")))


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 (413 from aiohttp when it is too large, 415 when the
    Content-Type is not JSON)."""
    if not _is_json_type(request.content_type):
        raise APIError(415, f"Unsupported Content-Type {request.content_type!r}: send the body as application/json")
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON or bad UTF-8; nesting too deep for the parser
        raise bad_request(f"Invalid JSON body: {e}") from None
    if not isinstance(body, dict):
        raise bad_request(f"The request body must be a JSON object, got {type(body).__name__}")
    try:  # "\ud800" is valid JSON but no text: tokenizers and UTF-8 output would fail on it later
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("The request body contains invalid Unicode (a lone surrogate escape)") from None
    return body


def parse(model: type[pydantic.BaseModel], body: dict[str, Any]) -> Any:
    """Validates a body into a request model; unknown fields are ignored with a log line."""
    try:
        parsed = model.model_validate(body)
    except pydantic.ValidationError as e:
        raise from_validation_error(e) from None
    if parsed.model_extra:
        logger.info("ignoring unknown fields of %s: %s", model.__name__, ", ".join(sorted(parsed.model_extra)))
    return parsed


def json_error(error: APIError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as e:
        return json_error(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise  # redirects and the like are not errors
        message = {404: f"Not found: {request.method} {request.path}",
                   405: f"Method {request.method} not allowed on {request.path}"}.get(e.status, e.text or e.reason)
        if e.status == 413:
            message = f"The request body is too large. {e.text}"
        headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
        return json_error(APIError(e.status, message, headers=headers))
    except ConnectionResetError:
        raise  # the client went away; there is nobody to answer
    except Exception:
        logger.exception("internal error handling %s %s", request.method, request.path)
        return json_error(APIError(500, "Internal server error"))
