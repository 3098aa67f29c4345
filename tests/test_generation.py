"""Streaming generation: GenerationState, gen_begin/next/end, generate(), the sampler chain."""
import json
import os
import signal
import subprocess
import threading
import time

import pytest

import llamagen
from llamagen import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

JSON_GRAMMAR = r'''
root   ::= "{" ws "\"name\"" ws ":" ws string "," ws "\"age\"" ws ":" ws number ws "}"
string ::= "\"" [a-zA-Z ]{1,20} "\""
number ::= [0-9]{1,3}
ws     ::= [ ]?
'''

CONFIGS = {
    "greedy": dict(temp=0.0),
    "defaults": dict(),
    "min_p": dict(min_p=0.05, top_k=0, top_p=1.0),
    "typical_p": dict(typical_p=0.9),
    "penalties_64": dict(repeat_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.2, repeat_last_n=64),
    "penalties_ctx": dict(repeat_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.2, repeat_last_n=-1),
    "mirostat1": dict(mirostat=1),
    "mirostat2": dict(mirostat=2, mirostat_tau=4.0, mirostat_eta=0.2),
    "grammar": dict(grammar=JSON_GRAMMAR),
    "stop": dict(stop=["\n", "the"]),
    "dry_xtc_sigma": dict(dry_multiplier=0.8, xtc_probability=0.5, xtc_threshold=0.1, top_n_sigma=2.0),
}

REAL_PROMPT = "<start_of_turn>user\nTell me about the ocean.<end_of_turn>\n<start_of_turn>model\n"


def stream(ctx, prompt, **kw):
    st = llamagen.gen_begin(ctx, prompt, **kw)
    chunks = list(st)
    tail = st.end()
    return chunks, tail, st


def byte_token(model, value):
    text = f"<0x{value:02X}>"
    for i in range(model.n_vocab):
        if model.token_text(i) == text:
            return i
    raise AssertionError(f"tiny model has no byte token {text}")


# -- stream == generate ------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_stream_equals_generate_tiny(tiny_ctx, name):
    kw = dict(CONFIGS[name], max_new_tokens=48)
    whole = llamagen.generate(tiny_ctx, "the cat sat on", **kw)
    chunks, tail, st = stream(tiny_ctx, "the cat sat on", **kw)
    assert "".join(chunks) + tail == whole
    assert st.finish_reason in ("stop", "length")
    assert 1 <= len(st.tokens) <= 48


@pytest.mark.real_model
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_stream_equals_generate_real(real_ctx, name):
    kw = dict(CONFIGS[name], max_new_tokens=64)
    whole = llamagen.generate(real_ctx, REAL_PROMPT, **kw)
    chunks, tail, st = stream(real_ctx, REAL_PROMPT, **kw)
    assert "".join(chunks) + tail == whole
    assert whole.strip(), "the real model produced no text"
    if name == "grammar":
        obj = json.loads(whole)
        assert set(obj) == {"name", "age"}
    if name == "stop":
        assert "\n" not in whole and "the" not in whole


# -- seeds ----------------------------------------------------------------------------------------

@pytest.mark.real_model
def test_same_seed_same_text_different_seed_different_text(real_ctx):
    a = llamagen.generate(real_ctx, REAL_PROMPT, max_new_tokens=48, seed=7)
    b = llamagen.generate(real_ctx, REAL_PROMPT, max_new_tokens=48, seed=7)
    c = llamagen.generate(real_ctx, REAL_PROMPT, max_new_tokens=48, seed=8)
    assert a == b
    assert a != c


@pytest.mark.real_model
def test_seed_none_draws_fresh_entropy(real_ctx):
    s1 = llamagen.gen_begin(real_ctx, REAL_PROMPT, max_new_tokens=4, seed=None)
    seed1 = s1.seed
    s1.end()
    s2 = llamagen.gen_begin(real_ctx, REAL_PROMPT, max_new_tokens=4, seed=None)
    assert seed1 != s2.seed
    s2.end()
    # the drawn seed reproduces the text
    s3 = llamagen.gen_begin(real_ctx, REAL_PROMPT, max_new_tokens=24, seed=None)
    t3 = "".join(s3) + s3.end()
    assert llamagen.generate(real_ctx, REAL_PROMPT, max_new_tokens=24, seed=s3.seed) == t3


# -- agreement with llama.cpp's own loop ---------------------------------------------------------

def _native_loop():
    import importlib.util
    spec = importlib.util.spec_from_file_location("native_build", os.path.join(ROOT, "bench", "native", "build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.native_loop()


@pytest.mark.real_model
@pytest.mark.parametrize("chain", ["greedy", "defaults"])
def test_matches_native_llama_cpp_loop(real_model, real_model_path, chain):
    exe = _native_loop()
    temp = "0" if chain == "greedy" else "0.8"
    out = subprocess.run([exe, real_model_path, REAL_PROMPT, "--n-predict", "64", "--temp", temp,
                          "--top-k", "50", "--top-p", "0.9", "--seed", "42", "--threads", "2",
                          "--ctx", "2048", "--ignore-eos"],
                         check=True, capture_output=True, text=True).stdout
    ref = json.loads(out)
    with llamagen.Context(real_model, n_ctx=2048, n_threads=2) as ctx:
        st = llamagen.gen_begin(ctx, REAL_PROMPT, max_new_tokens=64, temp=float(temp), top_k=50,
                                top_p=0.9, seed=42, ignore_eos=True)
        text = "".join(st) + st.end()
    assert len(ref["tokens"]) == 64
    assert st.tokens == ref["tokens"]
    assert text == ref["text"]


# -- UTF-8 ---------------------------------------------------------------------------------------

def _assert_utf8_chunks(chunks):
    for c in chunks:
        assert isinstance(c, str)
        c.encode("utf-8")   # raises on lone surrogates


@pytest.mark.real_model
def test_cjk_and_emoji_chunks_are_valid_utf8(real_ctx):
    prompt = ("<start_of_turn>user\n用中文写一首关于大海的短诗，并加上表情符号 🌊🐚<end_of_turn>\n"
              "<start_of_turn>model\n")
    chunks, tail, st = stream(real_ctx, prompt, max_new_tokens=96, seed=3)
    _assert_utf8_chunks(chunks + [tail])
    text = "".join(chunks) + tail
    assert any(ord(ch) > 0x2E80 for ch in text), text   # the model wrote CJK or emoji
    assert text == llamagen.generate(real_ctx, prompt, max_new_tokens=96, seed=3)


def test_split_character_is_held_back(tiny_model, tiny_ctx):
    # the tiny vocabulary has no CJK pieces: the grammar forces byte tokens E4 BD A0 E5 A5 BD
    chunks, tail, st = stream(tiny_ctx, "the", grammar='root ::= "你好"', max_new_tokens=16, temp=0.0)
    pieces = [tiny_model.token_to_piece(t) for t in st.tokens]
    assert b"".join(pieces).startswith("你好".encode())
    assert all(len(p) == 1 for p in pieces[:6]), pieces      # really one byte per token
    assert chunks[:6] == ["", "", "你", "", "", "好"]
    assert "".join(chunks) + tail == "你好"


def test_orphan_bytes_become_replacement_characters(tiny_model, tiny_ctx):
    cont = byte_token(tiny_model, 0x80)       # a continuation byte with nothing to continue
    chunks, tail, st = stream(tiny_ctx, "the", temp=0.0, logit_bias={cont: 1000.0},
                              max_new_tokens=5, ignore_eos=True)
    assert st.tokens == [cont] * 5
    assert chunks == ["\ufffd"] * 5
    assert tail == ""


def test_unfinished_character_flushed_at_the_end(tiny_model, tiny_ctx):
    lead = byte_token(tiny_model, 0xE4)       # a 3-byte lead, repeated: each breaks the one before
    chunks, tail, st = stream(tiny_ctx, "the", temp=0.0, logit_bias={lead: 1000.0},
                              max_new_tokens=3, ignore_eos=True)
    # step 1 holds E4; steps 2-3 replace the broken one; the finishing step flushes the last
    assert chunks == ["", "\ufffd", "\ufffd\ufffd"]
    st2 = llamagen.gen_begin(tiny_ctx, "the", temp=0.0, logit_bias={lead: 1000.0},
                             max_new_tokens=3, ignore_eos=True)
    assert st2.next() == ""
    assert st2.end() == "\ufffd"              # end() flushes what an early stop left held
    assert st2.end() == ""


# -- stop strings ----------------------------------------------------------------------------------

def test_stop_string_is_not_emitted_and_partial_match_held(tiny_model, tiny_ctx):
    full = llamagen.generate(tiny_ctx, "the cat", temp=0.0, max_new_tokens=40, ignore_eos=True)
    assert len(full) > 6
    stop = full[3:6]
    chunks, tail, st = stream(tiny_ctx, "the cat", temp=0.0, max_new_tokens=40, ignore_eos=True, stop=[stop])
    text = "".join(chunks) + tail
    assert text == full[:full.index(stop)]
    assert st.finish_reason == "stop"
    # a stop string that never completes: everything comes out, nothing lost
    chunks, tail, st = stream(tiny_ctx, "the cat", temp=0.0, max_new_tokens=40, ignore_eos=True,
                              stop=[full[-2:] + "\u2603"])
    assert "".join(chunks) + tail == full
    assert st.finish_reason == "length"


# -- grammar ---------------------------------------------------------------------------------------

def test_invalid_grammar_raises_value_error(tiny_ctx):
    with pytest.raises(ValueError) as ei:
        llamagen.gen_begin(tiny_ctx, "the", grammar="root ::= [unclosed")
    assert isinstance(ei.value, llamagen.GrammarError)
    with pytest.raises(llamagen.GrammarError):
        llamagen.generate(tiny_ctx, "the", grammar="this is not gbnf")


def test_grammar_constrains_tiny_model(tiny_ctx):
    for seed in (1, 2, 3):
        text = llamagen.generate(tiny_ctx, "the", grammar=JSON_GRAMMAR, seed=seed, max_new_tokens=80)
        obj = json.loads(text)
        assert set(obj) == {"name", "age"}


# -- lifecycle -------------------------------------------------------------------------------------


def test_ignore_eos_stops_where_a_grammar_allows_nothing_else(tiny_ctx, tiny_model):
    # ignore_eos goes on past the model's end, but a finished grammar allows only the end token:
    # before, every later token was that end token, up to max_new_tokens ("length")
    st = llamagen.gen_begin(tiny_ctx, "x", grammar='root ::= "ab"', ignore_eos=True,
                            max_new_tokens=10, temp=0)
    assert "".join(st) + st.end() == "ab"
    assert st.finish_reason == "stop" and len(st.tokens) == 3 and tiny_model.is_eog(st.tokens[-1])
    # a grammar that may go on still goes on
    st = llamagen.gen_begin(tiny_ctx, "x", grammar='root ::= "a"+', ignore_eos=True,
                            max_new_tokens=10, temp=0)
    text = "".join(st) + st.end()
    assert set(text) == {"a"} and st.finish_reason == "length" and len(st.tokens) == 10
    with llamagen.Context(tiny_model, n_ctx=512, n_seq_max=2) as ctx:    # batches share the step
        got = llamagen.generate_batch(ctx, ["x", "y"], grammar='root ::= "ab"', ignore_eos=True,
                                      max_new_tokens=10, return_logprobs=True)
        assert [(r.text, r.finish_reason) for r in got] == [("ab", "stop")] * 2

def test_newer_begin_invalidates_older_state(tiny_ctx):
    a = llamagen.gen_begin(tiny_ctx, "the cat", max_new_tokens=10)
    a.next()
    b = llamagen.gen_begin(tiny_ctx, "the dog", max_new_tokens=10)
    with pytest.raises(llamagen.StaleStateError) as ei:
        a.next()
    assert isinstance(ei.value, llamagen.LlamaError)
    with pytest.raises(llamagen.LlamaError):
        next(a)
    assert b.next() is not None
    a.end()
    b.end()


def test_gen_next_after_end_returns_none_and_end_is_idempotent(tiny_ctx):
    st = llamagen.gen_begin(tiny_ctx, "the", max_new_tokens=3, ignore_eos=True)
    got = []
    while True:
        c = llamagen.gen_next(st)
        if c is None:
            break
        got.append(c)
    assert len(got) == 3
    assert st.finish_reason == "length"
    assert llamagen.gen_next(st) is None
    assert llamagen.gen_end(st) == ""
    assert llamagen.gen_end(st) == ""
    with pytest.raises(StopIteration):
        next(st)


def test_early_end_then_no_more_steps(tiny_ctx):
    st = llamagen.gen_begin(tiny_ctx, "the", max_new_tokens=50, ignore_eos=True)
    st.next()
    st.end()
    assert st.next() is None
    assert st.finish_reason == "cancelled" and st.finished     # (ended early, by the caller)


def test_state_cannot_be_constructed_directly():
    with pytest.raises(TypeError):
        llamagen.GenerationState()


def test_introspection(tiny_ctx):
    st = llamagen.gen_begin(tiny_ctx, "the cat sat", max_new_tokens=7, ignore_eos=True, temp=0.0)
    assert st.finish_reason is None
    assert st.n_prompt_tokens == len(tiny_ctx.model.tokenize("the cat sat", parse_special=True))
    list(st)
    assert len(st.tokens) == 7 and all(isinstance(t, int) for t in st.tokens)
    assert st.finish_reason == "length"
    t = st.timings
    assert t["n_tokens"] == 7 and t["prefill_ms"] > 0 and t["decode_ms"] > 0
    assert t["tokens_per_second"] > 0


def test_eos_ends_with_stop_and_ignore_eos_goes_on(tiny_model, tiny_ctx):
    eos = tiny_model.eos
    st = llamagen.gen_begin(tiny_ctx, "the", temp=0.0, logit_bias={eos: 1000.0}, max_new_tokens=10)
    assert "".join(st) + st.end() == ""
    assert st.finish_reason == "stop" and st.tokens == [eos]
    st = llamagen.gen_begin(tiny_ctx, "the", temp=0.0, logit_bias={eos: 1000.0}, max_new_tokens=10,
                            ignore_eos=True)
    list(st)
    assert st.finish_reason == "length" and st.tokens == [eos] * 10


def test_logit_bias_steers_greedy_choice(tiny_model, tiny_ctx):
    tok = tiny_model.tokenize("z", add_special=False)[-1]
    st = llamagen.gen_begin(tiny_ctx, "the", temp=0.0, logit_bias={tok: 50.0}, max_new_tokens=3,
                            ignore_eos=True)
    list(st)
    assert st.tokens == [tok] * 3


# -- sampling parameters -----------------------------------------------------------------------------

def test_sampling_params_object_and_overrides(tiny_ctx):
    p = SamplingParams(max_new_tokens=12, temp=0.0)
    a = llamagen.generate(tiny_ctx, "the", params=p)
    b = llamagen.generate(tiny_ctx, "the", max_new_tokens=12, temp=0.0)
    assert a == b
    st = llamagen.gen_begin(tiny_ctx, "the", params=p, max_new_tokens=3, ignore_eos=True)
    list(st)
    assert len(st.tokens) == 3 and st.params.temp == 0.0
    # positional order follows the R API: max_new_tokens, temp, top_k, top_p, seed
    assert llamagen.generate(tiny_ctx, "the", 12, 0.0) == a
    with pytest.raises(TypeError):
        llamagen.generate(tiny_ctx, "the", no_such_param=1)
    with pytest.raises(AttributeError):
        p.temp = 1.0   # immutable


@pytest.mark.parametrize("kw,name", [
    (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"), (dict(min_p=2.0), "min_p"),
    (dict(typical_p=-1.0), "typical_p"), (dict(mirostat=3), "mirostat"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temp=float("nan")), "temp"),
    (dict(repeat_penalty=0.0), "repeat_penalty"), (dict(repeat_last_n=-2), "repeat_last_n"),
    (dict(seed=-1), "seed"), (dict(seed=2 ** 32), "seed"), (dict(mirostat_tau=-1.0), "mirostat_tau"),
    (dict(stop=[""]), "stop"), (dict(xtc_probability=1.5), "xtc_probability"),
    (dict(dry_base=0.5), "dry_base"), (dict(frequency_penalty=float("inf")), "frequency_penalty"),
])
def test_bad_parameters_raise_value_error_naming_them(tiny_ctx, kw, name):
    with pytest.raises(ValueError, match=name):
        llamagen.gen_begin(tiny_ctx, "the", **kw)


def test_logit_bias_token_out_of_range(tiny_model, tiny_ctx):
    with pytest.raises(ValueError, match="token"):
        llamagen.gen_begin(tiny_ctx, "the", logit_bias={tiny_model.n_vocab + 5: 1.0})


# -- context limits -------------------------------------------------------------------------------

def test_prompt_too_long_raises_before_decoding(tiny_model):
    with llamagen.Context(tiny_model, n_ctx=64) as ctx:
        n = ctx.n_ctx_seq                    # llama.cpp pads n_ctx: use what it really holds
        long_prompt = [10 + i % 300 for i in range(n)]    # fills the context: no room for one more
        with pytest.raises(ValueError, match="context"):
            llamagen.gen_begin(ctx, long_prompt)
        with pytest.raises(ValueError, match="empty"):
            llamagen.gen_begin(ctx, [])
        # n - 1 prompt tokens: one new token fits the last cell, a second one is sampled from it
        st = llamagen.gen_begin(ctx, long_prompt[:-1], max_new_tokens=10, ignore_eos=True)
        list(st)
        assert len(st.tokens) == 2 and st.finish_reason == "length"


def test_running_into_the_end_of_the_context_stops_with_length(tiny_model):
    with llamagen.Context(tiny_model, n_ctx=64) as ctx:
        st = llamagen.gen_begin(ctx, "the cat", max_new_tokens=500, ignore_eos=True)
        text = "".join(st) + st.end()
        assert st.finish_reason == "length"
        # every cell is used: the last token is sampled from the full cache and never decoded
        assert st.n_prompt_tokens + len(st.tokens) == ctx.n_ctx + 1
        assert text == llamagen.generate(ctx, "the cat", max_new_tokens=500, ignore_eos=True)


# -- threads and the GIL ----------------------------------------------------------------------------

class Stamper:
    """A pure-Python thread that records perf_counter() stamps while it runs.  A stamp strictly
    inside the span of a call proves the call let go of the GIL: holding it, no Python code of
    another thread can run (forced switches happen only between bytecodes of the caller)."""

    def __enter__(self):
        self.stamps = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        time.sleep(0.02)
        return self

    def _run(self):
        n = 0
        stamps, stop, clock = self.stamps, self.stop, time.perf_counter
        while not stop.is_set():
            n += 1
            if n % 64 == 0:
                stamps.append(clock())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def inside(self, t0, t1):
        import bisect
        return bisect.bisect_right(self.stamps, t1) - bisect.bisect_left(self.stamps, t0)


@pytest.mark.real_model
def test_gil_is_released_during_steps(real_ctx):
    st = llamagen.gen_begin(real_ctx, REAL_PROMPT, max_new_tokens=40, ignore_eos=True)
    spans = []
    with Stamper() as s:
        for _ in range(40):
            t0 = time.perf_counter()
            st.next()
            spans.append((t0, time.perf_counter()))
    st.end()
    # the other thread ran Python code while (nearly) every step was running
    assert sum(s.inside(a, b) > 0 for a, b in spans) >= 30


@pytest.mark.real_model
def test_gil_is_released_during_generate(real_ctx):
    with Stamper() as s:
        t0 = time.perf_counter()
        llamagen.generate(real_ctx, REAL_PROMPT, max_new_tokens=40, ignore_eos=True)
        t1 = time.perf_counter()
    # stamps all through the call: check every tenth of it saw the other thread run
    tenth = (t1 - t0) / 10
    assert all(s.inside(t0 + i * tenth, t0 + (i + 1) * tenth) > 0 for i in range(10))


def test_two_threads_stepping_one_state(tiny_ctx):
    st = llamagen.gen_begin(tiny_ctx, "the", max_new_tokens=200, ignore_eos=True, temp=0.0)
    out = [[], []]
    errors = []

    def run(i):
        try:
            while True:
                c = st.next()
                if c is None:
                    return
                out[i].append(c)
        except Exception as e:   # pragma: no cover - would be the failure
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(out[0]) + len(out[1]) == 200
    assert len(st.tokens) == 200


def test_two_states_on_one_context_from_two_threads(tiny_ctx):
    errors = []
    results = []

    def run(seed):
        try:
            for _ in range(5):
                st = llamagen.gen_begin(tiny_ctx, "the cat", max_new_tokens=20, seed=seed)
                try:
                    results.append("".join(st) + st.end())
                except llamagen.StaleStateError:
                    results.append(None)   # the other thread began a newer generation
        except Exception as e:   # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 10


# -- Ctrl-C during a long prefill ----------------------------------------------------------------------

@pytest.mark.real_model
def test_keyboard_interrupt_during_prefill_leaves_context_usable(real_model, python_sigint):
    with llamagen.Context(real_model, n_ctx=4096, n_batch=4096, n_ubatch=512) as ctx:
        long_prompt = [real_model.bos] + [1000 + (i % 5000) for i in range(4000)]
        timer = threading.Timer(0.3, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT))
        t0 = time.perf_counter()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            llamagen.gen_begin(ctx, long_prompt, max_new_tokens=4)
        interrupted_after = time.perf_counter() - t0
        timer.join()
        # the context still works and gives the same text as a fresh one
        a = llamagen.generate(ctx, REAL_PROMPT, max_new_tokens=16, temp=0.0)
        t1 = time.perf_counter()
        st = llamagen.gen_begin(ctx, long_prompt, max_new_tokens=1)
        full_prefill = time.perf_counter() - t1
        st.end()
        b = llamagen.generate(ctx, REAL_PROMPT, max_new_tokens=16, temp=0.0)
    assert a == b and a
    # control came back before the prefill could have finished on its own
    assert interrupted_after < full_prefill
