"""Scoring over HTTP (issue 29, section 2): ``prompt_logprobs`` in batches and the engine, OpenAI's
``echo`` + ``logprobs`` on /v1/completions, the tokenizer routes lm-eval's remote tokenizer uses,
and lm-eval's own ``local-completions`` model on a local multiple-choice task.

The reference is ``llamagen.score``: the prompt rows of a ``prompt_logprobs`` sequence are computed
as score computes them (the whole prompt in chunks, no prompt cache), so one text alone gives
bit-equal numbers."""
from __future__ import annotations

import json
import math

import httpx
import pytest

import llamagen
from llamagen import BatchGenerator, Context
from llamagen.engine import AsyncEngine

from server_util import serving

TEXTS = ["The capital of France is Paris.", "One two three four five six seven eight nine ten",
         "xxx hello", "word " * 300]         # (the last is longer than one decode's 128 rows)


@pytest.fixture(scope="module")
def ctx(real_model):
    c = Context(real_model, n_ctx=2048, n_seq_max=4, kv_unified=True)
    yield c
    c.close()


def _run(b, sid):
    while b.finish_reason(sid) is None:
        b.step()


@pytest.mark.parametrize("max_new", [0, 1, 4])
def test_batch_prompt_logprobs_equal_score(ctx, max_new):
    for t in TEXTS:
        [ref] = llamagen.score(ctx, [t], top_logprobs=2)
        b = BatchGenerator(ctx, n_parallel=2, prompt_cache=True)
        sid = b.add(t, max_new_tokens=max_new, temp=0, prompt_logprobs=2)
        _run(b, sid)
        got = b.prompt_logprobs(sid)
        assert [x.token for x in got] == ref.tokens
        assert got[0].logprob is None and ref.logprobs[0] is None
        assert [x.logprob for x in got[1:]] == ref.logprobs[1:], t       # bit-equal
        assert [x.top for x in got[1:]] == [tuple(r) for r in ref.top[1:]]
        assert len(b.tokens(sid)) == max_new and b.finish_reason(sid) == "length"
        assert b.n_cached(sid) == 0


def test_prompt_logprobs_are_not_served_from_the_prompt_cache(ctx):
    t = TEXTS[0]
    [ref] = llamagen.score(ctx, [t])
    b = BatchGenerator(ctx, n_parallel=2, prompt_cache=True)
    _run(b, b.add(t, max_new_tokens=3, temp=0))          # its cells stay cached
    sid = b.add(t, max_new_tokens=2, temp=0, prompt_logprobs=0)
    _run(b, sid)
    assert b.n_cached(sid) == 0
    assert [x.logprob for x in b.prompt_logprobs(sid)[1:]] == pytest.approx(ref.logprobs[1:], abs=1e-4)
    # a plain request after it still uses the cache
    sid = b.add(t, max_new_tokens=2, temp=0)
    _run(b, sid)
    assert b.n_cached(sid) > 0 and b.prompt_logprobs(sid) is None


def test_prompt_logprobs_mixed_with_plain_sequences(ctx):
    # scoring rows and generating rows share decodes; the generated texts keep working
    refs = llamagen.score(ctx, TEXTS[:3])
    b = BatchGenerator(ctx, n_parallel=4)
    plain = b.add("Once upon a time", max_new_tokens=20, temp=0)
    sids = [b.add(t, max_new_tokens=1, temp=0, prompt_logprobs=0) for t in TEXTS[:3]]
    for _ in b:
        pass
    assert len(b.tokens(plain)) == 20
    for sid, ref in zip(sids, refs):
        got = [x.logprob for x in b.prompt_logprobs(sid)[1:]]
        assert max(abs(a - r) for a, r in zip(got, ref.logprobs[1:])) < 0.3   # (batch variance)


def test_prompt_logprobs_bad_values(ctx):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llamagen.SamplingParams(prompt_logprobs=21)
    with pytest.raises(TypeError, match="prompt_logprobs"):
        llamagen.SamplingParams(prompt_logprobs=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        llamagen.SamplingParams(max_new_tokens=0)             # 0 only with prompt_logprobs
    with pytest.raises(ValueError, match="llamagen.score"):
        llamagen.generate(ctx, "hi", prompt_logprobs=1)        # one text: score()
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llamagen.SamplingParams(prompt_logprobs=1, sampler_impl="backend")


def test_engine_prompt_logprobs(real_model, ctx):
    [ref] = llamagen.score(ctx, [TEXTS[1]], top_logprobs=1)
    with AsyncEngine(real_model, n_ctx=2048, n_parallel=2) as e:
        r = e.generate_sync(TEXTS[1], max_new_tokens=0, prompt_logprobs=1)
        assert r.tokens == [] and r.finish_reason == "length"
        assert len(r.prompt_logprobs) == r.usage.prompt_tokens == len(ref.tokens)
        assert r.prompt_logprobs[0].logprob is None
        assert [x.logprob for x in r.prompt_logprobs[1:]] == pytest.approx(ref.logprobs[1:], abs=1e-4)
        r2 = e.generate_sync(TEXTS[1], max_new_tokens=3, n=2, temp=0.9, seed=1, prompt_logprobs=1,
                             logprobs=0)
        # (two choices prefill side by side: their rows are computed together, batch variance)
        assert [x.logprob for x in r2.prompt_logprobs[1:]] == \
            pytest.approx([x.logprob for x in r.prompt_logprobs[1:]], abs=0.3)
        assert all(len(c.logprobs) == len(c.tokens) == 3 for c in r2.choices)
        # streamed: each choice's first chunk carries them
        firsts = {}
        for c in e.stream_sync(TEXTS[1], max_new_tokens=2, n=2, prompt_logprobs=0):
            firsts.setdefault(c.index, c)
        assert all(c.prompt_logprobs is not None for c in firsts.values())


# -- the server ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def srv(tmp_path_factory, real_model_path):
    yield from serving(tmp_path_factory, "scoring", real_model_path, "--parallel", "2",
                       "--ctx-size", "2048")


def _post(srv, path, body):
    return httpx.post(srv.url + path, json=body, timeout=120)


def test_echo_logprobs_max_tokens_0_is_the_prompt_scored(srv, real_model, ctx):
    text = TEXTS[0]
    r = _post(srv, "/v1/completions", {"prompt": text, "echo": True, "logprobs": 2, "max_tokens": 0})
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert c["text"] == text and c["finish_reason"] == "length"
    lp = c["logprobs"]
    [ref] = llamagen.score(ctx, [text], top_logprobs=2)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(ref.logprobs[1:], abs=1e-4)
    assert lp["tokens"] == [real_model.token_to_piece(t, special=True).decode() for t in ref.tokens]
    assert all(len(t) <= 3 and max(t.values()) <= 0 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert r.json()["usage"]["completion_tokens"] == 0


def test_echo_with_tokens_and_lists_of_prompts(srv, real_model):
    ids = real_model.tokenize("Hello world, this is", add_special=True)
    ids2 = real_model.tokenize("Paris is", add_special=True)
    body = {"prompt": [ids, ids2], "echo": True, "logprobs": 0, "max_tokens": 1, "temperature": 0}
    r = _post(srv, "/v1/completions", body)
    assert r.status_code == 200, r.text
    a, b = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert a["text"].startswith(real_model.detokenize(ids))
    assert b["text"].startswith(real_model.detokenize(ids2))
    # prompt tokens + the generated token, as lm-eval reads them
    for c, p in ((a, ids), (b, ids2)):
        assert len(c["logprobs"]["token_logprobs"]) == len(p) + 1
        assert all(x is not None for x in c["logprobs"]["token_logprobs"][1:])
    r = _post(srv, "/v1/completions", dict(body, prompt=["Hello world, this is", "Paris is"]))
    assert [len(c["logprobs"]["tokens"]) for c in r.json()["choices"]] == [len(ids) + 1, len(ids2) + 1]
    # echo without logprobs: the text only
    r = _post(srv, "/v1/completions", {"prompt": "Paris is", "echo": True, "max_tokens": 2})
    c = r.json()["choices"][0]
    assert c["text"].startswith("Paris is") and c["logprobs"] is None


def test_echo_streamed(srv):
    body = {"prompt": "Paris is", "echo": True, "logprobs": 1, "max_tokens": 3, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    texts = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert texts.startswith("Paris is")
    first = events[0]["choices"][0]
    assert first["text"].startswith("Paris is") and first["logprobs"]["token_logprobs"][0] is None
    plain = _post(srv, "/v1/completions", {"prompt": "Paris is", "max_tokens": 3, "temperature": 0})
    assert texts == "Paris is" + plain.json()["choices"][0]["text"]


def test_max_tokens_0_without_echo_is_still_a_400(srv):
    r = _post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_tokenizer_routes_in_vllm_shape(srv, real_model):
    info = httpx.get(srv.url + "/tokenizer_info").json()
    assert info["bos_token"] == "<bos>" and info["eos_token"] == "<eos>"
    r = _post(srv, "/tokenize", {"prompt": "<bos>hello", "add_special_tokens": False}).json()
    assert r["tokens"] == real_model.tokenize("<bos>hello", add_special=False, parse_special=True)
    assert r["tokens"][0] == real_model.bos and r["count"] == len(r["tokens"])
    r = _post(srv, "/tokenize", {"prompt": "hello"}).json()          # vLLM adds BOS by default
    assert r["tokens"][0] == real_model.bos
    r = _post(srv, "/tokenize", {"content": "hello"}).json()         # llama-server's shape: not
    assert r["tokens"] == real_model.tokenize("hello", add_special=False)
    assert _post(srv, "/tokenize", {}).status_code == 400
    assert _post(srv, "/tokenize", {"content": "a", "prompt": "b"}).status_code == 400
    d = _post(srv, "/detokenize", {"tokens": r["tokens"]}).json()
    assert d["prompt"] == d["content"] == "hello"


# -- lm-eval ---------------------------------------------------------------------------------------

QUESTIONS = [
    ("The capital of France is", [" Paris", " Berlin", " Madrid"], 0),
    ("Two plus two equals", [" five", " four", " seven"], 1),
    ("The sky on a clear day is", [" green", " blue", " red"], 1),
    ("Water freezes at zero degrees", [" Celsius", " Kelvin", " Banana"], 0),
    ("The opposite of hot is", [" cold", " loud", " tall"], 0),
    ("Monday, Tuesday,", [" Sunday", " Wednesday", " March"], 1),
]


def test_lm_eval_local_completions_matches_score(srv, real_model, ctx, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for q, c, a in QUESTIONS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.yaml").write_text(f"""task: llamagen_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""")
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": srv.url + "/v1/completions", "model": "m",
                    "tokenizer_backend": "remote", "tokenized_requests": True, "max_length": 2048},
        tasks=["llamagen_mc"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        log_samples=True, num_fewshot=0)
    samples = out["samples"]["llamagen_mc"]
    assert len(samples) == len(QUESTIONS)
    # the same numbers from llamagen.score: context and choice tokenized as lm-eval did (no
    # special tokens), the choice's logprobs summed
    right = 0
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        q, choices, answer = QUESTIONS[s["doc_id"]]
        ctx_ids = real_model.tokenize(q, add_special=False, parse_special=True)
        lls = []
        for choice in choices:
            ids = ctx_ids + real_model.tokenize(choice, add_special=False, parse_special=True)
            [ref] = llamagen.score(ctx, [ids])
            lls.append(math.fsum(ref.logprobs[len(ctx_ids):]))
        got = [r[0][0] for r in s["resps"]]
        assert got == pytest.approx(lls, abs=1e-3), (q, got, lls)
        right += max(range(len(lls)), key=lls.__getitem__) == answer
    assert out["results"]["llamagen_mc"]["acc,none"] == pytest.approx(right / len(QUESTIONS))
