"""Structured output: JSON schemas through llama.cpp's converter, on the real models."""
from __future__ import annotations

import json

import jsonschema
import pytest

import llamagen
from llamagen import structured


pytestmark = pytest.mark.real_model

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]},
                     "maxItems": 3},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    },
    "records": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"},
                           "kind": {"enum": ["x", "y", None]}},
            "required": ["id", "ok", "kind"],
            "additionalProperties": False,
        },
        "minItems": 1, "maxItems": 4,
    },
    "nested": {
        "type": "object",
        "properties": {
            "point": {"type": "object",
                      "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                      "required": ["x", "y"], "additionalProperties": False},
            "labels": {"type": "array", "maxItems": 2,
                       "items": {"type": "array", "maxItems": 3,
                                 "items": {"type": "integer", "minimum": -5, "maximum": 5}}},
            "when": {"type": "string", "format": "date"},
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        },
        "required": ["point", "labels", "when", "code"],
        "additionalProperties": False,
    },
    "ref_anyof": {
        "anyOf": [{"type": "integer"},
                  {"type": "object", "properties": {"v": {"$ref": "#/$defs/v"}},
                   "required": ["v"], "additionalProperties": False}],
        "$defs": {"v": {"type": "string", "maxLength": 8}},
    },
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_output_validates(real_model, name, seed):
    schema = SCHEMAS[name]
    with llamagen.Context(real_model, n_ctx=1024) as ctx:
        c = llamagen.generate(ctx, "Output JSON:\n", max_new_tokens=400, temp=0.8, seed=seed,
                              json_schema=schema, return_logprobs=True)
    assert c.finish_reason == "stop", c.text
    jsonschema.validate(json.loads(c.text), schema)


def test_instruct_model_fills_the_schema(real_model, smollm2_path):
    # a chat model (SmolLM2, chatml) asked through its template: the grammar keeps it valid
    schema = SCHEMAS["person"]
    m = llamagen.Model(smollm2_path)
    try:
        prompt = m.render_chat([{"role": "user", "content": "Describe a person called Ada as JSON."}])
        with llamagen.Context(m, n_ctx=1024, n_seq_max=2, kv_unified=True) as ctx:
            for out in llamagen.generate(ctx, prompt, n=2, max_new_tokens=200, temp=0.7, seed=4,
                                         json_schema=json.dumps(schema)):
                jsonschema.validate(json.loads(out), schema)
    finally:
        m.close()


def test_json_object_is_any_object(real_ctx):
    # (a base model left to itself may write keys until max_new_tokens: a few-shot prompt ends)
    prompt = 'Example 1: {"name": "Bob", "age": 3}\nExample 2: {"name": "Eve", "age": 41}\nExample 3:'
    for seed in (1, 2, 3):
        c = llamagen.generate(real_ctx, prompt, max_new_tokens=200, seed=seed, json_object=True,
                              temp=0.5, return_logprobs=True)
        assert c.finish_reason == "stop"
        assert isinstance(json.loads(c.text), dict)


def test_stream_equals_generate_under_a_schema(real_ctx):
    kw = dict(max_new_tokens=120, seed=7, json_schema=SCHEMAS["records"])
    st = llamagen.gen_begin(real_ctx, "Data:", **kw)
    text = "".join(st) + st.end()
    assert text == llamagen.generate(real_ctx, "Data:", **kw)


def test_engine_and_batch_take_schemas(real_model):
    schema = SCHEMAS["records"]
    with llamagen.AsyncEngine(real_model, n_ctx=2048, n_parallel=2) as eng:
        r = eng.generate_sync("Rows:", n=2, max_new_tokens=300, seed=3, json_schema=schema)
        for ch in r.choices:
            jsonschema.validate(json.loads(ch.text), schema)
    with llamagen.Context(real_model, n_ctx=2048, n_seq_max=2, kv_unified=True) as ctx:
        for res in llamagen.map_generate(ctx, [{"prompt": "A:", "json_schema": schema},
                                               # (a prompt whose greedy object ends: on
                                               # "B:" gemma3 repeats keys to the limit)
                                               {"prompt": "JSON:", "json_object": True}],
                                         max_new_tokens=300):
            assert res.ok and res.finish_reason == "stop"
            json.loads(res.text)


def test_params_keep_the_schema_and_its_grammar():
    p = llamagen.SamplingParams(json_schema=SCHEMAS["person"])
    assert json.loads(p.json_schema) == SCHEMAS["person"]            # kept as JSON text
    assert p.gbnf == llamagen.schema_to_grammar(SCHEMAS["person"]) and p.grammar is None
    assert "root ::=" in p.gbnf
    assert p == llamagen.SamplingParams(json_schema=json.dumps(SCHEMAS["person"]))
    assert hash(p) == hash(p.replace())
    q = p.replace(json_schema=None, json_object=True)
    assert q.gbnf != p.gbnf and q.json_schema is None
    assert llamagen.SamplingParams().gbnf is None


@pytest.mark.parametrize("schema, match", [
    ({"type": "object", "not": {"required": ["a"]}}, "not at #"),
    ({"type": "number", "multipleOf": 0.5}, "multipleOf 0.5"),
    ({"type": "array", "items": {"type": "object"}, "uniqueItems": True}, "uniqueItems at # on items"),
    ({"type": "object", "properties": {"e": {"type": "string", "format": "ipv6"}}},
     "format 'ipv6' at #/properties/e"),
    ({"type": "object", "patternProperties": {"^a": {"type": "integer"}}}, "patternProperties"),
    ({"type": "integer", "multipleOf": 300, "maximum": 9}, "multipleOf 300 beside one bound"),
    ({"if": {"type": "string"}, "then": {"maxLength": 3}}, "if, then"),
    ({"type": "string", "pattern": "abc"}, "not anchored"),
    ({"type": "string", "pattern": "^(?=a)b$"}, "pattern"),
    ({"type": "foo"}, "unrecognized type foo"),
    ({"$ref": "https://example.com/schema.json"}, "ref"),
    ({"$ref": "#/$defs/missing"}, "missing"),
    ({"type": "array", "minItems": -1}, "minItems"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('"string"', "JSON object"),
])
def test_unsupported_or_invalid_schemas_raise(schema, match):
    with pytest.raises(ValueError, match=match):
        llamagen.SamplingParams(json_schema=schema)


def test_schema_argument_errors():
    with pytest.raises(TypeError, match="json_schema must be a dict or a JSON string"):
        llamagen.SamplingParams(json_schema=3)
    with pytest.raises(ValueError, match="exclusive"):
        llamagen.SamplingParams(json_schema={"type": "object"}, json_object=True)
    with pytest.raises(ValueError, match="exclusive"):
        llamagen.SamplingParams(json_schema={"type": "object"}, grammar='root ::= "a"')
    with pytest.raises(ValueError, match="grammar_root"):
        llamagen.SamplingParams(json_object=True, grammar_root="other")
    with pytest.raises(ValueError, match="backend"):
        llamagen.SamplingParams(json_object=True, sampler_impl="backend")
    with pytest.raises(TypeError, match="json_object"):
        llamagen.SamplingParams(json_object="yes")
    with pytest.raises(ValueError, match="JSON-serializable|not valid"):
        llamagen.SamplingParams(json_schema={"type": "object", "default": float("nan")})


def test_converter_warnings_do_not_leak_to_stderr(capfd):
    with pytest.raises(ValueError):
        structured.schema_to_grammar({"type": "string", "pattern": "no-anchors"})
    assert "WARNING" not in capfd.readouterr().err
