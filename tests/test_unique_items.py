"""``uniqueItems`` enforced while sampling (issue 29 section 4): a sampler wrapping the schema's
grammar rejects each token that would complete a repeated item, or leave only a repeat to write.
SmolLM2 is prompted to repeat itself; the same schema without ``uniqueItems`` shows that it does
(so the check is not vacuous), and with it every reply validates."""
from __future__ import annotations

import json
import os
import re
from typing import FrozenSet, Literal, Set

import jsonschema
import openai
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llamagen
from server_util import Server

PROMPT = ("Repeat after me: 0, 0, 0, 0, 2024-01-01, 2024-01-01, a, a, a, apple, apple, apple.\n"
          "JSON: ")


def _arr(items, lo, hi=None, **kw):
    return {"type": "array", "items": items, "uniqueItems": True, "minItems": lo,
            "maxItems": hi if hi is not None else lo, **kw}


SCHEMAS = {
    "integers": _arr({"type": "integer"}, 10),
    "range": _arr({"type": "integer", "minimum": 0, "maximum": 3}, 4),       # every value used
    "enum": _arr({"enum": ["a", "b", "c"]}, 3),
    "booleans": _arr({"type": "boolean"}, 2),
    "dates": _arr({"type": "string", "format": "date"}, 5),
    "one-char": _arr({"type": "string", "maxLength": 1}, 8),
    "numbers": _arr({"type": "number"}, 6),
    "nested": {"type": "object", "properties": {
        "rows": {"type": "array", "minItems": 2, "maxItems": 2, "items": {
            "type": "object", "properties": {"ids": _arr({"type": "integer", "minimum": 0,
                                                          "maximum": 5}, 3)},
            "required": ["ids"]}},
        "kind": {"anyOf": [_arr({"$ref": "#/$defs/k"}, 2), {"type": "null"}]}},
        "required": ["rows", "kind"], "$defs": {"k": {"enum": ["x", "y"]}}},
}


@pytest.fixture(scope="module")
def ctx(smollm2_model):
    with llamagen.Context(smollm2_model, n_ctx=1024) as c:
        yield c


def _strip_unique(node):
    if isinstance(node, dict):
        return {k: _strip_unique(v) for k, v in node.items() if k != "uniqueItems"}
    if isinstance(node, list):
        return [_strip_unique(v) for v in node]
    return node


def test_without_unique_items_the_model_repeats_itself(ctx):
    # what the tests below guard against: with the keyword dropped the model repeats items
    repeats = 0
    for name in ("integers", "enum", "dates", "one-char"):
        plain = _strip_unique(SCHEMAS[name])
        for seed in (0, 1):
            value = json.loads(llamagen.generate(ctx, PROMPT, json_schema=plain, temp=seed,
                                                 seed=seed, max_new_tokens=160))
            repeats += len(value) != len({json.dumps(v) for v in value})
    assert repeats >= 4


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_reply_validates(ctx, name):
    schema = SCHEMAS[name]
    for seed in range(4):
        c = llamagen.generate(ctx, PROMPT, json_schema=schema, temp=min(seed, 1), seed=seed,
                              max_new_tokens=200, return_logprobs=True)
        assert c.finish_reason == "stop", (name, seed, c.text)
        jsonschema.validate(json.loads(c.text), schema, format_checker=jsonschema.FormatChecker())


def test_stream_batch_and_generate_agree(ctx, smollm2_model):
    schema = SCHEMAS["integers"]
    p = llamagen.SamplingParams(json_schema=schema, temp=0.8, seed=3, max_new_tokens=120)
    text = llamagen.generate(ctx, PROMPT, params=p)
    assert "".join(llamagen.gen_begin(ctx, PROMPT, params=p)) == text
    with llamagen.Context(smollm2_model, n_ctx=2048, n_seq_max=2) as bctx:
        out = llamagen.generate_batch(bctx, [PROMPT, PROMPT], params=p)
    for t in out:
        jsonschema.validate(json.loads(t), schema)


def test_pydantic_sets_validate(ctx):
    class Tags(pydantic.BaseModel):
        words: Set[str] = pydantic.Field(min_length=4, max_length=4)
        grades: FrozenSet[Literal["a", "b", "c"]] = pydantic.Field(min_length=3)

    schema = Tags.model_json_schema()
    assert schema["properties"]["words"]["uniqueItems"] is True
    for seed in range(3):
        text = llamagen.generate(ctx, "Four fruits (apple, apple, pear, fig, fig) and the grades "
                                 "a, a, b, c as JSON: ", json_schema=schema, temp=0.7, seed=seed,
                                 max_new_tokens=200)
        raw = json.loads(text)                  # (pydantic would silently drop repeats)
        assert len(set(raw["words"])) == 4 and sorted(raw["grades"]) == ["a", "b", "c"]
        Tags.model_validate_json(text)


@pytest.mark.parametrize("schema, words", [
    (_arr({"type": "object"}, 1), "uniqueItems at # on items that are not all"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems at # on items"),
    ({"type": "object", "additionalProperties": _arr({"type": "integer"}, 1)},
     "uniqueItems at #/additionalProperties below additionalProperties"),
    ({"$ref": "#/$defs/n", "$defs": {"n": {"type": "object", "properties": {
        "ids": _arr({"type": "integer"}, 1), "next": {"$ref": "#/$defs/n"}}}}},
     "recursive $ref"),
    (_arr({"enum": [1, 2, 3]}, 4), "minItems 4, but its items can take only 3"),
    (_arr({"type": "boolean"}, 3), "only 2 distinct"),
])
def test_unenforceable_placements_are_refused(schema, words):
    with pytest.raises(llamagen.InvalidParamError, match=re.escape(words)) as e:
        llamagen.SamplingParams(json_schema=schema)
    assert e.value.field == "json_schema"


def test_tool_parameters_still_refuse_unique_items(smollm2_model):
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"t": _arr({"type": "string"}, 1)}}}}
    with pytest.raises(ValueError, match="uniqueItems") as e:
        llamagen.chat.prepare(smollm2_model, [{"role": "user", "content": "hi"}], tools=[tool])
    assert "tools[0]['function']['parameters']" in str(e.value)


def test_server_response_format_with_a_set(smollm2_path, tmp_path_factory):
    schema = {"type": "object", "properties": {"n": _arr({"type": "integer", "minimum": 0,
                                                          "maximum": 4}, 5)},
              "required": ["n"], "additionalProperties": False}
    srv = Server(["--model", smollm2_path, "--ctx-size", 1024, "--parallel", 1],
                 tmp_path_factory.mktemp("srv") / "unique.log")
    try:
        oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
        for seed in (1, 2):
            r = oai.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Write 0 five times."}],
                response_format=fmt, temperature=1, seed=seed, max_tokens=80)
            value = json.loads(r.choices[0].message.content)
            jsonschema.validate(value, schema)
            assert sorted(value["n"]) == [0, 1, 2, 3, 4]
        bad = dict(fmt, json_schema={"name": "n", "schema": _arr({"type": "object"}, 1)})
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                        response_format=bad, max_tokens=4)
        assert "uniqueItems" in str(e.value)
    finally:
        assert srv.stop() == 0, srv.log()


# a family of unique arrays of scalar items, inside an object: bounded and free integers,
# numbers, strings with lengths or a pattern or a format, enums mixing types, booleans, nullables
_items = st.one_of(
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-20, 20), st.integers(0, 12)),
    st.just({"type": "integer"}), st.just({"type": "number"}),
    st.builds(lambda a, b: {"type": "string", "minLength": a, "maxLength": a + b},
              st.integers(0, 2), st.integers(0, 3)),
    st.just({"type": "string", "pattern": "^[a-c]{1,2}$"}),
    st.just({"type": "string", "format": "date"}),
    st.lists(st.one_of(st.integers(-3, 3), st.sampled_from(["x", "yy", None, True, False, 1.5])),
             min_size=1, max_size=5, unique_by=lambda v: json.dumps(v)).map(lambda v: {"enum": v}),
    st.just({"type": "boolean"}), st.just({"type": ["integer", "null"], "minimum": 0, "maximum": 2}))
_family = st.lists(st.builds(lambda it, lo, span: {"type": "array", "items": it, "uniqueItems": True,
                                                   "minItems": lo, "maxItems": lo + span},
                             _items, st.integers(2, 7), st.integers(0, 3)),
                   min_size=1, max_size=3).map(lambda arrs: {
                       "type": "object", "properties": {f"a{i}": a for i, a in enumerate(arrs)},
                       "required": [f"a{i}" for i in range(len(arrs))], "additionalProperties": False})


@pytest.fixture(scope="module")
def tiny_ctx(tiny_model):
    with llamagen.Context(tiny_model, n_ctx=1024) as c:
        yield c


@settings(max_examples=int(os.environ.get("LLAMAGEN_UNIQUE_EXAMPLES", 60)), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(schema=_family, seed=st.integers(0, 2 ** 31))
def test_every_accepted_unique_schema_is_kept_by_a_random_model(tiny_ctx, schema, seed):
    # the tiny model's random weights wander through whatever the grammar allows: repeats,
    # long numbers, exponents, escapes; the reply validates or the schema was refused, and no
    # reply runs into a state where no token is left (a GrammarError)
    try:
        params = llamagen.SamplingParams(json_schema=schema, temp=1.5, seed=seed,
                                         max_new_tokens=300)
    except llamagen.InvalidParamError as e:
        assert "minItems" in str(e), e          # (only: more items than distinct values)
        return
    c = llamagen.generate(tiny_ctx, "{", params=params, return_logprobs=True)
    if c.finish_reason == "stop":
        jsonschema.validate(json.loads(c.text), schema, format_checker=jsonschema.FormatChecker())
