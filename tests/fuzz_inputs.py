"""Fuzzers for the inputs llama.cpp's C++ recurses on or grows with (issue 26), run as a script in
its own process by tests/test_fuzz_inputs.py: a crash, a hang or a runaway allocation is then a
failed test with the failing input printed, not a dead test run.

    python tests/fuzz_inputs.py MODEL TARGET SECONDS [MAX_EXAMPLES]

Targets: schemas (deep, wide and $ref-heavy JSON schemas through the converter and the grammar
check), messages (tool calls and arguments nested deep, rendered with a tool template), triggers
(grammar trigger patterns), templates (Jinja source with deep nesting, long loops, big strings),
output (model output through the chat parser: ChatPrompt.parse, reply and ToolStream).  Each
example must end in a result or a ValueError / TypeError within EXAMPLE_SECONDS; the script prints
``TARGET examples=N refused=R seconds=S`` and exits 0.
"""
from __future__ import annotations

import json
import resource
import string
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llamagen
from llamagen import GrammarError, SamplingParams
from llamagen._core import _check_grammar
from llamagen.sampling import resolve

EXAMPLE_SECONDS = 30.0      # the budgets keep every case to a few seconds; a hang fails here
ROOT = Path(__file__).resolve().parent.parent
TOOL_TEMPLATE = (ROOT / "examples" / "chatml-tools.jinja").read_text()

# -- strategies ----------------------------------------------------------------------------------

_names = st.text(string.ascii_lowercase, min_size=1, max_size=6)
_leaf_schema = st.one_of(
    st.sampled_from([{"type": t} for t in ("string", "integer", "number", "boolean", "null")]),
    st.builds(lambda vs: {"enum": vs}, st.lists(st.text(max_size=5), min_size=1, max_size=20)),
    st.builds(lambda v: {"const": v}, st.integers(-5, 5)),
    st.builds(lambda a, b: {"type": "string", "minLength": min(a, b), "maxLength": max(a, b)},
              st.integers(0, 3000), st.integers(0, 3000)),
    st.builds(lambda a, b: {"type": "array", "items": {"type": "integer"}, "minItems": min(a, b),
                            "maxItems": max(a, b)}, st.integers(0, 3000), st.integers(0, 3000)),
    st.builds(lambda p: {"type": "string", "pattern": p},
              st.text("ab()[]|*+?{},0123456789^$.\\", max_size=40)),
)


def _extend(children):
    return st.one_of(
        st.builds(lambda props, req: {"type": "object", "properties": props,
                                      "required": [k for k in props if req]},
                  st.dictionaries(_names, children, max_size=12), st.booleans()),
        st.builds(lambda c: {"type": "array", "items": c}, children),
        st.builds(lambda cs: {"anyOf": cs}, st.lists(children, min_size=1, max_size=6)),
        st.builds(lambda cs: {"allOf": cs}, st.lists(children, min_size=1, max_size=3)),
    )


_tree_schema = st.recursive(_leaf_schema, _extend, max_leaves=60)


@st.composite
def _schemas(draw):
    """Trees, and the shapes the budgets exist for: a deep nest, a $ref chain, a $ref graph that
    fans out, a wide object, a long enum."""
    kind = draw(st.sampled_from(["tree", "deep", "refchain", "refgraph", "wide", "enum"]))
    if kind == "tree":
        return draw(_tree_schema)
    n = draw(st.integers(1, 3000))
    if kind == "deep":
        s = draw(_leaf_schema)
        wrap = draw(st.sampled_from(["array", "object", "anyOf"]))
        for _ in range(n):
            s = {"type": "array", "items": s} if wrap == "array" else \
                {"type": "object", "properties": {"a": s}} if wrap == "object" else {"anyOf": [s]}
        return s
    if kind in ("refchain", "refgraph"):
        fan = 1 if kind == "refchain" else draw(st.integers(2, 4))
        defs = {f"d{i}": {"type": "object", "properties": {
            f"p{j}": {"$ref": f"#/$defs/d{i + 1}"} for j in range(fan)}} for i in range(n)}
        defs[f"d{n}"] = draw(_leaf_schema)
        return {"$ref": "#/$defs/d0", "$defs": defs}
    if kind == "wide":
        props = {f"p{i}": {"type": "string"} for i in range(n)}
        req = draw(st.sampled_from(["none", "all", "half"]))
        out = {"type": "object", "properties": props}
        if req != "none":
            out["required"] = [k for i, k in enumerate(props) if req == "all" or i % 2]
        return out
    return {"enum": [f"v{i}" for i in range(n * 3)]}


def _nested_json(depth: int, leaf="x") -> str:
    return '{"a": ' * depth + json.dumps(leaf) + "}" * depth


_json_text = st.one_of(
    st.builds(_nested_json, st.integers(0, 3000)),
    st.builds(lambda d: "[" * d + "1" + "]" * d, st.integers(0, 3000)),
    st.builds(lambda d: "[" * d, st.integers(0, 3000)),          # unbalanced
    st.text(max_size=200),
)

_template_piece = st.sampled_from([
    "{{ x }}", "{% if true %}", "{% endif %}", "{% for i in range(N) %}", "{% endfor %}",
    "{{ (", ") }}", "{{ 'ab' * N }}", "{{ messages|tojson }}", "{{ messages[0].content|upper }}",
    "{% set ns = namespace(s='ab') %}", "{% set ns.s = ns.s ~ ns.s %}", "{{ ns.s|length }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}", "{{ f(1) }}", "{{ 1", "+1", " }}", "|upper",
    "{{ range(N)|list|length }}", "{{ 'x'|indent(N) }}", "{% for m in messages %}{{ m.content }}",
    "{{ 'a'.replace('a', 'aa') }}", "text",
])


@st.composite
def _templates(draw):
    pieces = draw(st.lists(_template_piece, max_size=40))
    reps = draw(st.integers(1, 500))
    n = draw(st.sampled_from(["10", "1000", "100000", "1000000000"]))
    src = "".join(p.replace("N", n) for p in pieces)
    if draw(st.booleans()):      # the same few pieces, very many times: deep or long
        src = src * reps
    return src


_regex = st.text("ab()[]{}|*+?\\.^$0123456789,-", max_size=5000)

_output = st.one_of(
    st.builds(lambda d: "<tool_call>\n" + _nested_json(d) + "\n</tool_call>", st.integers(0, 3000)),
    st.builds(lambda a: '<tool_call>\n{"name": "get_weather", "arguments": ' + a + "}\n</tool_call>",
              _json_text),
    st.builds(lambda n: "<tool_call>" * n, st.integers(0, 2000)),
    st.text(max_size=500),
)

# -- targets -------------------------------------------------------------------------------------


def _target(model):
    def schemas(schema):
        try:
            p = resolve(SamplingParams(json_schema=schema), (), {})
            _check_grammar(model, p)
        except (ValueError, TypeError, GrammarError):
            return False
        return True

    def messages(args, depth):
        calls = [{"type": "function", "id": "c1",
                  "function": {"name": "get_weather", "arguments": args}}]
        msgs = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "c1", "content": _nested_json(depth)},
                {"role": "user", "content": "and?"}]
        try:
            llamagen.tools.prepare(model, msgs, tools=[WEATHER], template=TOOL_TEMPLATE)
        except (ValueError, TypeError):
            return False
        return True

    def triggers(rx):
        try:
            p = resolve(SamplingParams(grammar='root ::= "a"', grammar_lazy=True,
                                       grammar_triggers=(rx,)), (), {})
            _check_grammar(model, p)
        except (ValueError, TypeError, GrammarError):
            return False
        return True

    def templates(src):
        try:
            model.render_chat([{"role": "user", "content": "hi"}], template=src)
        except (ValueError, TypeError):
            return False
        return True

    chat = llamagen.tools.prepare(model, [{"role": "user", "content": "hi"}], tools=[WEATHER],
                                  template=TOOL_TEMPLATE)

    def output(text):
        refused = False
        try:
            chat.parse(text)
        except ValueError:
            refused = True
        chat.reply(text, "stop")
        ts = llamagen.tools.ToolStream(chat)
        for i in range(0, len(text), 97):
            ts.feed(text[i:i + 97])
        ts.finish("stop")
        return not refused

    return {"schemas": (schemas, (_schemas(),)),
            "messages": (messages, (_json_text, st.integers(0, 200))),
            "triggers": (triggers, (_regex,)),
            "templates": (templates, (_templates(),)),
            "output": (output, (_output,))}


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def main(argv):
    model_path, target, seconds = argv[1], argv[2], float(argv[3])
    max_examples = int(argv[4]) if len(argv) > 4 else 10**9
    # a runaway allocation becomes MemoryError / bad_alloc here instead of the OOM killer
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    model = llamagen.Model(model_path)
    fn, strategies = _target(model)[target]
    counts = {"examples": 0, "refused": 0}
    start = time.monotonic()

    # in rounds of fresh random examples until the time or the count is spent
    @settings(max_examples=min(50, max_examples), deadline=None, database=None,
              derandomize=False, suppress_health_check=list(HealthCheck))
    @given(st.tuples(*strategies))
    def run(args):
        if time.monotonic() - start > seconds or counts["examples"] >= max_examples:
            return
        t0 = time.monotonic()
        ok = fn(*args)
        took = time.monotonic() - t0
        assert took < EXAMPLE_SECONDS, (f"{target}: one example took {took:.1f} s",
                                        repr(args)[:2000])
        counts["examples"] += 1
        counts["refused"] += not ok
    while time.monotonic() - start < seconds and counts["examples"] < max_examples:
        run()
    print(f"{target} examples={counts['examples']} refused={counts['refused']} "
          f"seconds={time.monotonic() - start:.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
