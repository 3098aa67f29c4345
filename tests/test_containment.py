"""Issue 26: no request can crash, freeze or wedge the engine.  Classes fixed so far:

* engine livelock under KV pressure: prompts that could not all fit in a unified cache each took
  part of it and waited forever for the rest (the engine thread spun thousands of empty steps a
  second); a prompt now starts only when its rest fits beside what live sequences hold;
* SIGSEGV at interpreter exit with an AsyncEngine left open: its thread went on decoding while
  C++ static destructors tore ggml down; open engines are closed at exit;
* unbounded recursion in llama.cpp's C++ (SIGSEGV): JSON schemas whose $refs chain deep (flat
  JSON), tool-call arguments strings and model output nesting brackets deeply, grammar trigger
  regexes std::regex compiles recursively, chat-template macros that call themselves.
"""
from __future__ import annotations

import json
import textwrap
import threading
import time

import pytest

import llamagen
from llamagen import BatchGenerator, Context, SamplingParams
from llamagen.engine import AsyncEngine

from script_util import run_script


# the refusal cases run in a fresh interpreter: a regression is then a failed test, not a crash
_PRELUDE = '''
def refuses(call, message):
    try:
        call()
    except ValueError as e:
        assert message in str(e), e
    else:
        raise AssertionError("accepted, expected: " + message)
'''


def _contained(body, **names):
    rc, out = run_script(_PRELUDE + textwrap.dedent(body) + "print('contained')\n", timeout=120,
                         **names)
    assert rc == 0 and "contained" in out, (rc, out[-2000:])


def _long_prompts(n, length=450):
    # distinct, so no prefix is shared: each needs its own cells
    return [[3 + ((i * 7 + j) % 250) for j in range(length)] for i in range(n)]


def test_engine_completes_prompts_that_cannot_all_fit_at_once(tiny_model_path):
    # --ctx-size 512 --parallel 4 and four ~450-token prompts: before, one finished (cut after one
    # token) and the others never did (150,000 empty steps in 30 s)
    with AsyncEngine(str(tiny_model_path), n_ctx=512, n_parallel=4) as e:
        out = {}

        def ask(i, tokens):
            r = e.generate_sync(tokens, max_new_tokens=16, temp=0, ignore_eos=True)
            out[i] = len(r.tokens)

        threads = [threading.Thread(target=ask, args=(i, p), daemon=True)
                   for i, p in enumerate(_long_prompts(4))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert out == {0: 16, 1: 16, 2: 16, 3: 16}
        assert e.stats().n_steps < 500, e.stats()
        assert e.stats().n_stalled_steps == 0
        # and a small request after them still completes
        assert len(e.generate_sync("hello", max_new_tokens=4, temp=0, ignore_eos=True).tokens) == 4


def test_batch_generator_waits_for_room_instead_of_starting_every_prompt(tiny_model):
    with Context(tiny_model, n_ctx=512, n_seq_max=4, kv_unified=True, n_threads=1) as ctx:
        b = BatchGenerator(ctx, n_parallel=4)
        sids = [b.add(p, max_new_tokens=16, temp=0, ignore_eos=True) for p in _long_prompts(4)]
        steps = 0
        while any(b.finish_reason(s) is None for s in sids):
            b.step()
            steps += 1
            assert steps < 500, "the batch made no progress"
        assert [len(b.tokens(s)) for s in sids] == [16] * 4
        assert b.n_stalled_steps == 0
        assert {b.finish_reason(s) for s in sids} == {"length"}


def test_an_engine_left_open_at_exit_does_not_crash_the_process(real_model_path):
    # the exception comes while the engine thread's warm-up decode runs: 4 of 5 runs ended in
    # SIGSEGV before (the tiny model: 1 of 5)
    for _ in range(3):
        rc, out = run_script("""
            from llamagen.engine import AsyncEngine
            e = AsyncEngine(MODEL, n_ctx=2048, n_parallel=2)
            raise RuntimeError("boom")
            """, MODEL=str(real_model_path), timeout=120)
        assert rc == 1 and "RuntimeError: boom" in out, (rc, out[-2000:])


# -- schemas whose $refs chain deeper than llama.cpp's converter can recurse ----------------------

def _ref_chain(n, wrap=True):
    """$defs d0 -> d1 -> ... -> dn: flat JSON (depth 6), but the converter expands each $ref in
    place, two levels per hop when each link is an object holding the next."""
    defs = {f"d{i}": ({"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}}
                      if wrap else {"$ref": f"#/$defs/d{i + 1}"}) for i in range(n)}
    defs[f"d{n}"] = {"type": "string"}
    return {"type": "object", "$defs": defs, "properties": {"a": {"$ref": "#/$defs/d0"}}}


def test_a_long_ref_chain_is_refused_before_the_converter():
    # before: a chain of 5,000 object links (20,000 plain aliases) was a SIGSEGV in the converter
    _contained("""
        import json
        from llamagen.structured import schema_to_grammar
        from llamagen.sampling import SamplingParams
        assert schema_to_grammar(json.loads(SHORT))      # 400 links convert
        for bad in (json.loads(CHAIN), json.loads(ALIASES)):
            refuses(lambda: schema_to_grammar(bad), "nests more than 1000 levels deep")
            refuses(lambda: SamplingParams(json_schema=bad), "nests more than 1000 levels deep")
        """, CHAIN=json.dumps(_ref_chain(5000)), ALIASES=json.dumps(_ref_chain(20000, wrap=False)),
               SHORT=json.dumps(_ref_chain(400)))


def test_a_long_ref_chain_in_tool_parameters_is_refused(smollm2_path, tmp_path):
    from pathlib import Path

    import openai

    from server_util import Server

    template = Path(__file__).resolve().parents[1] / "examples" / "chatml-tools.jinja"
    tools = [{"type": "function", "function": {"name": "f", "parameters": _ref_chain(5000)}}]
    _contained("""
        from llamagen import tools as T
        m = llamagen.Model(MODEL)
        refuses(lambda: T.prepare(m, [{"role": "user", "content": "hi"}], tools=TOOLS,
                                  tool_choice="required", template=open(TEMPLATE).read()),
                "tools[0]['function']['parameters'] nests more than 1000 levels deep")
        """, MODEL=str(smollm2_path), TOOLS=tools, TEMPLATE=str(template))
    srv = Server(["--model", smollm2_path, "--chat-template-file", str(template)],
                 tmp_path / "serve.log")
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
        try:
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                      tools=tools, max_tokens=4)
        except openai.BadRequestError as e:
            assert "nests more than 1000 levels deep" in str(e)
        else:
            raise AssertionError("accepted")
        assert c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices[0].message is not None
    finally:
        assert srv.stop() == 0, srv.log()


# -- JSON nested deeper than llama.cpp's chat parser and template runtime can recurse -------------

def test_deeply_nested_json_in_chat_data_and_model_output(smollm2_path):
    # before: a reply nesting 10,000 brackets crashed parse, reply and ToolStream (SIGSEGV; 3,000
    # parsed), and so did an assistant message's arguments string nesting 100,000
    from pathlib import Path
    template = Path(__file__).resolve().parents[1] / "examples" / "chatml-tools.jinja"
    _contained("""
        from llamagen import tools as T
        m = llamagen.Model(MODEL)
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        chat = T.prepare(m, [{"role": "user", "content": "hi"}], tools=tools,
                         template=open(TEMPLATE).read())
        deep = "[" * 10000 + "]" * 10000
        text = '<tool_call>\\n{"name": "f", "arguments": {"a": ' + deep + '}}\\n</tool_call>'
        refuses(lambda: chat.parse(text), "nests JSON more than 512 levels deep")
        assert chat.reply(text) == {"role": "assistant", "content": text}     # as text
        msg, why = chat.reply_and_error(text)                                 # and why
        assert msg == {"role": "assistant", "content": text} and "512 levels" in why, why
        assert chat.reply_and_error('<tool_call>\\n{"name": "f", "arguments": {}}\\n</tool_call>')[1] is None
        s = T.ToolStream(chat)
        for i in range(0, len(text), 997):
            s.feed(text[i:i + 997])
        s.finish("stop")
        assert s.message == {"role": "assistant", "content": text}
        assert "512 levels" in s.parse_error
        # a shallow call still parses
        ok = chat.parse('<tool_call>\\n{"name": "f", "arguments": {"a": [[1]]}}\\n</tool_call>')
        assert ok["tool_calls"][0]["function"]["name"] == "f"
        msgs = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                 "function": {"name": "f", "arguments": "[" * 100000 + "]" * 100000}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
        refuses(lambda: T.prepare(m, msgs, tools=tools, template=open(TEMPLATE).read()),
                "['arguments'] is JSON nested more than 64 levels deep")
        """, MODEL=str(smollm2_path), TEMPLATE=str(template))


def test_grammar_triggers_std_regex_would_recurse_through_are_refused(tiny_model):
    # before: a 100,000-character trigger (letters alone) or 100,000 nested groups was a SIGSEGV
    # when llama.cpp compiled it with std::regex
    import pytest
    from llamagen import SamplingParams
    lazy = dict(grammar='root ::= "a"+', grammar_lazy=True)
    with pytest.raises(ValueError, match=r"grammar_triggers\[1\] is 100000 characters long: at most 4096"):
        SamplingParams(grammar_triggers=("x", "a" * 100000), **lazy)
    with pytest.raises(ValueError, match=r"nests groups more than 256 deep"):
        SamplingParams(grammar_triggers=("(" * 300 + "a" + ")" * 300,), **lazy)
    # escaped and bracketed parentheses are not groups; 256 groups and 4,096 characters compile
    ok = [r"\(" * 1000, "[(]" * 1000, "(" * 256 + "a" + ")" * 256, "a" * 4096]
    with Context(tiny_model, n_ctx=256) as ctx:
        for rx in ok:
            llamagen.generate(ctx, "hi", max_new_tokens=2, grammar_triggers=(rx,), **lazy)


def test_a_chat_template_whose_macro_calls_itself_is_an_error(make_tiny_model):
    # before: SIGSEGV in llama.cpp's Jinja runtime (patch 0003 bounds macro calls at 256)
    endless = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"
    deep_ok = ("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{% endif %}x{% endmacro %}"
               "{{ f(200) }}")
    path = make_tiny_model(chat_template=endless)
    _contained("""
        m = llamagen.Model(MODEL)
        msgs = [{"role": "user", "content": "hi"}]
        assert m.render_chat(msgs, template=DEEP_OK) == "x" * 201
        for template in (None, ENDLESS):          # the GGUF's own, and one given
            refuses(lambda: m.render_chat(msgs, template=template),
                    "macro calls nested more than 256 deep")
        """, MODEL=str(path), ENDLESS=endless, DEEP_OK=deep_ok)


def test_chat_templates_nesting_deeply_in_their_source_are_an_error(make_tiny_model):
    # before: SIGSEGV (parsing, running and freeing the tree recursed once per level; 4,000
    # parentheses or 10,000 chained + were enough).  Patch 0003 bounds the source's nesting at 256.
    deep = {
        "parentheses": "{{ " + "(" * 100000 + "1" + ")" * 100000 + " }}",
        "lists": "{{ " + "[" * 100000 + "1" + "]" * 100000 + " }}",
        "blocks": "{% if true %}" * 100000 + "x" + "{% endif %}" * 100000,
        "loops": "{% for a in [1] %}" * 20000 + "x" + "{% endfor %}" * 20000,
        "a + chain": "{{ " + "1+" * 100000 + "1 }}",
        "a filter chain": "{{ 'a'" + "|upper" * 100000 + " }}",
        "negations": "{{ " + "not " * 100000 + "true }}",
        "calls": "{{ range" + "(1)" * 100000 + " }}",
    }
    # what real templates do, many times over, still renders
    fine = {
        "{{ " + "(" * 200 + "1" + ")" * 200 + " }}": "1",
        "{{ " + "1+" * 200 + "1 }}": "201",
        "{% if true %}" * 200 + "x" + "{% endif %}" * 200: "x",
        "{{ 'a'" + "|upper" * 200 + " }}": "A",
    }
    path = make_tiny_model(chat_template=deep["parentheses"])
    _contained("""
        m = llamagen.Model(MODEL)
        msgs = [{"role": "user", "content": "hi"}]
        for template, out in FINE.items():
            assert m.render_chat(msgs, template=template) == out, template[:40]
        refuses(lambda: m.render_chat(msgs), "the template nests more than 256 levels deep")
        for name, template in DEEP.items():
            try:
                m.render_chat(msgs, template=template)
            except ValueError as e:
                assert "more than 256" in str(e), (name, e)
            else:
                raise AssertionError(name + " rendered")
        """, MODEL=str(path), DEEP=deep, FINE=fine)


def test_chat_templates_are_held_to_a_budget_of_steps_memory_and_time(make_tiny_model):
    # before: a long loop never returned, and doubling a string (or range(10**9)) took every
    # byte of memory until the OOM killer ended the process
    path = make_tiny_model()
    _contained("""
        import resource
        m = llamagen.Model(MODEL)
        msgs = [{"role": "user", "content": "hi"}]
        def render(t):
            return lambda: m.render_chat(msgs, template=t)
        budget = llamagen.template_budget()
        assert budget == {"max_steps": 4_000_000, "max_bytes": 384 << 20, "max_seconds": 10.0}
        t0 = time.time()
        doubling = ("{% set ns = namespace(s='ab') %}{% for i in range(60) %}"
                    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}")
        refuses(render(doubling), "bytes (its memory budget)")
        refuses(render("{{ 'abcdefgh' * 1000000000 }}"), "bytes (its memory budget)")
        refuses(render("{% for i in range(1000000000) %}x{% endfor %}"), "bytes (its memory budget)")
        refuses(render("{{ 'x'|indent(1000000000000) }}"), "bytes (its memory budget)")
        refuses(render("{% set ns = namespace(x=[]) %}{% for i in range(300) %}"
                       "{% set ns.x = [ns.x] %}{% endfor %}"), "nested more than 256 deep")
        # each of those stopped within a few hundred MB and seconds (VmHWM: this process's own
        # peak; ru_maxrss keeps the parent's across exec, a gigabyte late in a full test run)
        with open("/proc/self/status") as f:
            peak_mb = next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024
        assert peak_mb < 1024, peak_mb
        assert time.time() - t0 < 30
        # no memory used, only time: the step budget, then the clock
        spin = ("{% set xs = range(3000) %}{% for i in xs %}{% for j in xs %}{% endfor %}"
                "{% endfor %}")
        llamagen.set_template_budget(max_bytes=0, max_steps=200_000)
        refuses(render(spin), "ran more than 200000 steps (its step budget)")
        llamagen.set_template_budget(max_steps=0, max_seconds=0.5)
        t0 = time.time()
        refuses(render(spin), "ran longer than its time budget")
        assert time.time() - t0 < 5
        # a real conversation fits the default budget many times over
        llamagen.set_template_budget(**budget)
        long = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hello " * 20}
                for i in range(5000)]
        assert len(m.render_chat(long)) > 5000 * 100
        for bad in ({"max_steps": -1}, {"max_bytes": 1.5}, {"max_seconds": float("nan")},
                    {"max_steps": True}):
            refuses(lambda: llamagen.set_template_budget(**bad), "must be a number >= 0")
        # found by the 30-minute fuzz run: a render of 1 MB passes the budgets, then llama.cpp's
        # reply-parser analysis diffed such renders in quadratic time (47 s; patch 0006 caps it)
        t0 = time.time()
        refuses(render("{{ 'ab' * 1000 }}{{ messages|tojson }}" * 500), "Unable to generate parser")
        assert time.time() - t0 < 10
        """, MODEL=str(path))


def test_schemas_and_grammars_that_cost_superlinear_time_are_refused(tiny_model):
    # before: 3,000 optional properties took the converter ~40 s (cubic), and a rule of 100,000
    # alternatives (an enum that long) 40 s to build, each time a sequence started
    from llamagen import _gbnf, _schema
    many = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}}
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"3,000 optional properties at # \(the limit is 256"):
        llamagen.schema_to_grammar(many)
    # the same properties all required are linear, and convert
    assert "p2999-kv" in llamagen.schema_to_grammar({**many, "required": list(many["properties"])})
    with pytest.raises(llamagen.GrammarError, match="opens 100,000 alternatives at one position"):
        _check(tiny_model, SamplingParams(json_schema={"enum": [f"v{i}" for i in range(100000)]}))
    # two rules of 3,000 that one rule starts with: 6,002 stacks at once
    wide = ("root ::= a | b\na ::= " + " | ".join(f'"x{i}"' for i in range(3000)) +
            "\nb ::= " + " | ".join(f'"y{i}"' for i in range(3000)) + "\n")
    with pytest.raises(llamagen.GrammarError, match="rule 'root' opens 6,002 alternatives"):
        _check(tiny_model, SamplingParams(grammar=wide))
    assert time.monotonic() - t0 < 10
    # at the limits they build, and the tool-parameter path refuses the same way
    fine = {"enum": [f"v{i}" for i in range(_gbnf.MAX_FANOUT - 10)]}
    _check(tiny_model, SamplingParams(json_schema=fine))
    many_tool = [{"type": "function", "function": {"name": "f", "parameters": many}}]
    with pytest.raises(ValueError, match="optional properties"):
        tiny_model.render_chat_params([{"role": "user", "content": "hi"}], tools=many_tool)
    assert _schema.MAX_OPTIONAL_PROPERTIES == 256
    # over the whole schema: 33 objects at the limit (2.7 s for 50 before), 60,000 subschemas
    objs = {f"o{j}": {"type": "object", "properties": {f"p{i}": {"type": "string"}
                                                       for i in range(256)}} for j in range(33)}
    with pytest.raises(ValueError, match="too many optional properties over its objects"):
        llamagen.schema_to_grammar({"type": "object", "properties": objs})
    wide_required = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(60000)}}
    wide_required["required"] = list(wide_required["properties"])
    with pytest.raises(ValueError, match="more than 50,000 subschemas"):
        llamagen.schema_to_grammar(wide_required)


def _check(model, params):
    from llamagen._core import _check_grammar
    from llamagen.sampling import resolve
    _check_grammar(model, resolve(params, (), {}))


def _heavy_schema(objects=30):
    # legal (under every budget) and slow to prepare: 30 objects of 256 optional properties take
    # llama.cpp's converter ~1.8 s on these machines
    return {"type": "object", "required": [f"o{j}" for j in range(objects)], "properties": {
        f"o{j}": {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(256)}}
        for j in range(objects)}}


def test_the_server_answers_and_streams_while_a_heavy_request_is_prepared(tiny_model_path,
                                                                           tmp_path):
    # before: schema conversion, grammar building, template rendering and tokenizing ran on the
    # event loop: /health and every stream stopped until the request was prepared
    import httpx
    from server_util import Server
    srv = Server(["--model", tiny_model_path, "--ctx-size", 2048, "--parallel", 2, "--threads", 1],
                 tmp_path / "srv.log")
    try:
        stamps = []

        def stream():
            with httpx.stream("POST", srv.url + "/v1/completions", timeout=120, json={
                    "prompt": "hello", "max_tokens": 400, "temperature": 0, "stream": True,
                    "ignore_eos": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        stamps.append(time.monotonic())
        st = threading.Thread(target=stream)
        st.start()
        while len(stamps) < 5:
            time.sleep(0.01)
        heavy = {}

        def prepare_heavy():
            t0 = time.monotonic()
            r = httpx.post(srv.url + "/v1/completions", timeout=120, json={
                "prompt": "x", "max_tokens": 1, "response_format": {
                    "type": "json_schema", "json_schema": {"name": "s", "schema": _heavy_schema()}}})
            heavy.update(status=r.status_code, seconds=time.monotonic() - t0)
        ht = threading.Thread(target=prepare_heavy)
        t_start = time.monotonic()
        ht.start()
        health = []
        while ht.is_alive():
            t0 = time.monotonic()
            assert httpx.get(srv.url + "/health", timeout=30).status_code == 200
            health.append(time.monotonic() - t0)
            time.sleep(0.02)
        t_end = time.monotonic()
        st.join(120)
        # (heavy enough that a loop stopped for it would show: ~1.8 s on these machines)
        assert heavy["status"] == 200 and heavy["seconds"] > 0.5, heavy
        # /health answered throughout (before: once, after the whole preparation)
        # a poll on a stopped loop waits for the whole preparation: relative to it, not a clock
        assert len(health) >= 10 and max(health) < heavy["seconds"] / 3, (len(health), max(health))
        # and the stream kept producing tokens while the request was prepared
        during = [s for s in stamps if t_start < s < t_end]
        assert len(during) >= 10, (len(during), heavy)
        # schemas over a budget are 400s naming the field the client sent
        for schema, says in (({"enum": [f"v{i}" for i in range(10000)]}, "alternatives at one position"),
                             (_heavy_schema(33), "too many optional properties")):
            r = httpx.post(srv.url + "/v1/completions", timeout=60, json={
                "prompt": "x", "max_tokens": 1, "response_format": {
                    "type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
            err = r.json()["error"]
            assert r.status_code == 400 and says in err["message"], r.text[:300]
            assert err["param"] == "response_format.json_schema.schema", err
    finally:
        assert srv.stop() == 0, srv.log()


def test_many_special_tokens_tokenize_in_linear_time_to_the_same_tokens(smollm2_path):
    # before: each special token found walked the fragment list from its start (patch 0004): a
    # 20,000-turn chat (2.6 MB) took 16 s to tokenize; now 1.3 s (bench/containment.py)
    m = llamagen.Model(smollm2_path)
    try:
        turns = [f"<|im_start|>{'user' if i % 2 == 0 else 'assistant'}\nturn {i} says "
                 f"{'hello ' * (i % 7)}<|im_end|>\n" for i in range(3000)]
        whole = m.tokenize("".join(turns), add_special=False, parse_special=True)
        pieces = [t for turn in turns for t in m.tokenize(turn, add_special=False, parse_special=True)]
        assert whole == pieces
        assert whole.count(m.tokenize("<|im_start|>", add_special=False, parse_special=True)[0]) == 3000
    finally:
        m.close()


def test_the_model_caches_keep_the_most_recent_entries():
    # the chat-template overrides and the checked grammars of a Model share this LRU
    from llamagen._util import lru_get, lru_put
    cache: dict = {}
    for k in "abcd":
        lru_put(cache, k, k.upper(), 3)
    assert list(cache) == ["b", "c", "d"]
    assert lru_get(cache, "b") == "B" and list(cache) == ["c", "d", "b"]
    assert lru_get(cache, "a") is None
    lru_put(cache, "e", "E", 3)
    assert list(cache) == ["d", "b", "e"]
