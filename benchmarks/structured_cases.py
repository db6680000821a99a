"""JSON schemas for structured-output benchmarks and tests, each with one valid instance.

The set covers what the structured-outputs issue lists: nested objects, arrays with min/max
items, enums, numbers with bounds, required and optional fields, `$ref`s and strings with a
pattern. Numbers are bounded in their digits too (integer ranges, multipleOf): an unbounded
number lets a 135M model sampled at temperature 1 write digits until max_tokens (seen: 2 of 40
sampled outputs before the bounds). The instance is what the grammar benchmark feeds token by token (compact JSON).
"""

from __future__ import annotations

SCHEMAS: dict[str, tuple[dict, object]] = {
    "person": (
        {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
         "required": ["name", "age"], "additionalProperties": False},
        {"name": "Ada Lovelace", "age": 36},
    ),
    "nested": (
        {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40},
            "location": {"type": "object", "properties": {
                "lat": {"type": "number", "minimum": -90, "maximum": 90, "multipleOf": 0.25},
                "lon": {"type": "number", "minimum": -180, "maximum": 180, "multipleOf": 0.25}},
                         "required": ["lat", "lon"], "additionalProperties": False}},
         "required": ["city", "location"], "additionalProperties": False},
        {"city": "Paris", "location": {"lat": 48.75, "lon": 2.25}},
    ),
    "array_bounds": (
        {"type": "object", "properties": {"colors": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                                     "minItems": 2, "maxItems": 4}},
         "required": ["colors"], "additionalProperties": False},
        {"colors": ["red", "green", "blue"]},
    ),
    "enum": (
        {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                                          "confidence": {"type": "string", "enum": ["low", "high"]}},
         "required": ["sentiment", "confidence"], "additionalProperties": False},
        {"sentiment": "positive", "confidence": "high"},
    ),
    "number_bounds": (
        {"type": "object", "properties": {"rating": {"type": "integer", "minimum": 1, "maximum": 5},
                                          "score": {"type": "number", "minimum": 0, "maximum": 1}},
         "required": ["rating", "score"], "additionalProperties": False},
        {"rating": 4, "score": 0.75},
    ),
    "optional_fields": (
        {"type": "object", "properties": {"title": {"type": "string", "maxLength": 60},
                                          "year": {"type": "integer", "minimum": 1800, "maximum": 2100},
                                          "genre": {"type": "string", "maxLength": 20}},
         "required": ["title"], "additionalProperties": False},
        {"title": "Dune", "year": 1965},
    ),
    "refs": (
        {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                                      "y": {"type": "integer", "minimum": -1000, "maximum": 1000}},
                             "required": ["x", "y"], "additionalProperties": False}},
         "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
         "required": ["start", "end"], "additionalProperties": False},
        {"start": {"x": 0, "y": 1}, "end": {"x": 5, "y": 7}},
    ),
    "pattern": (
        {"type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                                          "code": {"type": "string", "pattern": "^[A-Z]{3}$"}},
         "required": ["date", "code"], "additionalProperties": False},
        {"date": "2024-05-17", "code": "CDG"},
    ),
    "list_of_objects": (
        {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                             "qty": {"type": "integer", "minimum": 0, "maximum": 100},
                                             "tags": {"type": "array", "items": {"type": "string", "maxLength": 15},
                                                      "maxItems": 3}},
            "required": ["name", "qty"], "additionalProperties": False}}},
         "required": ["items"], "additionalProperties": False},
        {"items": [{"name": "apple", "qty": 3, "tags": ["fruit"]}, {"name": "bread", "qty": 1}]},
    ),
    "any_of": (
        {"type": "object", "properties": {"id": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 12}]},
                                          "active": {"type": "boolean"}, "note": {"type": ["string", "null"],
                                                                                  "maxLength": 40}},
         "required": ["id", "active", "note"], "additionalProperties": False},
        {"id": "abc-123", "active": True, "note": None},
    ),
}
