"""JSON schemas as llama.cpp's converter walks them: their subschemas, local $refs, how deep
they nest and what converting them costs.  Below _core (which checks tool parameter schemas with it) and structured.py."""
from __future__ import annotations

from typing import Any, Iterator, Tuple

__all__ = ["MAX_SCHEMA_DEPTH", "MAX_OPTIONAL_PROPERTIES", "MAX_OPTIONAL_COST", "MAX_SCHEMA_NODES",
           "check_limits", "subschemas"]

# keywords whose values are schemas / lists of schemas / maps of schemas
_ONE = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames",
        "unevaluatedProperties", "unevaluatedItems")
_MANY = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_MAP = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")


# How deep llama.cpp's converter may recurse, counting the levels it follows through $refs: it
# expands a $ref's target in place, so a chain of 5,000 $refs to objects holding the next one (JSON
# depth 6, 10,000 levels) overflowed its 8 MiB stack (SIGSEGV, issue 26); 1,000 of them (2,000
# levels) converted.  Real schemas stay far below.
MAX_SCHEMA_DEPTH = 1000

# Optional properties of one object: the converter writes a rule for each property listing the
# ones that may follow it, and builds those strings by repeated concatenation: cubic.  300 took
# 0.10 s, 500 0.24 s, 1,000 1.5 s, 3,000 about 40 s, a few MB of them tens of GB (issue 26).
MAX_OPTIONAL_PROPERTIES = 256
# ... and over the whole schema: the sum of the cubes of each object's optional properties (50
# objects at the limit took 2.7 s, 30 of them 1.3-1.8 s)
MAX_OPTIONAL_COST = 32 * MAX_OPTIONAL_PROPERTIES ** 3
# Subschemas (each visited once, $ref targets once): conversion is about linear in them, 10,000
# properties in 0.23 s; a 16 MiB body of them, extrapolated, about 10 s
MAX_SCHEMA_NODES = 50_000


def _pointer(root: Any, ref: str) -> Any:
    """The node a local $ref ("#/a/b") names in ``root``, or None."""
    node = root
    for part in ref[2:].split("/") if ref.startswith("#/") else ():
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node if ref.startswith("#") else None


def _children(root: Any, node: dict, path: str) -> list:
    """The subschemas of ``node`` and the target of its local $ref, with their paths."""
    out = list(subschemas(node, path))
    ref = node.get("$ref")
    if isinstance(ref, str):
        target = _pointer(root, ref)
        if isinstance(target, dict):
            out.append((target, f"{path}/$ref"))
    return out


def _short(path: str) -> str:
    return path if len(path) <= 120 else f"{path[:56]}...{path[-56:]}"


def check_limits(schema: Any, where: str = "json_schema") -> None:
    """ValueError when ``schema`` nests deeper than MAX_SCHEMA_DEPTH levels, following local
    $refs (a $ref already being followed is not followed again: the converter makes it a rule),
    or costs the converter more than its budget: an object with more than MAX_OPTIONAL_PROPERTIES
    optional properties, more than MAX_OPTIONAL_COST over all objects, more than MAX_SCHEMA_NODES
    subschemas.  Iterative, each node once: a deep schema cannot overflow Python's stack here
    either."""
    below: dict = {}          # id(node) -> levels from it down, itself included
    on_path: set = set()
    stack = [(schema, "#", 1, None)]       # children: None until the node's subtree is pushed
    nodes = cost = 0
    while stack:
        node, path, level, children = stack.pop()
        if not isinstance(node, dict):
            continue
        key = id(node)
        if children is not None:            # its subtree is done
            on_path.discard(key)
            d = 1 + max((below.get(id(c), 0) for c, _ in children), default=0)
            below[key] = d
            if level - 1 + d > MAX_SCHEMA_DEPTH:
                raise ValueError(_too_deep(where, path))
            continue
        if key in below:                    # met before, from elsewhere: as deep from here?
            if level - 1 + below[key] > MAX_SCHEMA_DEPTH:
                raise ValueError(_too_deep(where, path))
            continue
        if key in on_path:
            continue
        if level > MAX_SCHEMA_DEPTH:        # the descent stops here: paths stay short
            raise ValueError(_too_deep(where, path))
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise ValueError(f"{where} has more than {MAX_SCHEMA_NODES:,} subschemas (llama.cpp's "
                             "converter and the grammar it makes grow with them)")
        cost += _optional(node, where, path) ** 3
        if cost > MAX_OPTIONAL_COST:
            raise ValueError(
                f"{where} has too many optional properties over its objects (the sum of their "
                f"cubes passes {MAX_OPTIONAL_COST:,} at {_short(path)}; llama.cpp's converter "
                "takes time cubic in them): list them in 'required'")
        on_path.add(key)
        children = _children(schema, node, path)
        stack.append((node, path, level, children))
        for c, p in children:
            if isinstance(c, dict) and id(c) not in on_path:
                stack.append((c, p, level + 1, None))


def _optional(node: dict, where: str, path: str) -> int:
    """How many optional properties ``node`` has (ValueError past MAX_OPTIONAL_PROPERTIES)."""
    props = node.get("properties")
    if not isinstance(props, dict):
        return 0
    required = node.get("required")
    required = set(required) if isinstance(required, list) and \
        all(isinstance(r, str) for r in required) else set()
    n = sum(1 for k in props if k not in required)
    if n > MAX_OPTIONAL_PROPERTIES:
        raise ValueError(
            f"{where} has an object with {n:,} optional properties at {_short(path)} (the limit "
            f"is {MAX_OPTIONAL_PROPERTIES}: llama.cpp's converter takes time cubic in them); list "
            "them in 'required' or split the object")
    return n


def _too_deep(where: str, path: str) -> str:
    return (f"{where} nests more than {MAX_SCHEMA_DEPTH} levels deep, counting the levels its "
            f"$refs lead through (at {_short(path)})")


def subschemas(node: dict, path: str) -> Iterator[Tuple[Any, str]]:
    for k in _ONE:
        v = node.get(k)
        if isinstance(v, dict):
            yield v, f"{path}/{k}"
    for k in _MANY:
        v = node.get(k)
        if isinstance(v, list):
            for i, s in enumerate(v):
                yield s, f"{path}/{k}/{i}"
    for k in _MAP:
        v = node.get(k)
        if isinstance(v, dict):
            for name, s in v.items():
                yield s, f"{path}/{k}/{name}"
