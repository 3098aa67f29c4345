"""Calls that used to crash, hang or answer wrongly: now a clear Python exception or the right
answer.  Races and would-be aborts run in a subprocess, so a regression fails the test instead
of taking the test run down."""
import os
import stat

import pytest

import llamagen
from llamagen import GrammarError, LlamaError
from script_util import run_script



@pytest.fixture(scope="module")
def ctx(tiny_model):
    c = llamagen.Context(tiny_model, n_ctx=256, n_threads=1)
    yield c
    c.close()


# -- grammars ---------------------------------------------------------------------------------

DEAD_GRAMMARS = [
    'root ::= [z-a]',          # an empty character class
    'root ::= "\\x00"',        # a character no token contains
]


@pytest.mark.parametrize("impl", ["fast", "llama.cpp"])
@pytest.mark.parametrize("grammar", DEAD_GRAMMARS)
def test_a_grammar_that_allows_no_token_raises(ctx, grammar, impl):
    with pytest.raises(GrammarError, match="allows no token after 0 generated"):
        llamagen.generate(ctx, "hello", grammar=grammar, max_new_tokens=5, sampler_impl=impl)
    st = llamagen.gen_begin(ctx, "hello", grammar=grammar, max_new_tokens=5, sampler_impl=impl)
    with pytest.raises(GrammarError):
        st.next()
    assert st.finish_reason == "error"
    assert st.next() is None
    # the context is still usable
    assert isinstance(llamagen.generate(ctx, "hello", max_new_tokens=3, seed=1), str)


def test_a_grammar_dead_end_after_some_tokens(ctx):
    # the grammar allows "a", then only NUL (which no token can match): the error comes at token 2
    with pytest.raises(GrammarError, match="after 1 generated"):
        llamagen.generate(ctx, "hello", grammar='root ::= "a" "\\x00"', max_new_tokens=5)


def test_a_batch_sequence_whose_grammar_allows_no_token(tiny_model):
    ctx = llamagen.Context(tiny_model, n_ctx=512, n_seq_max=2, n_threads=1)
    bg = llamagen.BatchGenerator(ctx, n_parallel=2)
    good = bg.add("hello", max_new_tokens=4, ignore_eos=True, seed=3)
    bad = bg.add("hello", max_new_tokens=4, grammar=DEAD_GRAMMARS[0])
    chunks = []
    with pytest.raises(GrammarError, match=f"sequence {bad}:"):
        for _ in range(10):         # the first steps may only feed prompts
            chunks += [c for i, c in bg.step() if i == good]
    assert bg.finish_reason(bad) == "error"
    chunks += [c for i, c in bg if i == good]
    assert bg.finish_reason(good) == "length"
    assert len(bg.tokens(good)) == 4
    alone = llamagen.generate(ctx, "hello", max_new_tokens=4, ignore_eos=True, seed=3)
    assert "".join(chunks) == alone


def test_a_repetition_whose_maximum_is_below_its_minimum_is_refused(tiny_model_path):
    # llama.cpp's parser counts max - min unsigned: ~2**64 optional copies, allocated until OOM
    rc, out = run_script("""
        m = llamagen.Model(MODEL)
        c = llamagen.Context(m, n_ctx=128, n_threads=1)
        try:
            llamagen.generate(c, "hi", grammar='root ::= [a-z]{2,1}', max_new_tokens=2)
        except llamagen.GrammarError as e:
            print("GrammarError:", e)
    """, MODEL=str(tiny_model_path), timeout=120)
    assert rc == 0, out
    assert "GrammarError: the grammar does not parse: repetition {2,1}" in out


def test_a_token_id_past_the_vocabulary_is_refused(ctx):
    n = ctx.model.n_vocab
    with pytest.raises(GrammarError, match=f"token id {n} "):
        llamagen.gen_begin(ctx, "hello", grammar=f"root ::= <[{n}]>")
    # the last id is fine, and so are braces, '<' and '#' inside literals and classes
    llamagen.gen_begin(ctx, "hello", grammar=f'root ::= <[{n - 1}]> "{{2,1}}<[99999]>" [{{}}#]? # {{9,1}}\n').end()


def test_gbnf_scanner():
    from llamagen._gbnf import check
    assert check('root ::= "a"{1,3} [b]{2} "c"{0,}', 10) is None
    assert "maximum (0)" in check('root ::= x\nx ::= "a" {1, 0}', 10)
    assert check('root ::= "\\"{3,1}"', 10) is None            # inside a literal
    assert check("root ::= [\\]{3,1}]", 10) is None              # inside a class
    assert "past the vocabulary" in check("root ::= !<[10]>", 10)
    assert check("root ::= <[9]>", 10) is None


# -- threads -----------------------------------------------------------------------------------

def test_end_while_another_thread_steps(tiny_model_path):
    rc, out = run_script("""
        m = llamagen.Model(MODEL)
        c = llamagen.Context(m, n_ctx=2048, n_threads=1)
        for it in range(150):
            st = llamagen.gen_begin(c, "hello world", max_new_tokens=1500, ignore_eos=True,
                                    grammar="root ::= [a-z ]+", dry_multiplier=0.5)
            def stream():
                for _ in range(200):
                    if st.next() is None:
                        break
            t = threading.Thread(target=stream)
            t.start()
            time.sleep(random.random() * 0.002)
            st.end()
            t.join()
        print("ok")
    """, MODEL=str(tiny_model_path), timeout=240)
    assert rc == 0 and "ok" in out, out


def test_batch_cancel_while_another_thread_steps(tiny_model_path):
    rc, out = run_script("""
        m = llamagen.Model(MODEL)
        c = llamagen.Context(m, n_ctx=4096, n_seq_max=4, n_threads=1)
        for it in range(60):
            bg = llamagen.BatchGenerator(c, n_parallel=4)
            ids = [bg.add("hello", max_new_tokens=200, ignore_eos=True, grammar="root ::= [a-z ]+")
                   for _ in range(4)]
            t = threading.Thread(target=lambda: [None for _ in bg])
            t.start()
            time.sleep(random.random() * 0.003)
            for i in ids:
                bg.cancel(i)
                bg.forget(i)
            t.join()
        print("ok")
    """, MODEL=str(tiny_model_path), timeout=240)
    assert rc == 0 and "ok" in out, out


def test_model_close_while_another_thread_uses_it(tiny_model_path):
    rc, out = run_script("""
        for it in range(30):
            m = llamagen.Model(MODEL)
            errors = []
            def use():
                try:
                    for _ in range(50):
                        m.tokenize("hello world " * 50)
                        m.detokenize(list(range(1, 200)))
                    llamagen.Context(m, n_ctx=128, n_threads=1).close()
                except llamagen.LlamaError as e:
                    errors.append(str(e))
            t = threading.Thread(target=use)
            t.start()
            time.sleep(random.random() * 0.003)
            m.close()
            t.join()
            assert all("closed" in e for e in errors), errors
        print("ok")
    """, MODEL=str(tiny_model_path), timeout=240)
    assert rc == 0 and "ok" in out, out


# -- lifetimes and construction ------------------------------------------------------------------

def test_objects_made_without_their_constructor_raise():
    st = llamagen.GenerationState.__new__(llamagen.GenerationState)
    with pytest.raises(LlamaError, match="gen_begin"):
        st.next()
    assert st.tokens == [] and st.end() == ""
    bg = llamagen.BatchGenerator.__new__(llamagen.BatchGenerator)
    with pytest.raises(LlamaError, match="not initialised"):
        bg.add("hi")
    with pytest.raises(LlamaError, match="not initialised"):
        bg.step()

    class Lazy(llamagen.BatchGenerator):
        def __init__(self):
            pass
    with pytest.raises(LlamaError, match="not initialised"):
        Lazy().step()


def test_a_vocab_only_model_tokenizes_but_makes_no_context(tiny_model_path):
    m = llamagen.Model(tiny_model_path, vocab_only=True)
    assert m.vocab_only and m.tokenize("hello")
    with pytest.raises(llamagen.ContextError, match="vocab_only"):
        llamagen.Context(m, n_ctx=64)
    m.close()


def test_thread_and_gpu_counts_are_bounded(ctx, tiny_model_path):
    for bad in (0, 4097, 100000, 2 ** 40):
        with pytest.raises(ValueError):
            ctx.set_n_threads(bad)
    with pytest.raises(ValueError):
        ctx.set_n_threads(1, 2 ** 40)
    with pytest.raises(TypeError):
        ctx.set_n_threads(True)
    ctx.set_n_threads(2)
    assert ctx.n_threads == 2
    ctx.set_n_threads(1)
    for bad in (2 ** 40, -2):
        with pytest.raises(ValueError):
            llamagen.Model(tiny_model_path, n_gpu_layers=bad)
    with pytest.raises(ValueError):
        llamagen.Model(tiny_model_path, main_gpu=2 ** 40)


# -- sampling windows and biases -----------------------------------------------------------------

@pytest.mark.parametrize("impl", ["fast", "llama.cpp"])
def test_penalty_windows_longer_than_the_context_are_the_context(ctx, impl):
    # llama.cpp allocates the whole window up front (2**31-1 entries aborted with bad_alloc);
    # a window longer than the context sees the same tokens as one of exactly n_ctx
    kw = dict(max_new_tokens=24, ignore_eos=True, seed=5, sampler_impl=impl)
    for name, extra in (("repeat_last_n", dict(repeat_penalty=1.3)),
                        ("dry_penalty_last_n", dict(dry_multiplier=0.8))):
        huge = llamagen.generate(ctx, "hello", **{name: 2 ** 31 - 1}, **extra, **kw)
        whole = llamagen.generate(ctx, "hello", **{name: -1}, **extra, **kw)
        exact = llamagen.generate(ctx, "hello", **{name: ctx.n_ctx_seq}, **extra, **kw)
        assert huge == whole == exact


def test_a_logit_bias_that_bans_every_token_is_refused(ctx):
    n = ctx.model.n_vocab
    with pytest.raises(ValueError, match="bans every token"):
        llamagen.generate(ctx, "hello", logit_bias={i: float("-inf") for i in range(n)})
    # all but one: that one is generated
    keep = 7
    out = llamagen.generate(ctx, "hello", max_new_tokens=3, ignore_eos=True, seed=1,
                            logit_bias={i: float("-inf") for i in range(n) if i != keep})
    assert out == ctx.model.detokenize([keep] * 3)


# -- text in, text out -------------------------------------------------------------------------

def test_chat_template_refuses_what_llama_cpp_would_cut(tiny_model):
    with pytest.raises(ValueError, match="NUL"):
        tiny_model.apply_chat_template([{"role": "user", "content": "keep\0lost"}], template="chatml")
    with pytest.raises(TypeError, match="template must be a str"):
        tiny_model.apply_chat_template([{"role": "user", "content": "x"}], template=5)
    assert "lost" in tiny_model.apply_chat_template([{"role": "user", "content": "keep lost"}],
                                                    template="chatml")


def test_token_sequences_are_checked(ctx, tiny_model):
    with pytest.raises(TypeError, match="bool"):
        tiny_model.detokenize([True])
    with pytest.raises(TypeError, match="sequence of token ids"):
        tiny_model.detokenize({1: 2})
    with pytest.raises(TypeError, match="prompt must be a str, bytes or a sequence"):
        llamagen.generate(ctx, None)
    with pytest.raises(TypeError, match="prompt must be a str, bytes or a sequence"):
        llamagen.generate(ctx, {1: 2, 3: 4})
    assert llamagen.generate(ctx, [1, 2, 3], max_new_tokens=2, seed=1) == \
        llamagen.generate(ctx, (1, 2, 3), max_new_tokens=2, seed=1)


# -- quantize ----------------------------------------------------------------------------------

def test_quantize_never_replaces_a_special_file(tiny_model_path, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        llamagen.quantize(tiny_model_path, fifo, "Q8_0")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    link = tmp_path / "link"
    os.symlink(fifo, link)
    with pytest.raises(ValueError, match="not a regular file"):
        llamagen.quantize(tiny_model_path, link, "Q8_0")


def test_quantize_refuses_a_nul_in_a_path(tiny_model_path, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    with pytest.raises(ValueError, match="NUL"):
        llamagen.quantize(tiny_model_path, str(victim) + "\0.gguf", "Q8_0")
    assert victim.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["victim"]


def test_quantize_refuses_a_gguf_without_tensors(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "empty.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(llamagen.ModelLoadError, match="no tensors"):
        llamagen.quantize(path, tmp_path / "out.gguf", "Q8_0")
    assert not (tmp_path / "out.gguf").exists()
