"""GET /openapi.json: an OpenAPI 3.1 description of every route, generated from the route table and
the pydantic request models, so it cannot drift from what the handlers parse.

Request bodies are the models' JSON Schemas (pydantic's); responses are described by status and
OpenAI's error body only: their shapes are OpenAI's and are not re-stated here.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic.json_schema import models_json_schema

import jpaged

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def build_schema(routes: list[web.RouteDef], bodies: dict[Any, type]) -> dict[str, Any]:
    """The OpenAPI document of `routes`; bodies maps a handler to the pydantic model of its JSON body."""
    refs, defs = models_json_schema([(m, "validation") for m in bodies.values()],
                                    ref_template="#/components/schemas/{model}")
    paths: dict[str, dict] = {}
    for route in routes:
        op: dict[str, Any] = {
            "operationId": route.handler.__name__,
            "summary": (route.handler.__doc__ or route.handler.__name__).strip().splitlines()[0],
            "responses": {"200": {"description": "OK"},
                          "default": {"description": "An error, as OpenAI returns it",
                                      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
        }
        model = bodies.get(route.handler)
        if model is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs[model, "validation"]}}}
        params = [part[1:-1] for part in route.path.split("/") if part.startswith("{")]
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params]
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "jpaged", "version": jpaged.__version__,
                 "description": "OpenAI-compatible API of jpaged serve"},
        "paths": paths,
        "components": {"schemas": {**defs.get("$defs", {}), "Error": _ERROR}},
    }
