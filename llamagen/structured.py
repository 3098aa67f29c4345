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
import math
from typing import Any

from llamagen._schema import MAX_SCHEMA_DEPTH, _children, _pointer, check_limits
from llamagen._schema_lower import lower
from llamagen._schema_unique import unique_spec as _unique_spec

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
_SUPPORTED = ("type, properties, required, additionalProperties, items, prefixItems, minItems, "
              "maxItems, enum, const, anyOf, oneOf, allOf, $ref, $defs, minLength, maxLength, "
              "pattern, format (date, time, date-time, uuid, email, hostname, ipv4, uri), "
              "minimum/maximum/exclusiveMinimum/exclusiveMaximum on integers and numbers, "
              "integer multipleOf (docs/structured.md)")

# What each keyword constrains: a keyword the converter drops at a node matters only when the node
# can produce an instance of those types (JSON Schema applies ``minLength`` to strings only, ...)
_ALL = frozenset({"null", "boolean", "integer", "number", "string", "array", "object"})
_DOMAIN = {}
for _k in _BOUNDS + ("multipleOf",):
    _DOMAIN[_k] = frozenset({"integer", "number"})
for _k in ("minLength", "maxLength", "pattern", "format"):
    _DOMAIN[_k] = frozenset({"string"})
for _k in ("items", "prefixItems", "minItems", "maxItems", "uniqueItems", "additionalItems"):
    _DOMAIN[_k] = frozenset({"array"})
for _k in ("properties", "required", "additionalProperties"):
    _DOMAIN[_k] = frozenset({"object"})
for _k in ("type", "enum", "const", "allOf", "anyOf", "oneOf", "$ref"):
    _DOMAIN[_k] = _ALL
# how deep types() follows alternatives and $refs before it answers "any type" (it recurses)
_TYPES_DEPTH = 48
# the converter's int64 bounds (a larger one is cast and wraps)
_INT_LIMIT = 2 ** 62


class _Refused(ValueError):
    pass


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "integer" if v.is_integer() else "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


def _covers(declared, produced) -> bool:
    """Whether instances of ``produced`` types all have one of the ``declared`` types."""
    declared = set(declared)
    if "number" in declared:
        declared.add("integer")
    return set(produced) <= declared


class _Analysis:
    """llama.cpp's schema builder (common/json-schema.cpp at the pinned commit) replayed: which
    kind each node becomes, hence which of its keywords are enforced.  A keyword the builder drops
    where it still constrains the output, and a contradiction the grammar cannot satisfy, are
    refused; anything the builder itself rejects is left to it (its message is better)."""

    def __init__(self, root: dict, where: str, unique_items: bool = False):
        self.root, self.where = root, where
        # uniqueItems enforced by the caller's sampler wherever it stands (_schema_unique)
        self.unique_items = unique_items
        self.produced: dict = {}          # id(node) -> the JSON types it can produce
        self.variants: list = []          # nodes made here, kept alive: their ids stay theirs

    def refuse(self, path: str, what: str):
        raise _Refused(f"{self.where} at {path}: {what} (llama.cpp's converter would not enforce "
                       f"it, so output could break the schema)")

    def target(self, ref) -> Any:
        return _pointer(self.root, ref) if isinstance(ref, str) and ref.startswith("#/") else None

    def types(self, node: Any, seen=()) -> frozenset:
        """The JSON types ``node`` can produce once converted (all of them when unsure)."""
        if not isinstance(node, dict):
            return _ALL
        key = id(node)
        if key in self.produced:
            return self.produced[key]
        if key in seen or len(seen) > _TYPES_DEPTH:
            return _ALL                     # (a cycle, or deeper than worth following: unsure)
        seen = seen + (key,)
        out = self._types(node, seen)
        self.produced[key] = out
        return out

    def _types(self, node: dict, seen) -> frozenset:
        if "$ref" in node:
            return self.types(self.target(node["$ref"]), seen)
        alts = node.get("oneOf", node.get("anyOf"))
        if isinstance(alts, list) and alts:
            return frozenset().union(*(self.types(a, seen) for a in alts))
        t = node.get("type")
        if isinstance(t, list):
            return frozenset(x for x in t if isinstance(x, str)) & _ALL or _ALL
        if "const" in node:
            return frozenset({_json_type(node["const"])})
        if isinstance(node.get("enum"), list) and node["enum"]:
            return frozenset(_json_type(v) for v in node["enum"])
        kind = self.kind(node)
        if kind == "allOf":
            parts = [self.types(a, seen) for a in node.get("allOf") or []]
            return frozenset.intersection(*parts) if parts else _ALL
        return {"object": frozenset({"object"}), "array": frozenset({"array"}),
                "tuple": frozenset({"array"}), "string": frozenset({"string"}),
                "integer": frozenset({"integer"}), "number": frozenset({"number", "integer"}),
                "boolean": frozenset({"boolean"}), "null": frozenset({"null"})}.get(kind, _ALL)

    @staticmethod
    def kind(node: dict) -> str:
        """What the builder makes of a node with no $ref, anyOf/oneOf, type list, const or enum."""
        t = node.get("type")
        has_props = "properties" in node or (
            "additionalProperties" in node and node["additionalProperties"] is not True)
        if t is None:
            if has_props:
                return "object"
            if "allOf" in node:
                return "allOf"
            if "items" in node or "prefixItems" in node:
                return _array_kind(node)
            if any(k in node for k in ("pattern", "minLength", "maxLength")) or \
                    node.get("format") in _FORMATS:
                return "string"
            return "any"
        if t == "object":
            return "allOf" if not has_props and "allOf" in node else "object"
        if t == "string":
            return "allOf" if "allOf" in node else "string"
        if t == "array":
            return _array_kind(node)
        return t if isinstance(t, str) else "?"

    def check(self, node: dict, path: str) -> None:
        present = [k for k in node if k in _DOMAIN]
        if "$ref" in node:
            if self.target(node["$ref"]) is None:
                return                      # the builder reports it
            self.dropped(node, path, present, {"$ref"}, "beside $ref")
            return
        if "oneOf" in node or "anyOf" in node:
            key = "oneOf" if "oneOf" in node else "anyOf"
            alts = node[key]
            if not isinstance(alts, list) or not alts:
                return
            self.dropped(node, path, present, {key}, f"beside {key}")
            if key == "oneOf":
                self.exclusive(alts, path)
            return
        t = node.get("type")
        if isinstance(t, list):
            for i, x in enumerate(t):       # each type is its own alternative, with every keyword
                self.variants.append({**node, "type": x})
                self.check(self.variants[-1], f"{path}/type/{i}")
            return
        if t is not None and t not in _ALL:
            return                          # the builder reports it
        if "const" in node or "enum" in node:
            values = [node["const"]] if "const" in node else node["enum"]
            if not isinstance(values, list) or not values:
                return
            key = "const" if "const" in node else "enum"
            if t is not None and not _covers({t}, {_json_type(v) for v in values}):
                self.refuse(path, f"{key} holds a value that is not of type {t!r}")
            self.dropped(node, path, [k for k in present if k != "type"], {key}, f"beside {key}")
            return
        kind = self.kind(node)
        honoured = {"type"} | {
            "object": {"properties", "required", "additionalProperties"},
            "allOf": {"allOf"},
            "array": {"items", "minItems", "maxItems"},
            "tuple": ({"items"} if isinstance(node.get("items"), list) else {"prefixItems"})
            | {"minItems", "maxItems"},     # (checked against the tuple's length below)
            "string": ({"pattern"} if "pattern" in node else {"format"} if node.get("format") in
                       _FORMATS else {"minLength", "maxLength"}),
            "integer": set(_BOUNDS),
        }.get(kind, set())
        self.dropped(node, path, present, honoured, "here")
        self.contradictions(node, path, kind)

    def dropped(self, node: dict, path: str, present, honoured, where: str) -> None:
        produced = self.types(node)
        for k in present:
            if k in honoured or (k == "uniqueItems" and self.unique_items):
                continue
            if k == "type":
                t = node["type"]
                if _covers([t] if isinstance(t, str) else t, produced):
                    continue
                self.refuse(path, f"type {t!r} {where} is not applied (the output may be "
                                  f"{', '.join(sorted(produced))}); put it in each alternative")
            if k in ("$ref", "anyOf", "oneOf", "allOf", "const", "enum") or (_DOMAIN[k] & produced):
                self.refuse(path, f"{k} {where} is ignored")

    def exclusive(self, alts: list, path: str) -> None:
        """oneOf is converted as anyOf: refused unless no output can match two alternatives
        (their types do not overlap, or a required property tells every object apart)."""
        sets = [self.types(a) for a in alts]
        overlap = any(sets[i] & sets[j] for i in range(len(sets)) for j in range(i))
        if not overlap:
            return
        resolved = []
        for a in alts:
            seen = 0
            while isinstance(a, dict) and "$ref" in a and seen < 64:
                a, seen = self.target(a["$ref"]), seen + 1
            resolved.append(a)
        if all(isinstance(a, dict) and self.types(a) == {"object"} for a in resolved):
            common = None
            for a in resolved:
                req = set(r for r in a.get("required") or () if isinstance(r, str))
                common = req if common is None else common & req
            for name in sorted(common or ()):
                values = []
                for a in resolved:
                    prop = (a.get("properties") or {}).get(name)
                    while isinstance(prop, dict) and "$ref" in prop:
                        prop = self.target(prop["$ref"])
                    if not isinstance(prop, dict):
                        break
                    vals = [prop["const"]] if "const" in prop else prop.get("enum")
                    if not isinstance(vals, list):
                        break
                    values.append({json.dumps(v, sort_keys=True) for v in vals})
                else:
                    if all(not (values[i] & values[j]) for i in range(len(values))
                           for j in range(i)):
                        return              # a discriminator: at most one alternative matches
        self.refuse(path, "oneOf alternatives that one output can match at once are treated as "
                          "anyOf (use anyOf, or tell objects apart by a required const property)")

    def contradictions(self, node: dict, path: str, kind: str) -> None:
        if kind == "integer":
            lo = hi = None
            for k in _BOUNDS:
                v = node.get(k)
                if k not in node:
                    continue
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    return                  # the builder reports it
                if abs(v) > _INT_LIMIT:
                    self.refuse(path, f"{k} {v!r} is beyond the converter's integer range "
                                      f"(+-2**62)")
            if "minimum" in node and "exclusiveMinimum" in node and \
                    node["exclusiveMinimum"] >= node["minimum"]:
                self.refuse(path, "exclusiveMinimum beside a lower minimum is ignored")
            if "maximum" in node and "exclusiveMaximum" in node and \
                    node["exclusiveMaximum"] <= node["maximum"]:
                self.refuse(path, "exclusiveMaximum beside a higher maximum is ignored")
            if "minimum" in node:
                lo = math.ceil(node["minimum"])
            elif "exclusiveMinimum" in node:
                lo = math.floor(node["exclusiveMinimum"]) + 1
            if "maximum" in node:
                hi = math.floor(node["maximum"])
            elif "exclusiveMaximum" in node:
                hi = math.ceil(node["exclusiveMaximum"]) - 1
            if lo is not None and hi is not None and lo > hi:
                self.refuse(path, f"no integer lies between the bounds ({lo} > {hi})")
        elif kind in ("string", "array"):
            a, b = ("minLength", "maxLength") if kind == "string" else ("minItems", "maxItems")
            lo, hi = node.get(a), node.get(b)
            if isinstance(lo, int) and isinstance(hi, int) and not isinstance(lo, bool) \
                    and not isinstance(hi, bool) and lo > hi:
                self.refuse(path, f"{a} {lo} is above {b} {hi}")
        elif kind == "tuple":
            items = node.get("items") if isinstance(node.get("items"), list) else \
                node.get("prefixItems")
            n = len(items) if isinstance(items, list) else 0
            lo, hi = node.get("minItems"), node.get("maxItems")
            if isinstance(lo, int) and lo > n or isinstance(hi, int) and hi < n:
                self.refuse(path, f"a tuple of {n} items is generated: minItems / maxItems "
                                  "other than that are not enforced")
        elif kind == "object":
            props = node.get("properties")
            props = props if isinstance(props, dict) else {}
            for r in node.get("required") or ():
                if isinstance(r, str) and r not in props:
                    self.refuse(path, f"required names {r!r}, which is not in properties: the "
                                      "converter never writes it")


def _array_kind(node: dict) -> str:
    key = "items" if "items" in node else "prefixItems"
    return "tuple" if isinstance(node.get(key), list) else "array"


def check_schema(schema: Any, where: str = "json_schema", unique_items: bool = False) -> None:
    """Raise ValueError naming the first keyword (with its JSON pointer) that the converter would
    ignore where it constrains the output, or a constraint no output can meet; every node reached,
    through local $refs too.  Structural errors (a bad type, a $ref that does not resolve) are the
    converter's.  ``unique_items``: uniqueItems is enforced by the caller (a response schema's
    sampler, see llamagen._schema_unique), not refused."""
    if not isinstance(schema, dict):
        raise ValueError(f"{where} must be a JSON object (a schema), got {type(schema).__name__}")
    check_limits(schema, where)             # (first: the walk below then meets no cycle-free
                                            # chain deeper than MAX_SCHEMA_DEPTH)
    analysis = _Analysis(schema, where, unique_items)
    stack = [(schema, "#")]
    visited = set()
    while stack:
        node, path = stack.pop()
        if not isinstance(node, dict) or id(node) in visited:
            continue
        visited.add(id(node))
        bad = sorted(k for k in node if k in UNSUPPORTED_KEYWORDS)
        if node.get("uniqueItems") is True and not unique_items:
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
                f"{where} uses {', '.join(bad)} at {path}: not supported by llama.cpp's "
                f"schema-to-grammar converter (output could not be guaranteed to match); "
                f"supported: {_SUPPORTED}")
        analysis.check(node, path)
        stack.extend(_children(schema, node, path))


def normalize(value: Any) -> str:
    """The JSON text of a schema given as a dict or as JSON text (ValueError otherwise)."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from None
        except RecursionError:      # (json's decoder recurses per level too: found by fuzzing)
            raise ValueError(f"json_schema nests too deeply to parse (the limit is "
                             f"{MAX_SCHEMA_DEPTH} levels, fewer on a deep call stack)") from None
    elif isinstance(value, dict):
        parsed = value
    else:
        raise TypeError(f"json_schema must be a dict or a JSON string, got {type(value).__name__}")
    if isinstance(parsed, dict):
        check_limits(parsed)                # (first: what follows walks it)
    try:
        text = json.dumps(parsed, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"json_schema is not JSON-serializable: {e}") from None
    except RecursionError:      # (json's encoder recurses per level; the caller's stack counts)
        raise ValueError(f"json_schema nests too deeply to serialize (the limit is "
                         f"{MAX_SCHEMA_DEPTH} levels, fewer on a deep call stack)") from None
    check_schema(lower(parsed)[0], unique_items=True)   # (what lower() and the unique-items
    unique_spec(text)                                   # sampler enforce is no longer refused)
    return text


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
    parsed = json.loads(text)
    lowered, subs = lower(parsed)
    grammar = _converter(text if lowered is parsed else json.dumps(lowered, ensure_ascii=False))
    extra = []
    for name, (expr, rules) in subs.items():
        literal = '"\\"' + name + '\\""'
        if literal not in grammar:
            raise RuntimeError(f"the converter did not write placeholder {name}")
        grammar = grammar.replace(literal, "(" + expr + ")")
        if rules:
            extra.append(rules)
    return grammar.rstrip("\n") + ("\n" + "\n".join(extra) if extra else "") + "\n"


@functools.lru_cache(maxsize=256)
def unique_spec(text: str):
    """The unique-items sampler's spec for a schema's JSON text (None: no unique arrays)."""
    return _unique_spec(json.loads(text))


def schema_to_grammar(schema: Any) -> str:
    """The GBNF grammar (root rule ``root``) llama.cpp's converter makes of ``schema`` (a dict or
    JSON text).  ValueError for a schema it cannot convert exactly."""
    return _convert(normalize(schema))
