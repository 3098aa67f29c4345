"""Schema keywords llama.cpp's converter ignores, enforced (issue 29 section 4): number bounds
(inclusive and exclusive, any digits), integer multipleOf, string formats email / hostname / ipv4
/ uri.  The number-range grammar is checked against decimal arithmetic; generation with a real
model under a hypothesis-drawn family of constrained schemas always validates (or the schema is
refused with the keyword and its JSON pointer)."""
from __future__ import annotations

import ipaddress
import json
import random
import re
import urllib.parse
from decimal import Decimal

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llamagen
from llamagen._schema_lower import FORMAT_PATTERNS, _bounds, _number_range


def _gbnf_to_regex(g: str) -> str:
    """A GBNF expression without rule references as a Python regex."""
    out, i = [], 0
    while i < len(g):
        c = g[i]
        if c == '"':
            j = g.index('"', i + 1)
            out.append(re.escape(g[i + 1:j]))
            i = j + 1
        elif c == "[":
            j = g.index("]", i)
            out.append(g[i:j + 1])
            i = j + 1
        elif c in "(){},|?*+0123456789":
            out.append(c)
            i += 1
        elif c == " ":
            i += 1
        else:
            raise ValueError(f"unexpected {c!r} in {g[:80]}")
    return "".join(out)


def test_the_number_range_grammar_is_exactly_the_bounds():
    rng = random.Random(5)

    def rnd():
        return Decimal(rng.randint(-3000, 3000)) / Decimal(10 ** rng.choice([0, 1, 2, 3]))

    checked = 0
    for _ in range(200):
        node = {"type": "number"}
        for key in rng.sample(["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"],
                              rng.randint(1, 2)):
            node[key] = float(rnd()) if rng.random() < 0.5 else int(rnd())
        try:
            lo, hi = _bounds(node, "#")
        except ValueError:
            continue                # (contradictory bounds: refused)
        rx = re.compile(_gbnf_to_regex(_number_range(lo, hi)))
        for _ in range(200):
            x = rnd() + Decimal(rng.randint(0, 999)) / Decimal(10 ** rng.randint(1, 6))
            s = format(x, "f")
            s = s.rstrip("0").rstrip(".") if "." in s else s
            if re.fullmatch(r"-0(\.0*)?", s):
                continue
            v = float(s)
            valid = (v >= node.get("minimum", -1e300) and v <= node.get("maximum", 1e300)
                     and ("exclusiveMinimum" not in node or v > node["exclusiveMinimum"])
                     and ("exclusiveMaximum" not in node or v < node["exclusiveMaximum"]))
            assert (rx.fullmatch(s) is not None) == valid, (node, s)
            checked += 1
    assert checked > 20000


def _gbnf_matcher(expr: str, rules: str):
    """Whether a string matches ``expr`` under ``rules`` (the digit automata's shapes only:
    alternatives of a literal or class, then a rule, a group or nothing)."""
    table = {}
    for line in filter(str.strip, rules.split("\n")):
        name, body = line.split(" ::= ")
        table[name] = [a.strip() for a in body.split(" | ")]

    def top(x):
        out, depth, cur = [], 0, ""
        for ch in x:
            depth += (ch == "(") - (ch == ")")
            if ch == "|" and depth == 0:
                out.append(cur.strip())
                cur = ""
            else:
                cur += ch
        return out + [cur.strip()]

    def alt(a, s):
        if a == '""':
            return s == ""
        if a.startswith("("):
            return any(alt(b, s) for b in top(a[1:-1]))
        m = re.match(r'^("[^"]*"|\[[0-9]+\])\s*(.*)$', a)
        lit, rest = m.group(1), m.group(2).strip()
        if lit.startswith('"'):
            if not s.startswith(lit[1:-1]):
                return False
            s = s[len(lit) - 2:]
        elif not s or s[0] not in lit[1:-1]:
            return False
        else:
            s = s[1:]
        if not rest:
            return s == ""
        if rest[0] in '("[':
            return alt(rest, s)
        return any(alt(b, s) for b in table[rest])

    return lambda s: alt("(" + expr + ")", s)


def test_one_bound_multiples_are_exactly_the_multiples():
    from llamagen._schema_lower import _one_bound_multiples
    rng = random.Random(3)
    checked = 0
    for _ in range(120):
        m = rng.choice([1, 2, 3, 5, 7, 10, 12, 25, 97, 100])
        b = rng.choice([rng.randint(-500, 500), rng.randint(-10 ** 6, 10 ** 6), 0, 1, -1, 100])
        lo, hi = (b, None) if rng.random() < 0.5 else (None, b)
        accepts = _gbnf_matcher(*_one_bound_multiples(m, lo, hi, "t"))
        for n in list(range(b - 150, b + 150)) + [rng.randint(-10 ** 15, 10 ** 15) for _ in range(50)]:
            want = n % m == 0 and (lo is None or n >= lo) and (hi is None or n <= hi)
            assert accepts(str(n)) == want, (m, lo, hi, n)
            checked += 1
        assert not any(accepts(j) for j in ("-0", "007", "+5", "", "-", "1" * 17))
    assert checked > 40000


def test_refused_keywords_name_themselves_and_their_pointer():
    cases = [({"type": "number", "multipleOf": 0.01}, "multipleOf 0.01"),
             ({"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}},
              "uniqueItems at #/properties/tags"),
             ({"type": "integer", "multipleOf": 150, "minimum": 0}, "multipleOf 150 beside one bound"),
             ({"type": "number", "minimum": 5, "exclusiveMaximum": 5}, "no number lies"),
             ({"type": "string", "format": "ipv6"}, "format 'ipv6'")]
    for schema, words in cases:
        with pytest.raises(ValueError, match=re.escape(words)):
            llamagen.schema_to_grammar(schema)


def _valid(schema, value):
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(value)
    for name, sub in schema["properties"].items():       # formats jsonschema may not check here
        fmt = sub.get("format")
        v = value[name]
        if fmt == "ipv4":
            ipaddress.IPv4Address(v)
        elif fmt == "email":
            local, _, domain = v.partition("@")
            assert local and "." in domain, v
        elif fmt == "hostname":
            assert all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", p)
                       for p in v.split(".")), v
        elif fmt == "uri":
            u = urllib.parse.urlparse(v)
            assert u.scheme in ("http", "https") and u.netloc, v


_num = st.one_of(st.integers(-50, 50), st.floats(-50, 50, allow_nan=False).map(lambda x: round(x, 3)))


@st.composite
def _field(draw):
    kind = draw(st.sampled_from(["number", "integer", "multiple", "format"]))
    if kind == "format":
        return {"type": "string", "format": draw(st.sampled_from(sorted(FORMAT_PATTERNS)))}
    if kind == "multiple":
        m = draw(st.integers(2, 13))
        bounds = draw(st.sampled_from(["both", "none", "min", "max", "exclusiveMinimum"]))
        if bounds == "both":
            lo = draw(st.integers(-100, 100))
            return {"type": "integer", "multipleOf": m, "minimum": lo,
                    "maximum": lo + draw(st.integers(m, 400))}
        node = {"type": draw(st.sampled_from(["integer", "number"])), "multipleOf": m}
        if bounds == "min":
            node["minimum"] = draw(st.integers(-1000, 1000))
        elif bounds == "max":
            node["maximum"] = draw(st.integers(-1000, 1000))
        elif bounds == "exclusiveMinimum":
            node["exclusiveMinimum"] = draw(st.integers(-1000, 1000))
        return node
    node = {"type": kind}
    keys = draw(st.lists(st.sampled_from(["minimum", "maximum", "exclusiveMinimum",
                                          "exclusiveMaximum"]), min_size=1, max_size=2,
                         unique=True))
    for k in keys:
        node[k] = draw(_num)
    return node


@pytest.fixture(scope="module")
def smol_ctx(smollm2_model):
    with llamagen.Context(smollm2_model, n_ctx=1024) as ctx:
        yield ctx


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(fields=st.lists(_field(), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_generated_json_always_validates_under_constrained_schemas(smol_ctx, fields, seed):
    schema = {"type": "object", "properties": {f"f{i}": f for i, f in enumerate(fields)},
              "required": [f"f{i}" for i in range(len(fields))], "additionalProperties": False}
    try:
        llamagen.schema_to_grammar(schema)
    except ValueError as e:
        assert re.search(r"#/properties/f\d|at #", str(e)), e     # refused: names where
        return
    c = llamagen.generate(smol_ctx, "Fill in this record as JSON:\n", json_schema=schema,
                          max_new_tokens=300, temp=1.0, seed=seed, return_logprobs=True)
    if c.finish_reason == "length":
        return                      # (a string written on past the limit: not a whole document)
    _valid(schema, json.loads(c.text))


def test_pydantic_models_with_bounds_and_formats_validate(smol_ctx):
    """The pydantic shapes issue 29 names: Field(ge=0, le=1) on a float, gt, multiple_of on an
    int, an ipv4 / a URL-like string."""
    import pydantic

    class Reading(pydantic.BaseModel):
        confidence: float = pydantic.Field(ge=0, le=1)
        temperature: float = pydantic.Field(gt=-273.15, lt=100)
        count: int = pydantic.Field(multiple_of=5, ge=0, le=50)
        address: pydantic.IPvAnyAddress

    schema = Reading.model_json_schema()
    schema["properties"]["address"]["format"] = "ipv4"       # (pydantic writes ipvanyaddress)
    for seed in range(4):
        text = llamagen.generate(smol_ctx, "A sensor reading as JSON:\n", json_schema=schema,
                                 max_new_tokens=120, temp=1.0, seed=seed)
        Reading.model_validate_json(text)
