"""Speculative decoding (issue 28): llama.cpp's n-gram drafters, verified by one decode, each
position sampled by the request's own chain.  Identity with plain decoding is asserted on
deterministic contexts (batch-invariant kernels: a k-token verify batch computes each row as a
single-token decode would); on default contexts the verify batch may round differently (batch
variance, docs/speculative.md), so those tests compare streams with whole generations.  Every
identity test also asserts that drafts were accepted: a test whose drafts all failed would only
check plain decoding."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import httpx
import pytest

import llamagen
from llamagen import AsyncEngine, InvalidParamError, SamplingParams, Speculative
from llamagen.errors import InvalidParamTypeError

from server_util import serving

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAGRAPH = ("The quick brown fox jumps over the lazy dog. The committee met on Tuesday to discuss "
             "the annual budget, which had grown by twelve percent since last year. Several members "
             "raised concerns about the cost of the new library wing.")
# llama.cpp's defaults look for 12- to 24-token matches: shorter n-grams suit these short texts
SIMPLE = Speculative(type="ngram-simple", ngram_n=4, ngram_m=16)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    with llamagen.Model(smollm2_path) as m:
        yield m


@pytest.fixture(scope="module")
def det_ctx(smollm2):
    with llamagen.Context(smollm2, n_ctx=2048, n_seq_max=4, kv_unified=True,
                          deterministic=True) as ctx:
        yield ctx


@pytest.fixture(scope="module")
def plain_ctx(smollm2):
    with llamagen.Context(smollm2, n_ctx=2048) as ctx:
        yield ctx


def copy_prompt(model, text=PARAGRAPH):
    return model.render_chat([{"role": "user", "content":
                               f"Repeat the following text exactly, word for word:\n\n{text}"}])


def run(ctx, prompt, **kw):
    st = llamagen.gen_begin(ctx, prompt, **kw)
    chunks = list(st)
    text = "".join(chunks) + st.end()
    return text, st.tokens, chunks, st


# -- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize("value,field", [
    (dict(type="ngram-nope"), "speculative.type"),
    (dict(type="draft-simple"), "speculative.draft_model"),
    (dict(type="ngram-mod", draft_model=object()), "speculative.draft_model"),
    (dict(type="draft-eagle3"), "speculative.type"),
    (dict(n_max=0), "speculative.n_max"),
    (dict(n_max=65), "speculative.n_max"),
    (dict(n_max=4, n_min=5), "speculative.n_min"),
    (dict(ngram_n=-1), "speculative.ngram_n"),
    (dict(type="ngram-mod", ngram_n=1), "speculative.ngram_n"),
    (dict(bogus=1), "speculative.bogus"),
    (dict(exact=1), "speculative.exact"),
])
def test_a_bad_configuration_names_its_field(value, field):
    with pytest.raises(InvalidParamError) as e:
        SamplingParams(speculative=value)
    assert e.value.field == field
    if value.get("type") == "draft-simple":
        assert "draft_model" in str(e.value)


def test_configuration_types_and_forms():
    with pytest.raises(InvalidParamTypeError) as e:
        SamplingParams(speculative=3)
    assert e.value.field == "speculative"
    with pytest.raises(InvalidParamTypeError):
        Speculative(n_max="4")
    assert SamplingParams(speculative="ngram-cache").speculative == Speculative(type="ngram-cache")
    assert SamplingParams(speculative="none").speculative is None
    assert SamplingParams(speculative={"type": "ngram-simple", "n_max": 4}).speculative.n_max == 4
    assert Speculative().exact is True          # (verify decodes give plain decoding's logits)
    assert SamplingParams(speculative={"type": "ngram-simple", "exact": False}).speculative.exact is False
    with pytest.raises(InvalidParamError) as e:
        SamplingParams(speculative="ngram-mod", sampler_impl="backend")
    assert e.value.field == "speculative"
    assert SamplingParams(speculative=SIMPLE).to_dict()["speculative"]["ngram_n"] == 4


# -- one stream ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [SIMPLE, Speculative(type="ngram-cache"),
                                  Speculative(type="ngram-mod", ngram_n=8),
                                  Speculative(type="ngram-map-k4v", ngram_n=4, ngram_m=16)],
                         ids=lambda s: s.type)
def test_greedy_speculative_equals_plain_with_drafts_accepted(det_ctx, smollm2, spec):
    prompt = copy_prompt(smollm2)
    text, toks, _, _ = run(det_ctx, prompt, max_new_tokens=80, temp=0)
    stext, stoks, chunks, st = run(det_ctx, prompt, max_new_tokens=80, temp=0, speculative=spec)
    assert (stext, stoks) == (text, toks)
    stats = st.speculative_stats
    assert stats["accepted"] > 10, stats
    assert stats["verify_steps"] > 0 and 0 < stats["acceptance_rate"] <= 1
    # accepted tokens come several to a step
    assert len(chunks) < len(stoks)
    assert st.timings["n_tokens"] == len(stoks)


def test_seeded_sampling_speculative_equals_plain(det_ctx, smollm2):
    prompt = copy_prompt(smollm2)
    kw = dict(max_new_tokens=80, temp=0.7, top_k=40, top_p=0.95, seed=11, repeat_penalty=1.05)
    text, toks, _, _ = run(det_ctx, prompt, **kw)
    # (adaptive=False: how much is drafted, so accepted, does not depend on measured timings)
    fixed = Speculative(type="ngram-simple", ngram_n=4, ngram_m=16, adaptive=False)
    stext, stoks, _, st = run(det_ctx, prompt, speculative=fixed, **kw)
    assert (stext, stoks) == (text, toks)
    assert st.speculative_stats["accepted"] > 10
    other, _, _, _ = run(det_ctx, prompt, **dict(kw, seed=12, temp=1.5))
    assert other != text          # (the seed matters: this is sampling, not greedy)


def test_logprobs_with_speculation_equal_plain(det_ctx, smollm2):
    prompt = copy_prompt(smollm2)
    _, toks, _, a = run(det_ctx, prompt, max_new_tokens=40, temp=0, logprobs=3)
    _, stoks, _, b = run(det_ctx, prompt, max_new_tokens=40, temp=0, logprobs=3, speculative=SIMPLE)
    assert stoks == toks and b.speculative_stats["accepted"] > 0
    assert [(x.token, x.logprob, [t.token for t in x.top]) for x in a.logprobs] == \
        [(x.token, x.logprob, [t.token for t in x.top]) for x in b.logprobs]


def test_stream_equals_generate_on_a_default_context(plain_ctx, smollm2):
    prompt = copy_prompt(smollm2)
    text = llamagen.generate(plain_ctx, prompt, max_new_tokens=80, temp=0.5, seed=5,
                             speculative=SIMPLE)
    stext, stoks, chunks, st = run(plain_ctx, prompt, max_new_tokens=80, temp=0.5, seed=5,
                                   speculative=SIMPLE)
    assert stext == text
    assert st.speculative_stats["accepted"] > 0 and len(chunks) < len(stoks)
    for c in chunks:
        c.encode("utf-8")           # whole characters in every chunk


def test_a_single_stream_drafts_what_its_measured_costs_pay_for():
    # _spec_plan: the draft length a single stream picks from decode times it measured
    plan = llamagen._core._spec_plan
    # only 1- and 2-row decodes timed, the second row as dear as the first (gemma3 on a 2-core
    # EPYC): longer drafts are priced by the optimistic prior (a tenth of a step per row), so a
    # well-accepted stream tries them and learns their cost instead of staying at 1 token
    k, cost = plan({1: 10_000, 2: 20_000}, 0.95, 16)
    assert k == 16 and cost[:2] == [10_000, 20_000]
    assert cost[16] == pytest.approx(20_000 + 1_000 * 15)
    # 17 rows measured at 5 steps: long drafts still pay
    k, _ = plan({1: 10_000, 2: 20_000, 17: 50_000}, 0.95, 16)
    assert k >= 12
    # 17 rows measured at 17 steps (no multi-row kernel): nothing pays; sizes between two
    # measured ones lie on the line through them
    k, cost = plan({1: 10_000, 2: 20_000, 17: 170_000}, 0.95, 16)
    assert k == 0 and cost[8] == pytest.approx(90_000)
    # cheap rows, low acceptance: a short draft
    k, _ = plan({1: 10_000, 17: 30_000}, 0.3, 16)
    assert k == 1
    # nothing timed yet: the prior alone, in units of a one-row decode
    k, cost = plan({}, 0.5, 4)
    assert cost == pytest.approx([1.0, 1.1, 1.2, 1.3, 1.4]) and k == 2
    # a size's first decode is often its slowest (a fresh context's first 17-row verify: 80-84
    # ms, later ones 68-71): it counts at no more than the line through the two largest measured
    # sizes says, so the size is tried again (as measured, 17 rows at 90 ms would have kept
    # drafts at 12 for good)
    times = {1: 10_000, 9: 36_000, 13: 45_000}
    k, cost = plan(times, 0.99, 16, firsts={17: 90_000})
    assert k == 16 and cost[16] == pytest.approx(54_000)
    assert plan({**times, 17: 90_000}, 0.99, 16)[0] == 12
    # ... a first decode cheaper than that counts as measured
    k, cost = plan(times, 0.99, 16, firsts={17: 50_000})
    assert cost[16] == 50_000
    # ... between two measured sizes, the line through them
    k, cost = plan(times, 0.99, 16, firsts={11: 60_000})
    assert cost[10] == pytest.approx(40_500)
    # ... and never the optimistic prior (a tenth of a step per row past the largest: a batch's
    # many sizes, each first stored at it, ratcheted the curve down and drafted 2x the rows at
    # 0.68x plain)
    k, cost = plan({1: 10_000, 13: 40_000}, 0.99, 16)
    assert cost[16] == pytest.approx(44_000)
    k, cost = plan({1: 10_000, 13: 40_000}, 0.99, 16, firsts={17: 60_000})
    assert cost[16] == pytest.approx(50_000)


def test_acceptance_is_counted_by_position_in_a_run_of_accepted_drafts():
    # _spec_runs: a sequence's acceptance model after verified (drafted, accepted) outcomes
    runs = llamagen._core._spec_runs
    # nothing verified: every position at the prior rate (1 + 0) / (0 + 0 + 2)
    off, h, _ = runs([])
    assert off == 0 and h == pytest.approx([0.5] * 16)
    # gemma3 copying code lines: drafts of 12, the first 8 accepted, every time; a geometric rate
    # (0.89 here) would have every position alike, the counts put the break at the 9th token
    times = {1: 10_000, 8: 37_000, 9: 39_000, 13: 57_000}
    off, h, k = runs([(12, 8)] * 5, times)
    assert off == 0
    assert min(h[:8]) > 0.85 and h[8] < 0.3
    assert k == 8                 # the whole line and no more (12 rows cost what 8 tokens save)
    # the same line drafted 7 long, all accepted: the run goes on at position 8 (7 drafted, then
    # the token sampled past them), where drafts fail: the next step drafts nothing
    off, h, k = runs([(12, 8)] * 5 + [(7, 7)], times)
    assert off == 8 and h[0] < 0.3 and k == 0
    # a long copy: whole drafts accepted carry the run on; positions past the counted ones share
    # the last count
    off, h, k = runs([(16, 16)] * 6, times)
    assert off == 6 * 17 and min(h) > 0.9 and k == 16
    # a rejection ends the run
    off, _, _ = runs([(16, 16), (16, 3)])
    assert off == 0


def test_a_context_remembers_what_its_last_stream_learned(smollm2):
    # decode costs are the hardware's and the model's: a new stream on the same context starts
    # with them; acceptance is the text's: carried at half weight
    learned = llamagen._core._spec_learned
    with llamagen.Context(smollm2, n_ctx=2048, deterministic=True) as ctx:
        assert learned(ctx) is None
        prompt = copy_prompt(smollm2)
        plain, _, _, _ = run(ctx, prompt, max_new_tokens=60, temp=0)
        assert learned(ctx) is None                 # (no drafting: nothing learned)
        _, _, _, first = run(ctx, prompt, max_new_tokens=60, temp=0, speculative=SIMPLE)
        assert first.speculative_stats["accepted"] > 10
        mem = learned(ctx)
        assert mem == learned(first)
        assert 1 in mem["rows"] and max(mem["rows"]) > 2 and mem["accepted"] > 2
        st = llamagen.gen_begin(ctx, prompt, max_new_tokens=60, temp=0, speculative=SIMPLE)
        got = learned(st)                           # (before its first step)
        assert got["rows"] == pytest.approx(mem["rows"])
        assert got["accepted"] == pytest.approx(mem["accepted"] / 2)
        assert got["cut_short"] == pytest.approx(mem["cut_short"] / 2)
        # what it carried changes how much it drafts, never the text (a deterministic context:
        # verify batches round as single rows do)
        assert "".join(st) + st.end() == plain
        mem = learned(ctx)
        assert learned(llamagen.gen_begin(ctx, prompt, max_new_tokens=4)) is None
        # another drafter starts afresh (its acceptance and step costs are its own), and what
        # the context remembers is then that drafter's
        other_kind = Speculative(type="ngram-simple", ngram_n=3, ngram_m=16)
        fresh = llamagen.gen_begin(ctx, prompt, max_new_tokens=60, temp=0, speculative=other_kind)
        assert learned(fresh) == {"rows": {}, "accepted": 0, "cut_short": 0}
        assert "".join(fresh) + fresh.end() == plain
        assert learned(ctx) == learned(fresh) != mem
        # ... while the first drafter's is kept for its next stream
        again = llamagen.gen_begin(ctx, prompt, max_new_tokens=60, temp=0, speculative=SIMPLE)
        assert learned(again)["accepted"] == pytest.approx(mem["accepted"] / 2)
        assert "".join(again) + again.end() == plain
    with llamagen.Context(smollm2, n_ctx=2048) as other:
        assert learned(other) is None               # (per context)


def test_a_batch_carries_acceptance_to_its_next_sequence(smollm2):
    # a BatchGenerator's new sequence starts from what its latest verified sequence knew, at
    # half weight (the server's sequences are a batch's)
    learned = llamagen._core._spec_batch_learned
    prompt = copy_prompt(smollm2)
    with llamagen.Context(smollm2, n_ctx=2048, deterministic=True) as ctx:
        plain = llamagen.generate(ctx, prompt, max_new_tokens=60, temp=0)
        b = llamagen.BatchGenerator(ctx)
        assert learned(b) is None
        first = b.add(prompt, max_new_tokens=60, temp=0, speculative=SIMPLE)
        while len(b):
            b.step()
        assert b.speculative_stats(first)["accepted"] > 10
        mem = learned(b)
        assert mem is not None and mem["accepted"] > 2
        second = b.add(prompt, max_new_tokens=60, temp=0, speculative=SIMPLE)
        text = "".join(c for _, c in b.step())      # (admitted and prefilled: nothing verified)
        got = learned(b, second)
        assert got["accepted"] == pytest.approx(mem["accepted"] / 2)
        assert got["cut_short"] == pytest.approx(mem["cut_short"] / 2)
        while len(b):
            text += "".join(c for _, c in b.step())
        assert text == plain                        # (what it carried never changes the text)
        # the next BatchGenerator on the context (a pipeline's next map_generate) starts from
        # the batch's step costs (the model's and the machine's) and from the acceptance its
        # drafter last had there; so does a single stream drafting the same way
        curve = learned(b, "curve")
        mem = learned(b)
        assert len(curve) >= 2
        b2 = llamagen.BatchGenerator(ctx)
        assert learned(b2, "curve") == curve
        third = b2.add(prompt, max_new_tokens=60, temp=0, speculative=SIMPLE)
        text = "".join(c for _, c in b2.step())
        assert learned(b2, third)["accepted"] == pytest.approx(mem["accepted"] / 2)
        while len(b2):
            text += "".join(c for _, c in b2.step())
        assert text == plain and b2.speculative_stats(third)["accepted"] > 10
        st = llamagen.gen_begin(ctx, prompt, max_new_tokens=60, temp=0, speculative=SIMPLE)
        got = llamagen._core._spec_learned(st)
        assert got["accepted"] == pytest.approx(learned(b2)["accepted"] / 2)
        assert "".join(st) + st.end() == plain


def test_a_batch_drafts_the_rows_its_measured_steps_pay_for():
    # _spec_plan_step: draft lengths of one step, from step times by rows and each sequence's
    # decayed (accepted, cut short) counts; the best-accepted drafts are taken first
    plan = llamagen._core._spec_plan_step
    good, poor = (20.0, 0.0), (0.0, 50.0)
    # 8 sequences, rows nearly free past the step's fixed part: the well-accepted draft long,
    # the poorly accepted ones not at all
    ks = plan({8: 40_000, 40: 48_000}, [good + (16,)] + [poor + (16,)] * 7)
    assert ks[0] == 16 and ks[1:] == [0] * 7
    # rows that cost what a sequence's share of the step costs, up to every draft measured:
    # nothing pays
    ks = plan({8: 40_000, 136: 680_000}, [good + (16,)] * 8)
    assert ks == [0] * 8
    # the first rows cheap, later ones dear: the same sequences draft a little, alike
    ks = plan({8: 40_000, 24: 60_000, 40: 120_000, 136: 600_000}, [good + (16,)] * 8)
    assert max(ks) - min(ks) <= 1 and 0 < min(ks) and max(ks) < 16, ks
    # sizes past the largest measured one are priced optimistically: tried, then learned
    ks = plan({8: 40_000, 40: 200_000}, [good + (16,)] * 8)
    assert min(ks) >= 8, ks
    # a many-row step is drafted up to a multiple of 4 rows (ggml-cpu's many-row kernels work in
    # tiles of 4 rows and take the rest row by row: gemma3, 12 rows cost less than 9): here 11
    # rows would look best, and 16 are taken
    ks = plan({8: 40_000, 11: 44_000, 12: 60_000, 16: 66_000, 136: 700_000}, [good + (16,)] * 8)
    assert sum(ks) == 8, ks
    # a sequence with nothing left to draft takes no rows
    assert plan({8: 40_000, 40: 44_000}, [good + (0,)] * 2) == [-1, -1]


def test_stop_strings_and_max_new_tokens_stay_exact(det_ctx, smollm2):
    prompt = copy_prompt(smollm2)
    full, _, _, _ = run(det_ctx, prompt, max_new_tokens=80, temp=0)
    stop = "budget"
    assert stop in full
    for kw in (dict(stop=[stop]), dict(stop=["twelve per"]), dict(max_new_tokens=23),
               dict(max_new_tokens=1)):
        kw = dict(dict(max_new_tokens=80, temp=0), **kw)
        a, at, _, sa = run(det_ctx, prompt, **kw)
        b, bt, _, sb = run(det_ctx, prompt, speculative=SIMPLE, **kw)
        assert (b, bt, sb.finish_reason) == (a, at, sa.finish_reason), kw
        if "stop" in kw:
            assert sb.finish_reason == "stop" and kw["stop"][0] not in b
        else:
            assert len(bt) == kw["max_new_tokens"]
    # drafts were accepted on the way to the stop string
    _, _, _, s = run(det_ctx, prompt, speculative=SIMPLE, max_new_tokens=80, temp=0, stop=["twelve"])
    assert s.speculative_stats["accepted"] > 0


def test_grammar_with_speculation(det_ctx, smollm2):
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    prompt = smollm2.render_chat([{"role": "user", "content":
                                   f"Put this text in a JSON object under \"text\":\n\n{PARAGRAPH}"}])
    kw = dict(max_new_tokens=96, temp=0, json_schema=schema)
    a, at, _, _ = run(det_ctx, prompt, **kw)
    b, bt, _, st = run(det_ctx, prompt, speculative=SIMPLE, **kw)
    assert (b, bt) == (a, at)
    assert st.speculative_stats["accepted"] > 0, st.speculative_stats
    json.loads(b)


def test_open_ended_text_drafts_little(det_ctx, smollm2):
    """Adaptive: wrong drafts shrink the draft length and pause drafting."""
    prompt = smollm2.render_chat([{"role": "user", "content": "Write a poem about the sea."}])
    a, at, _, _ = run(det_ctx, prompt, max_new_tokens=96, temp=0)
    b, bt, _, st = run(det_ctx, prompt, max_new_tokens=96, temp=0,
                       speculative=Speculative(type="ngram-simple", ngram_n=2, ngram_m=16))
    assert (b, bt) == (a, at)
    s = st.speculative_stats
    # at most a few full-length drafts before the back-off: far fewer drafted tokens than 16 a step
    assert s["drafted"] < 16 * 10, s
    _, _, _, fixed = run(det_ctx, prompt, max_new_tokens=96, temp=0,
                         speculative=Speculative(type="ngram-simple", ngram_n=2, ngram_m=16,
                                                 adaptive=False))
    assert fixed.speculative_stats["drafted"] > s["drafted"]


def test_tiny_synthetic_model_loops_are_drafted(tiny_model):
    # a random tiny model's greedy text falls into a loop, which n-gram drafts predict
    with llamagen.Context(tiny_model, n_ctx=512, deterministic=True) as ctx:
        a, at, _, _ = run(ctx, "hello world", max_new_tokens=120, temp=0, ignore_eos=True)
        b, bt, _, st = run(ctx, "hello world", max_new_tokens=120, temp=0, ignore_eos=True,
                           speculative=Speculative(type="ngram-simple", ngram_n=3, ngram_m=16))
        assert (b, bt) == (a, at)
        assert st.speculative_stats["accepted"] > 20, st.speculative_stats


# -- batches ---------------------------------------------------------------------------------------

TEXTS = [PARAGRAPH,
         "Water boils at one hundred degrees Celsius at sea level, but at higher altitudes it boils "
         "at lower temperatures because the air pressure is lower.",
         "Several members raised concerns about the cost of the new library wing, while others "
         "argued it was overdue and would serve the town for decades."]


def test_batches_equal_plain_and_every_sequence_drafts(det_ctx, smollm2):
    prompts = [copy_prompt(smollm2, t) for t in TEXTS]
    plain = llamagen.generate_batch(det_ctx, prompts, max_new_tokens=64, temp=0)
    spec = llamagen.generate_batch(det_ctx, prompts, max_new_tokens=64, temp=0, speculative=SIMPLE)
    assert spec == plain
    # (fixed-length drafts: whether every sequence drafts does not depend on measured timings)
    fixed = Speculative(type="ngram-simple", ngram_n=4, ngram_m=16, adaptive=False)
    b = llamagen.BatchGenerator(det_ctx, speculative=fixed, max_new_tokens=64, temp=0)
    ids = [b.add(p) for p in prompts]
    out = {i: "" for i in ids}
    for sid, chunk in b:
        out[sid] += chunk
    assert [out[i] for i in ids] == plain
    for i in ids:
        assert b.speculative_stats(i)["accepted"] > 0, (i, b.speculative_stats(i))
    assert b.n_accepted == sum(b.speculative_stats(i)["accepted"] for i in ids)
    stats = {}
    res = list(llamagen.map_generate(det_ctx, prompts * 2, batch_size=3, max_new_tokens=64,
                                     temp=0, speculative=SIMPLE, stats=stats))
    assert [r.text for r in res] == plain * 2
    assert stats["accepted_draft_tokens"] > 0 and stats["draft_tokens"] >= stats["accepted_draft_tokens"]


# -- exact verification on default contexts -------------------------------------------------------

# gemma3-270m (repacked Q4_K layers, a Q8_0 output matrix): a many-row verify batch takes other
# kernels than one-row decodes (4-row gemm, llamafile's sgemm), so its rows round differently,
# unless Speculative.exact (the default) computes each row with the one-row kernels
COPY_GEMMA = f"Repeat the paragraph below exactly:\n\n{PARAGRAPH}\n\nAnswer:\n"
# (fixed-length drafts: what is drafted, so accepted, does not depend on measured timings)
FIXED = dict(type="ngram-simple", ngram_n=4, ngram_m=16, adaptive=False)


def _lps(logprobs):
    return [(x.token, x.logprob) for x in logprobs]


@pytest.mark.parametrize("sampling", [dict(temp=0), dict(temp=0.8, top_k=40, seed=3)],
                         ids=["greedy", "seeded"])
@pytest.mark.parametrize("which", ["gemma3", "smollm2"])
def test_exact_verification_gives_plain_logprobs_bit_for_bit(real_model, smollm2, which, sampling):
    # (gemma3: Q8_0, Q5_0, Q4_K and Q6_K weights; SmolLM2: Q4_1 and Q8_0.  Patch 0008 computes
    # Q8_0 and Q4_1 products two rows at a time on AVX-512, which must equal vec_dot's bit for bit)
    model, prompt = (real_model, COPY_GEMMA) if which == "gemma3" else (smollm2, copy_prompt(smollm2))
    kw = dict(max_new_tokens=64, logprobs=1, **sampling)
    with llamagen.Context(model, n_ctx=1024) as ctx:
        assert not ctx.deterministic
        _, toks, _, plain = run(ctx, prompt, **kw)
        _, etoks, _, ex = run(ctx, prompt, speculative=Speculative(**FIXED), **kw)
        _, _, _, loose = run(ctx, prompt, speculative=Speculative(exact=False, **FIXED), **kw)
    assert ex.speculative_stats["accepted"] > 10, ex.speculative_stats
    assert loose.speculative_stats["accepted"] > 10, loose.speculative_stats
    assert etoks == toks
    assert _lps(ex.logprobs) == _lps(plain.logprobs)
    if which == "gemma3":
        # (the kernels matter: without exact the verified rows' logprobs move; SmolLM2's Q4_1
        # layers take vec_dot at any row count, so there only the two-row kernel is checked)
        assert _lps(loose.logprobs) != _lps(plain.logprobs)


def test_exact_verification_in_a_batch_of_one_sequence(real_model):
    # a batch whose step holds one sequence's pending token and draft (llamagen serve at one
    # stream) verifies with one-row kernels too
    kw = dict(max_new_tokens=64, temp=0, logprobs=1)

    def one(ctx, spec):
        stats = {}
        r, = llamagen.map_generate(ctx, [COPY_GEMMA], batch_size=1, speculative=spec,
                                   stats=stats, **kw)
        return _lps(r.logprobs), stats.get("accepted_draft_tokens", 0)

    with llamagen.Context(real_model, n_ctx=2048, n_seq_max=2) as ctx:
        plain, _ = one(ctx, None)
        ex, n_ex = one(ctx, Speculative(**FIXED))
        loose, n_loose = one(ctx, Speculative(exact=False, **FIXED))
    assert n_ex > 10 and n_loose > 10, (n_ex, n_loose)
    assert ex == plain
    assert loose != plain


# -- the engine and the server ---------------------------------------------------------------------

def test_engine_speculates_and_a_rejected_draft_leaves_the_cache_clean(smollm2):
    prompt = copy_prompt(smollm2)
    story = smollm2.render_chat([{"role": "user", "content": "Write a poem about the sea."}])
    turn = lambda first, reply: first + reply + "<|im_end|>\n<|im_start|>user\nAgain, please.<|im_end|>\n<|im_start|>assistant\n"
    kw = dict(max_new_tokens=64, temp=0)
    # adaptive=False: the draft lengths do not depend on measured decode times, so the open-ended
    # turn always has drafts to reject
    with AsyncEngine(smollm2, n_ctx=4096, n_parallel=2, deterministic=True,
                     speculative=Speculative(type="ngram-simple", ngram_n=2, ngram_m=16,
                                             adaptive=False)) as eng:
        r = eng.generate_sync(prompt, **kw)
        assert r.usage.accepted_draft_tokens > 0
        assert r.usage.draft_tokens >= r.usage.accepted_draft_tokens
        off = eng.generate_sync(prompt, speculative="none", **kw)
        assert off.usage.draft_tokens == 0 and off.text == r.text
        # open-ended text: drafts rejected, their cells removed; the next turn reuses the cache
        first = eng.generate_sync(story, **kw)
        assert first.usage.draft_tokens > first.usage.accepted_draft_tokens
        second = eng.generate_sync(turn(story, first.text), **kw)
        assert second.usage.cached_tokens > 0
        st = eng.stats()
        assert st.draft_tokens_total >= r.usage.draft_tokens + first.usage.draft_tokens
        assert st.accepted_draft_tokens_total >= r.usage.accepted_draft_tokens
    with AsyncEngine(smollm2, n_ctx=4096, n_parallel=2, deterministic=True) as cold:
        assert cold.generate_sync(story, **kw).text == first.text
        assert cold.generate_sync(turn(story, first.text), **kw).text == second.text


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory, smollm2_path):
    yield from serving(tmp_path_factory, "spec", smollm2_path, "--parallel", "2", "--ctx-size",
                       "4096", "--deterministic", "--spec-type", "ngram-simple",
                       "--spec-ngram-size-n", "4", "--spec-ngram-size-m", "16")


def test_server_speculates_by_default_and_per_request(spec_server):
    from openai import OpenAI
    client = OpenAI(base_url=spec_server.url + "/v1", api_key="x")
    msgs = [{"role": "user", "content": f"Repeat the following text exactly, word for word:\n\n{PARAGRAPH}"}]
    a = client.chat.completions.create(model="m", messages=msgs, max_tokens=64, temperature=0)
    details = a.usage.completion_tokens_details
    assert details is not None and details.accepted_prediction_tokens > 0
    b = client.chat.completions.create(model="m", messages=msgs, max_tokens=64, temperature=0,
                                       extra_body={"speculative": "none"})
    assert b.choices[0].message.content == a.choices[0].message.content
    assert b.usage.completion_tokens_details is None or \
        not b.usage.completion_tokens_details.accepted_prediction_tokens
    # llama-server's dotted per-request fields, streamed
    chunks = list(client.chat.completions.create(
        model="m", messages=msgs, max_tokens=64, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"speculative.n_max": 4}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        a.choices[0].message.content
    assert chunks[-1].usage.completion_tokens_details.accepted_prediction_tokens > 0
    metrics = httpx.get(spec_server.url + "/metrics").text
    line = next(x for x in metrics.splitlines() if x.startswith("llamagen:spec_accepted_tokens_total"))
    assert float(line.split()[-1]) > 0


@pytest.mark.parametrize("body,param", [
    ({"speculative.n_max": 0}, "speculative.n_max"),
    ({"speculative.type": "draft-simple"}, "speculative.draft_model"),
    ({"speculative": {"type": "ngram-simple", "draft_model": "/etc/passwd"}}, "speculative.draft_model"),
    ({"speculative": {"type": "ngram-simple", "n_min": 99}}, "speculative.n_min"),
    ({"speculative": 5}, None),
])
def test_server_refuses_bad_speculative_fields(spec_server, body, param):
    r = httpx.post(spec_server.url + "/v1/completions",
                   json={"prompt": "hi", "max_tokens": 4, **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param, err


def test_cli_spec_flags(smollm2_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    base = [sys.executable, "-m", "llamagen", "generate", "--model", str(smollm2_path),
            "--chat", "--deterministic", "--max-new-tokens", "40", "--temp", "0",
            f"Repeat the following text exactly, word for word:\n\n{PARAGRAPH}"]
    plain = subprocess.run(base, capture_output=True, text=True, env=env, timeout=120)
    spec = subprocess.run(base + ["--spec-type", "ngram-simple", "--spec-ngram-size-n", "4"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout and PARAGRAPH[:20] in spec.stdout
    bad = subprocess.run(base + ["--spec-type", "ngram-nope"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 2 and "--spec-type" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run(base + ["--spec-draft-max", "4"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 2 and "--spec-type" in bad.stderr

    bad = subprocess.run(base + ["--spec-type", "draft-simple"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 2 and "--model-draft" in bad.stderr and "Traceback" not in bad.stderr
    draft = subprocess.run(base + ["--model-draft", str(smollm2_path), "--spec-draft-max", "8"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert draft.returncode == 0 and draft.stdout == plain.stdout, draft.stderr


# -- draft models (draft-simple) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pair(make_tiny_model):
    """A tiny target, a draft with the same weights (every greedy draft accepted) and one with
    other weights (drafts rejected), all sharing the vocabulary."""
    with llamagen.Model(make_tiny_model(seed=0)) as t, llamagen.Model(make_tiny_model(seed=0)) as same, \
            llamagen.Model(make_tiny_model(seed=1, n_layer=1)) as other:
        yield t, same, other


def _draft(model, **kw):
    return Speculative(type="draft-simple", draft_model=model, adaptive=False, **kw)


def test_draft_model_greedy_and_seeded_equal_plain(tiny_pair, smollm2, det_ctx):
    t, same, other = tiny_pair
    with llamagen.Context(t, n_ctx=512, deterministic=True) as ctx:
        for temp, seed in ((0, 1), (0.8, 7)):
            kw = dict(max_new_tokens=80, temp=temp, seed=seed, ignore_eos=True)
            a, at, _, _ = run(ctx, "hello world", **kw)
            for draft, full in ((same, True), (other, False)):
                b, bt, chunks, st = run(ctx, "hello world", speculative=_draft(draft, n_max=6), **kw)
                assert (b, bt) == (a, at), (temp, draft)
                s = st.speculative_stats
                assert s["drafted"] > 0, s
                if full and temp == 0:
                    assert s["accepted"] == s["drafted"] and max(map(len, chunks)) > 1, s
                if not full:
                    assert s["accepted"] < s["drafted"], s
    # a real model drafting for itself: identical text, drafts accepted
    prompt = copy_prompt(smollm2)
    a, at, _, _ = run(det_ctx, prompt, max_new_tokens=48, temp=0)
    b, bt, _, st = run(det_ctx, prompt, max_new_tokens=48, temp=0, speculative=_draft(smollm2, n_max=8))
    assert (b, bt) == (a, at) and st.speculative_stats["accepted"] > 30


def test_a_draft_models_accepted_tokens_are_not_decoded_twice(tiny_pair):
    # the draft context keeps the cells its drafting decoded (the pending token and the draft but
    # its last token): the target accepts a prefix of them, which the next ask finds decoded
    # (llama-server decodes them again); only what drafting did not decode catches up
    t, same, _ = tiny_pair
    with llamagen.Context(t, n_ctx=512, deterministic=True) as ctx:
        st = llamagen.gen_begin(ctx, "hello world", max_new_tokens=80, temp=0, ignore_eos=True,
                                speculative=_draft(same, n_max=6))
        text = "".join(st)
        caught = llamagen._core._spec_caught_up(st)
        s = st.speculative_stats
        st.end()
    assert text and s["accepted"] == s["drafted"] > 40, s
    # each verify step left one token undecoded there (its draft's last); before: all ~80 tokens
    assert 0 < caught <= s["verify_steps"] + 2, (caught, s)


def test_draft_model_in_batches_and_a_rejected_draft_leaves_no_trace(tiny_pair):
    t, same, other = tiny_pair
    prompts = ["hello world", "the quick brown", "one two three four"]
    with llamagen.Context(t, n_ctx=2048, n_seq_max=3, kv_unified=True, deterministic=True) as ctx:
        kw = dict(max_new_tokens=60, temp=0, ignore_eos=True)
        plain = llamagen.generate_batch(ctx, prompts, **kw)
        b = llamagen.BatchGenerator(ctx, speculative=_draft(same, n_max=6), **kw)
        ids = [b.add(p) for p in prompts]
        out = {i: "" for i in ids}
        for sid, chunk in b:
            out[sid] += chunk
        assert [out[i] for i in ids] == plain
        assert all(b.speculative_stats(i)["accepted"] > 0 for i in ids)
        # a draft that is mostly wrong: the same texts, and the batch's prompt cache afterwards
        # gives what a cold context gives
        assert llamagen.generate_batch(ctx, prompts, speculative=_draft(other, n_max=6), **kw) == plain
        again = llamagen.generate_batch(ctx, [p + " again" for p in prompts], **kw)
    with llamagen.Context(t, n_ctx=2048, n_seq_max=3, kv_unified=True, deterministic=True) as cold:
        assert llamagen.generate_batch(cold, [p + " again" for p in prompts], **kw) == again


def test_a_bad_draft_model_is_a_clear_error(tiny_pair, smollm2):
    t, same, _ = tiny_pair
    with llamagen.Context(smollm2, n_ctx=512) as ctx:
        # another vocabulary
        with pytest.raises(InvalidParamError) as e:
            llamagen.generate(ctx, "hi", max_new_tokens=4, speculative=_draft(t))
        assert e.value.field == "speculative.draft_model" and "vocabulary" in str(e.value)
        with pytest.raises(InvalidParamError) as e:
            llamagen.generate(ctx, "hi", max_new_tokens=4, speculative=_draft("model.gguf"))
        assert e.value.field == "speculative.draft_model"
        assert llamagen.generate(ctx, "hi", max_new_tokens=4, temp=0)       # still usable


def test_server_with_a_draft_model(tmp_path_factory, smollm2_path):
    from openai import OpenAI
    gen = serving(tmp_path_factory, "draft", smollm2_path, "--parallel", "2", "--ctx-size",
                  "2048", "--deterministic", "--model-draft", smollm2_path, "--spec-draft-max", "8",
                  "--spec-no-adaptive")
    srv = next(gen)
    try:
        client = OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": f"Repeat exactly:\n\n{PARAGRAPH}"}]
        a = client.chat.completions.create(model="m", messages=msgs, max_tokens=48, temperature=0)
        assert a.usage.completion_tokens_details.accepted_prediction_tokens > 20
        b = client.chat.completions.create(model="m", messages=msgs, max_tokens=48, temperature=0,
                                           extra_body={"speculative": "none"})
        assert b.choices[0].message.content == a.choices[0].message.content
    finally:
        with pytest.raises(StopIteration):
            next(gen)
