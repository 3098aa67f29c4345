"""``uniqueItems``: where a schema's unique arrays sit in the output, for the sampler that rejects
repeated items while generating (llamagen/csrc/lg_unique.cpp).

A grammar cannot remember earlier items, so llama.cpp's converter drops the keyword.  The sampler
wraps the schema's grammar, reads the JSON as it is generated, and rejects every token that would
complete an item equal (JSON equality) to an earlier item of the same array; the token is
re-sampled from what the grammar and that check leave.  It finds the arrays by their path in the
document (object keys, any array index), so a unique array must have one: not below
``additionalProperties`` or a recursive ``$ref``; its items must be scalars (strings, numbers,
booleans, null), for which a token that would leave only a repeat to write is rejected too (a
bounded search through the grammar).  Items of a small finite set (``enum``,
``const``, booleans, null, integers with both bounds) are checked as they are written too: an
item no unused value begins with is never started, and no separator is written once every value
is taken, so generation cannot paint itself into a corner.  Below structured.py."""
from __future__ import annotations

import json
import math
from typing import Any, Optional

from llamagen._schema import _pointer

# the largest finite set of item values checked as items are written (more: only repeats are)
MAX_DOMAIN = 1000
# the most (node, place) pairs visited to find the unique arrays
MAX_PLACES = 20000
_NO_PATH = None       # a node whose place in the output is not fixed
_INDEX = None         # a path segment: any array position


def _resolve(root: Any, node: Any) -> Any:
    for _ in range(64):
        if not isinstance(node, dict) or not isinstance(node.get("$ref"), str):
            return node
        node = _pointer(root, node["$ref"])
    return node


def _is_array_node(node: dict) -> bool:
    t = node.get("type")
    types = [t] if isinstance(t, str) else t if isinstance(t, list) else None
    return types is None or "array" in types


def _int_bound(node: dict, low: bool) -> Optional[int]:
    inc, exc = ("minimum", "exclusiveMinimum") if low else ("maximum", "exclusiveMaximum")
    best = None
    for key, strict in ((inc, False), (exc, True)):
        v = node.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        if low:
            b = math.floor(v) + 1 if strict else math.ceil(v)
            best = b if best is None else max(best, b)
        else:
            b = math.ceil(v) - 1 if strict else math.floor(v)
            best = b if best is None else min(best, b)
    return best


def _domain(root: Any, node: Any, depth: int = 0) -> Optional[list]:
    """The values an item can take when they are few and scalar (None: not known to be)."""
    node = _resolve(root, node)
    if not isinstance(node, dict) or depth > 16:
        return None
    if "const" in node:
        vals = [node["const"]]
    elif isinstance(node.get("enum"), list):
        vals = list(node["enum"])
    elif isinstance(node.get("anyOf") or node.get("oneOf"), list):
        vals = []
        for alt in node.get("anyOf") or node.get("oneOf"):
            d = _domain(root, alt, depth + 1)
            if d is None:
                return None
            vals += d
    else:
        t = node.get("type")
        types = [t] if isinstance(t, str) else t if isinstance(t, list) else []
        if not types:
            return None
        vals = []
        for ty in types:
            if ty == "boolean":
                vals += [True, False]
            elif ty == "null":
                vals.append(None)
            elif ty == "string" and node.get("maxLength") == 0:
                vals.append("")
            elif ty == "integer":
                lo, hi = _int_bound(node, True), _int_bound(node, False)
                m = node.get("multipleOf")
                step = m if isinstance(m, int) and not isinstance(m, bool) and m > 0 else 1
                if lo is None or hi is None or (hi - lo) // step > MAX_DOMAIN:
                    return None
                vals += [v for v in range(lo, hi + 1) if v % step == 0]
            else:
                return None
    if any(isinstance(v, (dict, list)) for v in vals):
        return None
    out = _union([], vals)
    return out if len(out) <= MAX_DOMAIN else None


def _union(a: list, b: list) -> list:
    # distinct as JSON values: true and 1 are two (Python's == would merge them)
    texts = {}
    for v in a + b:
        texts.setdefault(json.dumps(v, ensure_ascii=False), v)
    return list(texts.values())


_SCALARS = frozenset({"string", "number", "integer", "boolean", "null"})


def _scalar(root: Any, node: Any, depth: int = 0) -> bool:
    """Whether every value ``node`` admits is a string, number, boolean or null."""
    node = _resolve(root, node)
    if not isinstance(node, dict) or depth > 16:
        return False
    if "const" in node or isinstance(node.get("enum"), list):
        vals = [node["const"]] if "const" in node else node["enum"]
        return not any(isinstance(v, (dict, list)) for v in vals)
    alts = node.get("anyOf") or node.get("oneOf")
    if isinstance(alts, list) and alts:
        return all(_scalar(root, a, depth + 1) for a in alts)
    t = node.get("type")
    types = [t] if isinstance(t, str) else t if isinstance(t, list) else []
    return bool(types) and all(x in _SCALARS for x in types)


def _has_unique(schema: Any) -> bool:
    stack = [schema]
    seen = set()
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.get("uniqueItems") is True:
                return True
            stack.extend(v for k, v in n.items() if k not in ("const", "enum", "default", "examples"))
        elif isinstance(n, list):
            stack.extend(n)
    return False


def unique_spec(schema: Any) -> Optional[str]:
    """The sampler's spec (JSON text) for ``schema``'s unique arrays; None when it has none.
    ValueError (naming the keyword and its JSON pointer) for a unique array without a fixed path
    or with fewer distinct item values than its ``minItems``."""
    if not isinstance(schema, dict) or not _has_unique(schema):
        return None
    arrays: dict = {}
    stack = [(schema, (), "#", frozenset())]
    seen = set()
    while stack:
        node, path, ptr, refs = stack.pop()
        if not isinstance(node, dict):
            continue
        key = (id(node), path)
        if key in seen:
            continue
        seen.add(key)
        if len(seen) > MAX_PLACES:      # ($refs shared along many paths unfold exponentially)
            raise ValueError(f"json_schema uses uniqueItems, and placing its arrays takes more than "
                             f"{MAX_PLACES} steps through its $refs: simplify the schema")
        ref = node.get("$ref")
        if isinstance(ref, str):
            target = _pointer(schema, ref)
            # a $ref met again on its own path: a recursive structure, whose arrays have no
            # fixed path in the output
            stack.append((target, path if ref not in refs else _NO_PATH, f"{ptr}/$ref", refs | {ref}))
        if node.get("uniqueItems") is True and _is_array_node(node):
            if path is _NO_PATH:
                raise ValueError(
                    f"json_schema uses uniqueItems at {ptr} below additionalProperties, "
                    f"patternProperties or a recursive $ref: enforced only where the array's "
                    f"place in the output is fixed by property names and array positions")
            items = node.get("items")
            if not isinstance(items, dict) or not _scalar(schema, items):
                # an object item can be written up to where only a repeat can end it; a grammar
                # cannot be asked that in advance
                raise ValueError(
                    f"json_schema uses uniqueItems at {ptr} on items that are not all strings, "
                    f"numbers, booleans or null: enforced only for such items (give items a "
                    f"scalar type, enum or const)")
            dom = _domain(schema, items)
            lo = node.get("minItems")
            if dom is not None and isinstance(lo, int) and not isinstance(lo, bool) and lo > len(dom):
                raise ValueError(
                    f"json_schema uses uniqueItems at {ptr} with minItems {lo}, but its items can "
                    f"take only {len(dom)} distinct values: no output matches")
            if path in arrays:          # (several alternatives at one place: values from any)
                old = arrays[path]
                dom = None if old is None or dom is None else _union(old, dom)
            arrays[path] = dom
        props = node.get("properties")
        if isinstance(props, dict):
            for k, v in props.items():
                stack.append((v, _NO_PATH if path is _NO_PATH else path + (k,),
                              f"{ptr}/properties/{k}", refs))
        for k in ("additionalProperties", "patternProperties"):
            v = node.get(k)
            subs = v.values() if k == "patternProperties" and isinstance(v, dict) else [v]
            for s in subs:
                stack.append((s, _NO_PATH, f"{ptr}/{k}", refs))
        items = node.get("items")
        tup = node.get("prefixItems")
        for i, v in enumerate(([items] if isinstance(items, dict) else items if isinstance(items, list) else [])
                              + (tup if isinstance(tup, list) else [])):
            stack.append((v, _NO_PATH if path is _NO_PATH else path + (_INDEX,), f"{ptr}/items/{i}", refs))
        for k in ("anyOf", "oneOf", "allOf"):
            if isinstance(node.get(k), list):
                for i, v in enumerate(node[k]):
                    stack.append((v, path, f"{ptr}/{k}/{i}", refs))
    if not arrays:
        return None
    return json.dumps({"arrays": [{"path": list(p), "domain": d} for p, d in sorted(
        arrays.items(), key=lambda kv: json.dumps(kv[0]))]}, ensure_ascii=False)
