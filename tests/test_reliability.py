"""Issue 18: every class of input and thread interleaving that used to lose the process, each
with a regression test, and the fuzzers that look for the next class.

Crash-prone cases run in a subprocess (``run_script``), so a regression fails the test instead of
taking the test run down.  The fuzzers are small in CI; ``LLAMAGEN_FUZZ_LONG=1`` runs them for
minutes (counts are printed with ``-s``).
"""
from __future__ import annotations

import os
import random
import struct
import textwrap
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llamagen
from llamagen import GrammarError
from script_util import run_script

LONG = os.environ.get("LLAMAGEN_FUZZ_LONG") == "1"
EXAMPLES = 2000 if LONG else 150


@pytest.fixture(scope="module")
def ctx(tiny_model):
    c = llamagen.Context(tiny_model, n_ctx=256, n_threads=1)
    yield c
    c.close()


# -- 1, 2: grammars -------------------------------------------------------------------------------

DEEP = {
    "nested parentheses": 'root ::= ' + "(" * 30000 + '"a"' + ")" * 30000,
    "a chain of rules": "root ::= r0\n" + "".join(f"r{i} ::= r{i + 1}\n" for i in range(300000))
                        + 'r300000 ::= "a"\n',
    "nested repetitions": 'root ::= ((("a"{2000}){2000}){2000})',
}


def check_grammar_isolated(model_path, grammar, timeout=300):
    """Start a grammar for the model's vocabulary in a subprocess: (rc, output), the output
    "accepted" or "GrammarError <message>"."""
    return run_script('''
        m = llamagen.Model(MODEL, vocab_only=True)
        try:
            llamagen._core._check_grammar(m, llamagen.SamplingParams(grammar=G))
            print("accepted")
        except llamagen.GrammarError as e:
            print("GrammarError", e)
        ''', MODEL=str(model_path), G=grammar, timeout=timeout)


@pytest.mark.parametrize("what", sorted(DEEP))
def test_grammars_that_would_overflow_the_stack_or_memory_are_refused(tiny_model_path, what):
    # without the pre-check each of these ended the process (segfault or out of memory)
    rc, out = check_grammar_isolated(tiny_model_path, DEEP[what])
    assert rc == 0 and "GrammarError" in out, out[-1500:]


@pytest.mark.parametrize("grammar", [
    'root ::= ("a"{ 5 ,\n 2 })',                # spaces and a newline inside the braces
    'root ::= ("a"{5,#comment\n2})',            # a comment inside the braces
    'root ::= ("a" # comment ends at CR\r{5,2})',  # a comment ends at \r, not only \n
    'root ::= "a"{5,2}',
])
def test_repetitions_read_as_llama_cpp_reads_them(tiny_model_path, grammar):
    # n < m wraps to ~2**64 copies in llama.cpp: the scanner must see every spelling
    rc, out = check_grammar_isolated(tiny_model_path, grammar, timeout=60)
    assert rc == 0 and "maximum (2) is below the minimum (5)" in out, out[-1500:]


def test_grammar_limits_leave_real_grammars_alone(ctx):
    ok = ('root ::= ' + "(" * 200 + '"a"' + ")" * 200 + "\n",
          "root ::= r0\n" + "".join(f"r{i} ::= r{i + 1}\n" for i in range(1500)) + 'r1500 ::= "a"\n',
          'root ::= ("a"{0,40}){0,40}\n',
          'root ::= "{5,2}" [#{}] x # comment {5,2}\nx ::= "b"\n')
    for g in ok:
        assert llamagen._gbnf.check(g, ctx.model.n_vocab) is None
        llamagen._core._check_grammar(ctx.model, llamagen.SamplingParams(grammar=g))


def test_a_nul_in_a_grammar_is_refused():
    with pytest.raises(ValueError, match="NUL"):
        llamagen.SamplingParams(grammar='root ::= "a"\0 | "b"')


def test_llama_cpp_parse_errors_come_back_in_the_message_not_on_stderr(ctx, capfd):
    with pytest.raises(GrammarError, match="(?i)undefined rule"):
        llamagen.generate(ctx, "x", grammar='root ::= missing', max_new_tokens=2)
    err = capfd.readouterr().err
    assert "undefined" not in err and "parse" not in err.lower()


# -- 3: closing while a call is between its check and its C calls --------------------------------

CLOSING = {
    "token __index__ closes the context (gen_begin)": '''
        class Evil:
            def __index__(self):
                ctx.close(); return 5
        try:
            llamagen.gen_begin(ctx, [1, 2, Evil(), 3], max_new_tokens=2)
            print("no error")
        except llamagen.LlamaError as e:
            print("LlamaError", e)
        ''',
    "token __index__ closes context and model (BatchGenerator.add)": '''
        class Evil:
            def __index__(self):
                ctx.close(); model.close(); return 5
        b = llamagen.BatchGenerator(ctx)
        try:
            b.add([1, Evil(), 3])
            print("no error")
        except llamagen.LlamaError as e:
            print("LlamaError", e)
        ''',
    "score text object closes the context": '''
        class Evil:
            def __len__(self): return 2
            def __iter__(self):
                ctx.close(); return iter([1, 2])
        try:
            llamagen.score(ctx, [[1, 2, 3], Evil()])
            print("no error")
        except llamagen.LlamaError as e:
            print("LlamaError", e)
        ''',
    "another thread closes while gen_begin and add run": '''
        errors = []
        def closer():
            time.sleep(0.001 * random.random())
            ctx.close()
        for i in range(30):
            ctx = llamagen.Context(model, n_ctx=128, n_threads=1)
            t = threading.Thread(target=closer); t.start()
            try:
                b = llamagen.BatchGenerator(ctx, max_new_tokens=2)
                for _ in range(5):
                    b.add("hello there")
                list(b)
                llamagen.gen_begin(ctx, "hi", max_new_tokens=2)
            except llamagen.LlamaError:
                pass
            t.join()
        print("LlamaError only")
        ''',
}


@pytest.mark.parametrize("case", sorted(CLOSING))
def test_closing_in_the_middle_of_a_call(tiny_model_path, case):
    setup = "model = llamagen.Model(MODEL)\nctx = llamagen.Context(model, n_ctx=128, n_threads=1)\n"
    rc, out = run_script(setup + textwrap.dedent(CLOSING[case]), MODEL=str(tiny_model_path),
                         timeout=120)
    assert rc == 0 and "LlamaError" in out, out[-2000:]


# -- 4: corrupt model files ---------------------------------------------------------------------

def _string_offsets(data: bytes, needle: bytes):
    """Offsets of the GGUF strings (u64 length + bytes) equal to ``needle``."""
    pat = struct.pack("<Q", len(needle)) + needle
    out, i = [], data.find(pat)
    while i >= 0:
        out.append(i)
        i = data.find(pat, i + 1)
    return out


def test_a_vocabulary_with_a_token_twice_is_a_model_load_error(make_tiny_model, tmp_path):
    path = make_tiny_model()
    data = bytearray(path.read_bytes())
    a, b = _string_offsets(data, b"a"), _string_offsets(data, b"b")
    assert a and b
    data[b[0] + 8:b[0] + 9] = b"a"          # token "b" becomes a second "a"
    bad = tmp_path / "dup.gguf"
    bad.write_bytes(bytes(data))
    rc, out = run_script('''
        try:
            llamagen.Model(P); print("loaded")
        except llamagen.ModelLoadError as e:
            print("ModelLoadError", e)
        ''', P=str(bad), timeout=60)
    assert rc == 0 and "ModelLoadError" in out and "twice" in out, out[-1500:]


def test_a_string_length_near_2_64_is_a_model_load_error(make_tiny_model, tmp_path):
    path = make_tiny_model()
    data = bytearray(path.read_bytes())
    i = _string_offsets(data, b"a")[0]
    data[i:i + 8] = struct.pack("<Q", 2**63 - 5)
    bad = tmp_path / "len.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(llamagen.ModelLoadError):
        llamagen.Model(bad)


# -- 5: Ctrl-C during a batch prefill -------------------------------------------------------------

@pytest.mark.real_model
def test_ctrl_c_during_a_batch_prefill_acts_within_a_second(real_model, python_sigint):
    import _thread
    with llamagen.Context(real_model, n_ctx=8192, n_batch=2048, n_seq_max=4,
                          kv_unified=True) as ctx:
        b = llamagen.BatchGenerator(ctx, max_new_tokens=2)
        for i in range(4):
            b.add([2] + [100 + i] * 1800)             # a multi-second prefill on 2 CPUs
        timer = threading.Timer(0.3, _thread.interrupt_main)
        t0 = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            while time.monotonic() - t0 < 30:     # (bounded: a lost signal fails, not hangs)
                b.step()
        took = time.monotonic() - t0
        timer.cancel()
        assert took < 1.5, took
        # the batch is still usable afterwards
        b2 = llamagen.BatchGenerator(ctx, max_new_tokens=2)
        b2.add("hello")
        assert len(list(b2)) >= 1


# -- 6: two threads, one context -------------------------------------------------------------------

def test_two_threads_generating_on_one_context_take_turns(tiny_model):
    with llamagen.Context(tiny_model, n_ctx=256, n_threads=1) as c:
        want = {s: llamagen.generate(c, "hello", max_new_tokens=16, seed=s, temp=0.9)
                for s in range(4)}
        errors, got = [], {}

        def worker(s):
            try:
                for _ in range(5):
                    got.setdefault(s, set()).add(
                        llamagen.generate(c, "hello", max_new_tokens=16, seed=s, temp=0.9))
                    llamagen.generate_batch(c, ["a", "b"], max_new_tokens=4)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert got == {s: {want[s]} for s in range(4)}


# -- 7: smaller ones ---------------------------------------------------------------------------------

def test_memoryview_and_bytearray_prompts_are_text(ctx, tiny_model):
    for p in (memoryview(b"hello"), bytearray(b"hello")):
        st = llamagen.gen_begin(ctx, p, max_new_tokens=1)
        assert st.n_prompt_tokens == len(tiny_model.tokenize(bytes(p)))
        st.end()


def test_numpy_scalars_are_accepted():
    p = llamagen.SamplingParams(temp=np.float32(0.5), top_k=np.int64(10), top_p=np.float64(0.5),
                                seed=np.uint32(3), max_new_tokens=np.int32(5),
                                logit_bias={np.int64(5): np.float32(1.0)})
    assert (p.temp, p.top_k, p.seed, p.max_new_tokens) == (0.5, 10, 3, 5)
    assert type(p.top_k) is int and p.logit_bias == ((5, 1.0),)
    with pytest.raises(TypeError):
        llamagen.SamplingParams(temp=np.bool_(True))


@pytest.mark.parametrize("field", ["stop", "dry_sequence_breakers", "grammar", "grammar_root"])
def test_lone_surrogates_name_their_parameter(field):
    value = ["a\ud800"] if field in ("stop", "dry_sequence_breakers") else "root ::= \"\ud800\""
    with pytest.raises(ValueError, match=field):
        llamagen.SamplingParams(**{field: value})


def test_a_state_after_end(tiny_model):
    c = llamagen.Context(tiny_model, n_ctx=256, n_threads=1)
    st = llamagen.gen_begin(c, "hello", max_new_tokens=50)
    next(st)
    st.end()
    assert st.finish_reason == "cancelled" and st.finished
    c.close()
    assert st.next() is None and list(st) == [] and st.end() == ""


# -- fuzzers -------------------------------------------------------------------------------------------

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                    st.lists(st.text(max_size=4), max_size=3), st.binary(max_size=4),
                    st.dictionaries(st.integers(-5, 10**6), st.floats(), max_size=3))


@settings(max_examples=EXAMPLES * 2, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(llamagen.sampling.FIELDS), _VALUES, max_size=4))
def test_fuzz_sampling_params_raise_value_or_type_errors(fields):
    fields.pop("json_schema", None)          # (its own tests: tests/test_structured.py)
    try:
        p = llamagen.SamplingParams(**fields)
    except (ValueError, TypeError):
        return
    assert p == p.replace()                  # validated values survive a round trip


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(max_size=60))
def test_fuzz_tokenize_detokenize_round_trip(tiny_model, text):
    toks = tiny_model.tokenize(text, add_special=False)
    assert all(0 <= t < tiny_model.n_vocab for t in toks)
    out = tiny_model.detokenize(toks)
    assert isinstance(out, str)
    if text.isascii() and text.isprintable() and "  " not in text and not text.startswith(" "):
        assert out.strip() == text.strip()


_GBNF_PIECES = ['"a"', '"b"', "[a-z]", "[^x]", ".", "x", "y", "(", ")", "|", "*", "+", "?", "{2}",
                "{1,3}", "{5,2}", "{ 3 , }", "{0,#c\n1}", " ", "\n", "\r", "\t", "# note\n",
                "<[5]>", "<[99999]>", '"\\x41"', "[\\]]", "(((", ")))", "{2000}", "{0,2000}"]


def random_gbnf(rnd: random.Random) -> str:
    """GBNF-shaped text: three rules of random pieces (nesting, comments, line endings,
    repetitions, classes, token references), valid or not."""
    return "".join(f"{name} ::= " + "".join(rnd.choice(_GBNF_PIECES)
                                            for _ in range(rnd.randint(1, 14))) + "\n"
                   for name in ("root", "x", "y"))


def test_fuzz_grammars_never_crash(tiny_model_path):
    # one subprocess parses a whole batch of generated grammars: a crash fails the test and the
    # last grammar it printed names the culprit
    rnd = random.Random(0)
    grammars = [random_gbnf(rnd) for _ in range(EXAMPLES * 4)]
    rc, out = run_script('''
        import json
        m = llamagen.Model(MODEL, vocab_only=True)
        counts = {"ok": 0, "error": 0}
        for g in json.loads(GRAMMARS):
            print("GRAMMAR", repr(g), flush=True)
            try:
                llamagen._core._check_grammar(m, llamagen.SamplingParams(grammar=g))
                counts["ok"] += 1
            except (llamagen.GrammarError, ValueError):
                counts["error"] += 1
        print("COUNTS", counts)
        ''', MODEL=str(tiny_model_path), GRAMMARS=__import__("json").dumps(grammars), timeout=600)
    assert rc == 0 and "COUNTS" in out, out[-1500:]
    print(out.strip().splitlines()[-1], "over", len(grammars), "grammars")


def test_fuzz_corrupt_gguf_files_load_or_raise(make_tiny_model, tmp_path):
    """Overwrite bytes of the header, metadata and tensor index of a valid tiny model; every
    file must load or raise ModelLoadError, in a subprocess that tries a whole batch."""
    path = make_tiny_model()
    data = path.read_bytes()
    # the tensor data starts after the index: corrupt only the part before it
    head = min(len(data), 64 * 1024)
    rng = random.Random(1234)
    n_cases = 400 if LONG else 60
    files = []
    for k in range(n_cases):
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(8, head)
            kind = rng.random()
            if kind < 0.4:
                b[i] ^= 1 << rng.randrange(8)
            elif kind < 0.7:
                b[i:i + 8] = struct.pack("<Q", rng.choice([0, 1, 2**32, 2**63 - 1, 2**64 - 1,
                                                           rng.randrange(2**64)]))
            else:
                b[i:i + 4] = struct.pack("<I", rng.choice([0, 1, 12, 13, 2**31, 2**32 - 1]))
        f = tmp_path / f"c{k}.gguf"
        f.write_bytes(bytes(b))
        files.append(str(f))
    rc, out = run_script('''
        import json
        counts = {"loaded": 0, "ModelLoadError": 0}
        for f in json.loads(FILES):
            print("FILE", f, flush=True)
            try:
                m = llamagen.Model(f)
                counts["loaded"] += 1
                m.close()
            except llamagen.ModelLoadError:
                counts["ModelLoadError"] += 1
        print("COUNTS", counts)
        ''', FILES=__import__("json").dumps(files), timeout=900)
    assert rc == 0 and "COUNTS" in out, out[-2500:]
    print(out.strip().splitlines()[-1], "over", len(files), "files")


def test_fuzz_threads_close_generate_stream_batch(tiny_model_path):
    """Threads that close, generate, stream and batch on shared contexts and models in random
    order: no crash, no deadlock, every error a LlamaError."""
    rc, out = run_script('''
        import collections
        rounds = ROUNDS
        bad = []
        counts = collections.Counter()
        for r in range(rounds):
            model = llamagen.Model(MODEL)
            ctxs = [llamagen.Context(model, n_ctx=256, n_seq_max=2, n_threads=1) for _ in range(2)]
            rnd = random.Random(r)
            def worker(seed):
                rr = random.Random(seed)
                for _ in range(6):
                    c = rr.choice(ctxs)
                    op = rr.choice(["generate", "stream", "batch", "score", "close", "tokenize"])
                    try:
                        if op == "generate":
                            llamagen.generate(c, "hello", max_new_tokens=4)
                        elif op == "stream":
                            s = llamagen.gen_begin(c, "hi", max_new_tokens=6)
                            for _ in s:
                                time.sleep(0.0005)
                            s.end()
                        elif op == "batch":
                            b = llamagen.BatchGenerator(c, max_new_tokens=3)
                            b.add("a b"); b.add([1, 2, 3])
                            list(b)
                        elif op == "score":
                            llamagen.score(c, ["a b c"])
                        elif op == "close":
                            (c.close if rr.random() < 0.8 else model.close)()
                        else:
                            model.tokenize("some text")
                        counts[op] += 1
                    except llamagen.LlamaError:
                        counts["LlamaError"] += 1
                    except Exception as e:
                        bad.append(repr(e))
            ts = [threading.Thread(target=worker, args=(r * 10 + i,)) for i in range(4)]
            for t in ts: t.start()
            for t in ts:
                t.join(60)
                if t.is_alive():
                    print("DEADLOCK"); sys.stdout.flush(); import os; os._exit(3)
            for c in ctxs: c.close()
            model.close()
        print("BAD", bad[:5])
        print("COUNTS", dict(counts))
        ''', MODEL=str(tiny_model_path), ROUNDS=30 if LONG else 6, timeout=900)
    assert rc == 0 and "BAD []" in out, out[-2500:]
    print(out.strip().splitlines()[-1])


@pytest.mark.real_model
def test_dry_breakers_are_bounded_and_built_without_the_gil(real_ctx):
    with pytest.raises(ValueError, match="limit is 64"):
        llamagen.SamplingParams(dry_multiplier=0.8, dry_sequence_breakers=[f"b{i}" for i in range(65)])
    ticks = [0]
    stop = threading.Event()

    def count():
        while not stop.is_set():
            ticks[0] += 1
    t = threading.Thread(target=count)
    t.start()
    try:
        t0 = time.monotonic()
        st = llamagen.gen_begin(real_ctx, "hi", max_new_tokens=1, dry_multiplier=0.8,
                                dry_sequence_breakers=[f"x{i}" for i in range(64)])
        took = time.monotonic() - t0
        st.end()
    finally:
        stop.set()
        t.join()
    # another Python thread ran while the 64 breakers were prepared (seconds of C work)
    assert ticks[0] > 1000, (ticks[0], took)
