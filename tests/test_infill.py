"""Fill-in-the-middle (issue 29, section 6): llamagen.infill lays the prompt out as llama-server's
/infill does, and ``llamagen serve``'s /infill answers in llama-server's shape, streamed and not.
Neither real model has FIM tokens (SmolLM2 has StarCoder's <file_sep> and <repo_name> only), so a
tiny model written here carries <fim_prefix>, <fim_suffix>, <fim_middle>, <file_sep> and
<repo_name> as control tokens, which llama.cpp finds by name."""
from __future__ import annotations

import json

import httpx
import pytest

import llamagen
from llamagen import infill

from server_util import serving

PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\nprint(add(1, 2))\n"
EXTRA = [{"filename": "util.py", "text": "def sub(a, b):\n    return a - b\n"}]


FIM = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", "<repo_name>")


@pytest.fixture(scope="module")
def fim_path(make_tiny_model):
    return make_tiny_model(control_tokens=FIM)


@pytest.fixture(scope="module")
def smol(fim_path):
    m = llamagen.Model(fim_path)
    yield m
    m.close()


def test_fim_tokens_layout(smol):
    t = smol.fim_tokens
    assert None not in (t["pre"], t["suf"], t["mid"])
    toks = infill.fim_tokens(smol, PREFIX, SUFFIX, extra=EXTRA, prompt="return")
    pre, suf, mid = toks.index(t["pre"]), toks.index(t["suf"]), toks.index(t["mid"])
    assert pre < suf < mid == len(toks) - 1
    # prefix, then the prompt, then the suffix, as text (each tokenized alone: the tiny model's
    # SPM tokenizer may give a piece a leading space)
    first = smol.detokenize(toks[pre + 1:suf])
    assert first.lstrip().startswith(PREFIX.strip()) and first.endswith("return")
    assert SUFFIX.strip() in smol.detokenize(toks[suf + 1:mid])
    # the extra file comes first, behind the file separator token, or llama-server's text
    # separator where the model has none (llama.cpp finds no FIM_SEP in "<file_sep>" here)
    head = smol.detokenize(toks[:pre])
    if t["sep"] is None:
        assert "--- snippet ---" in head and "def sub(a, b):" in head
    else:
        assert "util.py" in head and "def sub(a, b):" in head
    spm = infill.fim_tokens(smol, PREFIX, SUFFIX, spm=True)
    assert spm.index(t["suf"]) < spm.index(t["pre"])
    # a long prefix keeps its end (3/4 of a batch), a long suffix its start
    long = infill.fim_tokens(smol, "x = 1\n" * 2000, "y = 2\n" * 2000, n_batch=64)
    assert long.index(t["suf"]) - long.index(t["pre"]) - 1 == 48
    assert long.index(t["mid"]) - long.index(t["suf"]) - 1 == 64 // 4 - 2


def test_a_model_without_fim_tokens(real_model):
    assert not infill.supports_infill(real_model)
    with pytest.raises(ValueError, match="fill-in-the-middle"):
        infill.fim_tokens(real_model, "a", "b")


def test_generation_from_the_fim_prompt(smol):  # (a tiny random model: any text)
    with llamagen.Context(smol, n_ctx=1024) as ctx:
        toks = infill.fim_tokens(smol, PREFIX, SUFFIX)
        st = llamagen.gen_begin(ctx, toks, max_new_tokens=12, temp=0, ignore_eos=True)
        "".join(st)
        assert len(st.tokens) == 12


@pytest.fixture(scope="module")
def srv(fim_path, tmp_path_factory):
    yield from serving(tmp_path_factory, "infill", fim_path, "--ctx-size", 2048,
                       "--parallel", 2)


def test_infill_route_streamed_and_not(srv, smol):
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": EXTRA,
            "n_predict": 12, "temperature": 0}
    r = httpx.post(srv.url + "/infill", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["stop"] is True and out["stop_type"] in ("eos", "limit")
    assert 0 < out["tokens_predicted"] <= 12
    toks = infill.fim_tokens(smol, PREFIX, SUFFIX, extra=EXTRA, n_batch=512, n_predict=12,
                             n_ctx=2048)
    assert out["tokens_evaluated"] == len(toks)
    with llamagen.Context(smol, n_ctx=2048) as ctx:
        assert out["content"] == llamagen.generate(ctx, toks, max_new_tokens=12, temp=0)
    with httpx.stream("POST", srv.url + "/infill", json=dict(body, stream=True), timeout=120) as s:
        lines = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: ")]
    assert lines[-1]["stop"] is True and all(not x["stop"] for x in lines[:-1])
    assert "".join(x["content"] for x in lines) == out["content"]


@pytest.mark.parametrize("body, param", [
    ({"input_suffix": "x"}, "input_prefix"),
    ({"input_prefix": "x", "input_suffix": "y", "input_extra": [{"filename": "a"}]}, "input_extra[0]"),
    ({"input_prefix": "x", "input_suffix": "y", "n_predict": -3}, "n_predict"),
])
def test_bad_infill_requests(srv, body, param):
    r = httpx.post(srv.url + "/infill", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_infill_on_a_model_without_fim_tokens_is_501(real_model_path, tmp_path_factory):
    gen = serving(tmp_path_factory, "nofim", real_model_path, "--ctx-size", 512, "--parallel", 1)
    s = next(gen)
    try:
        r = httpx.post(s.url + "/infill", json={"input_prefix": "a", "input_suffix": "b"}, timeout=60)
        assert r.status_code == 501 and "fill-in-the-middle" in r.json()["error"]["message"]
    finally:
        next(gen, None)
