"""The route table, and the small handlers: models, health, metrics, tokenize, detokenize, version."""

from __future__ import annotations

from aiohttp import web

import jpaged
from serve.config import ENGINE, STATE
from serve.errors import APIError, bad_request, parse, read_json_object
from serve.metrics import METRICS
from serve.openai_routes import apply_chat_template, create_chat_completion, create_completion
from serve.openapi import build_schema
from serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from serve.responses_api import ResponsesRequest, create_response

# Paths anyone may call, with or without the API key.
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/openapi.json"})


def _model_object(request: web.Request) -> dict:
    state, engine = request.app[STATE], request.app[ENGINE]
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "jpaged",
            "root": state.model_name, "max_model_len": engine.max_model_len}


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_object(request)]})


async def retrieve_model(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    if model != request.app[STATE].model_name:
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
    return web.json_response(_model_object(request))


async def health(request: web.Request) -> web.Response:
    """200 while the engine runs; 503 once it has failed, or while the server drains."""
    engine = request.app[ENGINE]
    if engine.is_dead:
        raise APIError(503, f"The engine is not running: {engine.error!r}", code="engine_dead")
    if request.app[STATE].draining:
        raise APIError(503, "The server is shutting down", code="shutting_down")
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.Response:
    return request.app[METRICS].response()


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": jpaged.__version__})


def _tokenizer(request: web.Request):
    tokenizer = request.app[ENGINE].tokenizer
    if tokenizer is None:
        raise bad_request("This model has no tokenizer")
    return tokenizer


async def tokenize(request: web.Request) -> web.Response:
    req = parse(TokenizeRequest, await read_json_object(request))
    tokenizer = _tokenizer(request)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("Give exactly one of 'prompt' and 'messages'", param="prompt")
    if req.prompt is not None:
        ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    else:
        ids = apply_chat_template(tokenizer, [m.as_template_input(i) for i, m in enumerate(req.messages)],
                                  add_generation_prompt=req.add_generation_prompt,
                                  continue_final_message=req.continue_final_message, tools=req.tools,
                                  add_special_tokens=bool(req.add_special_tokens))
    engine = request.app[ENGINE]
    body = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
    if req.return_token_strs:
        body["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
    return web.json_response(body)


async def detokenize(request: web.Request) -> web.Response:
    req = parse(DetokenizeRequest, await read_json_object(request))
    tokenizer = _tokenizer(request)
    vocab = len(tokenizer)
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"tokens must be token ids in [0, {vocab}), got {bad[0]}", param="tokens")
    return web.json_response({"prompt": tokenizer.decode(req.tokens)})


async def openapi(request: web.Request) -> web.Response:
    """This API's OpenAPI document."""
    return web.json_response(OPENAPI)


ROUTES = [
    web.post("/v1/completions", create_completion),
    web.post("/v1/chat/completions", create_chat_completion),
    web.post("/v1/responses", create_response),
    web.get("/v1/models", list_models),
    web.get("/v1/models/{model}", retrieve_model),
    web.get("/health", health),
    web.get("/metrics", metrics),
    web.get("/version", version),
    web.post("/tokenize", tokenize),
    web.post("/detokenize", detokenize),
    web.get("/openapi.json", openapi),
]
# The JSON body each POST handler parses.
BODIES = {create_completion: CompletionRequest, create_chat_completion: ChatCompletionRequest,
          create_response: ResponsesRequest, tokenize: TokenizeRequest, detokenize: DetokenizeRequest}
OPENAPI = build_schema(ROUTES, BODIES)
