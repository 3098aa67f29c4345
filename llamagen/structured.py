"""Structured output: a JSON schema (or "any JSON object") as a GBNF grammar.

The conversion is llama.cpp's own (``common/json-schema-to-grammar``, linked into ``_core``); this
module only decides what it may be given.  The converter silently ignores keywords it does not
implement, so a generation would not be guaranteed to match the schema: those keywords are refused
here, by name and path, before anything is converted.  A regex ``pattern`` the converter cannot
express (it would accept any string instead) is refused too.
"""
from __future__ import annotations

import functools
import json
from typing import Any

from llamagen._schema import MAX_SCHEMA_DEPTH, check_limits, subschemas

__all__ = ["schema_to_grammar", "check_schema", "check_limits", "JSON_OBJECT_SCHEMA",
           "UNSUPPORTED_KEYWORDS", "MAX_SCHEMA_DEPTH"]

# any JSON object (OpenAI's response_format {"type": "json_object"})
JSON_OBJECT_SCHEMA = '{"type": "object"}'

# keywords that constrain valid documents but that llama.cpp's converter does not implement
UNSUPPORTED_KEYWORDS = frozenset({
    "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
    "patternProperties", "propertyNames", "minProperties", "maxProperties",
    "unevaluatedProperties", "unevaluatedItems", "contains", "minContains", "maxContains",
    "multipleOf", "$dynamicRef", "$recursiveRef",
})
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4",
                      "uuid5"})
def check_schema(schema: Any) -> None:
    """Raise ValueError naming the first keyword (with its JSON pointer) that the converter would
    ignore; structural errors (a bad type, a $ref that does not resolve) are the converter's."""
    if not isinstance(schema, dict):
        raise ValueError(f"json_schema must be a JSON object (a schema), got {type(schema).__name__}")
    stack = [(schema, "#")]
    while stack:
        node, path = stack.pop()
        if not isinstance(node, dict):
            continue
        bad = sorted(k for k in node if k in UNSUPPORTED_KEYWORDS)
        if node.get("uniqueItems") is True:
            bad.append("uniqueItems")
        types = node.get("type")
        types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
        if "number" in types:
            bad += [k for k in _BOUNDS if k in node]
        fmt = node.get("format")
        if isinstance(fmt, str) and fmt not in _FORMATS and (not types or "string" in types):
            bad.append(f"format {fmt!r}")
        if bad:
            raise ValueError(
                f"json_schema uses {', '.join(bad)} at {path}: not supported by llama.cpp's "
                "schema-to-grammar converter (output could not be guaranteed to match); supported: "
                "type, properties, required, additionalProperties, items, prefixItems, minItems, "
                "maxItems, enum, const, anyOf, oneOf, allOf, $ref, $defs, minLength, maxLength, "
                "pattern, format (date, time, date-time, uuid), integer minimum/maximum")
        stack.extend(subschemas(node, path))
    check_limits(schema)


def normalize(value: Any) -> str:
    """The JSON text of a schema given as a dict or as JSON text (ValueError otherwise)."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from None
    elif isinstance(value, dict):
        parsed = value
    else:
        raise TypeError(f"json_schema must be a dict or a JSON string, got {type(value).__name__}")
    check_schema(parsed)
    try:
        return json.dumps(parsed, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"json_schema is not JSON-serializable: {e}") from None


# llama.cpp's converter, installed by the compiled core as it loads (``import llamagen`` always
# loads it): this module sits below the core, so that SamplingParams can convert a schema when it
# is made without the Python layers importing each other in a circle
_converter = None


def _install_converter(fn) -> None:
    global _converter
    _converter = fn
    _convert.cache_clear()


@functools.lru_cache(maxsize=256)
def _convert(text: str) -> str:
    if _converter is None:
        raise RuntimeError("llamagen's compiled core is not loaded (import llamagen first)")
    return _converter(text)


def schema_to_grammar(schema: Any) -> str:
    """The GBNF grammar (root rule ``root``) llama.cpp's converter makes of ``schema`` (a dict or
    JSON text).  ValueError for a schema it cannot convert exactly."""
    return _convert(normalize(schema))
