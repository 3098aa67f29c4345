"""Sampler quality benchmarks (issue 32): the metrics on texts with known values, the bootstrap
interval's coverage, the sweep on real models, the report and the plot."""
from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest

import llamagen
from llamagen import quality


def test_distinct_n_on_known_texts():
    assert quality.distinct_n([[1, 2, 3, 4]], 1) == 1.0
    assert quality.distinct_n([[1, 1, 1, 1]], 1) == 0.25
    assert quality.distinct_n([[1, 2], [1, 2]], 2) == 0.5          # the same bigram twice
    assert quality.distinct_n([[1, 2, 3], [4, 5, 6]], 3) == 1.0
    assert math.isnan(quality.distinct_n([[1]], 2))


def test_self_overlap_is_one_for_copies_and_zero_for_disjoint_samples():
    same = [[1, 2, 3, 4, 5]] * 3
    assert quality.self_overlap(same) == pytest.approx(1.0)
    assert quality.self_overlap([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]) == 0.0
    half = quality.self_overlap([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 10, 11, 12]])
    assert 0.0 < half < 1.0
    assert math.isnan(quality.self_overlap([[1, 2, 3]]))


def test_repetition_and_loops():
    assert quality.repeat_n([1, 2, 3, 4, 5, 6, 7], 4) == 0.0
    # 1 2 3 4 1 2 3 4: 5 four-grams, 1 2 3 4 seen before once
    assert quality.repeat_n([1, 2, 3, 4, 1, 2, 3, 4], 4) == pytest.approx(1 / 5)
    assert quality.has_loop("a\nb\na\nc\na")
    assert not quality.has_loop("a\nb\na\n\n\n")


def test_correctness_checks():
    assert quality.is_correct({"answer": "Paris"}, " paris, of course.")
    assert not quality.is_correct({"answer": "12"}, " 123")
    assert quality.is_correct({"regex": r"\b4\d\b"}, "about 42 things")
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    assert quality.is_correct({"schema": schema}, ' {"age": 30} and more')
    assert not quality.is_correct({"schema": schema}, ' {"age": "thirty"}')
    assert not quality.is_correct({"schema": schema}, "no json here")
    assert quality.is_correct({}, "anything") is None


def test_bootstrap_interval_covers_the_true_mean():
    # normal data with mean 3: the 95 % interval of 200 synthetic samples covers it ~95 % of runs
    rng = np.random.default_rng(1)
    hits = 0
    runs = 200
    for i in range(runs):
        x = rng.normal(3.0, 1.0, size=40)
        ci = quality.bootstrap_ci(list(x), n_boot=500, seed=i)
        assert ci["lo"] <= ci["mean"] <= ci["hi"]
        hits += ci["lo"] <= 3.0 <= ci["hi"]
    assert 0.88 <= hits / runs <= 0.99, hits
    assert math.isnan(quality.bootstrap_ci([math.nan])["mean"])


def test_the_shipped_prompts_load_and_bad_files_are_named(tmp_path):
    items = quality.load_prompts()
    kinds = {it.get("kind") for it in items}
    assert {"open", "qa", "math", "json"} <= kinds
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match="p.jsonl:2"):
        quality.load_prompts(bad)


@pytest.fixture(scope="module")
def sweep(real_model):
    prompts = [{"prompt": "Once upon a time,"}, {"prompt": "The best thing about summer is"},
               {"prompt": "Q: What is the capital of France?\nA:", "answer": "Paris"}]
    configs = {"greedy": {"temp": 0.0}, "temp_0.3": {"temp": 0.3, "top_k": 0, "top_p": 1.0},
               "temp_1.5": {"temp": 1.5, "top_k": 0, "top_p": 1.0},
               "broken": {"temp": 0.8, "grammar": "root ::= nothing-defined"},
               "unknown": {"tempp": 1.0}}
    return {r["name"]: r for r in quality.sweep_quality(real_model, configs, prompts, samples=4,
                                                         max_new_tokens=24, batch_size=8)}


def test_greedy_has_no_diversity_and_temperature_adds_it(sweep):
    g, lo, hi = sweep["greedy"], sweep["temp_0.3"], sweep["temp_1.5"]
    assert g["error"] is None and g["metrics"]["self_overlap"]["mean"] == pytest.approx(1.0)
    assert g["metrics"]["distinct_2"]["mean"] <= lo["metrics"]["distinct_2"]["mean"] < \
        hi["metrics"]["distinct_2"]["mean"]
    # likelier text at low temperature, by the model's own measure
    assert g["metrics"]["logprob"]["mean"] > hi["metrics"]["logprob"]["mean"]
    assert g["metrics"]["perplexity"]["mean"] < hi["metrics"]["perplexity"]["mean"]
    for r in (g, lo, hi):
        m = r["metrics"]
        assert m["accuracy"]["mean"] is not None and 0.0 <= m["accuracy"]["mean"] <= 1.0
        assert 0 < m["length"]["mean"] <= 24 and r["tokens"] > 0 and r["tokens_per_second"] > 0
        assert 0 < r["sample_ms_per_token"] < 1000
        assert sum(r["finish_reasons"].values()) == 3 * 4
        assert len(r["examples"]) == 3


def test_a_configuration_that_fails_records_its_error(sweep):
    assert "GrammarError" in sweep["broken"]["error"]
    assert "tempp" in sweep["unknown"]["error"]
    assert sweep["greedy"]["error"] is None            # the sweep went on


def test_the_report_renders_and_the_plot_is_written(sweep, tmp_path):
    rows = list(sweep.values())
    out = tmp_path / "report.html"
    quality.to_html(rows, out)

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.cur, self.in_td, self.pre = [], None, False, 0

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.cur = []
            elif tag in ("td", "th"):
                self.in_td = True
                self.cur.append("")
            elif tag == "pre":
                self.pre += 1

        def handle_endtag(self, tag):
            if tag == "tr":
                self.rows.append(self.cur)
            elif tag in ("td", "th"):
                self.in_td = False

        def handle_data(self, data):
            if self.in_td:
                self.cur[-1] += data
    p = Cells()
    p.feed(out.read_text())
    header, body = p.rows[0], p.rows[1:]
    assert header[0] == "config" and "distinct_2" in header and "logprob" in header
    assert [r[0] for r in body] == list(sweep)
    greedy = dict(zip(header, body[0]))
    assert greedy["self_overlap"].startswith("1.000")
    assert "error: " in body[3][1]
    assert p.pre == 3 * 3                                # examples of the three that ran
    png = tmp_path / "frontier.png"
    quality.plot_frontier(rows, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_quality_writes_json_and_html(real_model_path, tmp_path, capsys):
    from llamagen import cli
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Q: What is 7 + 5?\nA:", "answer": "12"}) + "\n")
    configs = tmp_path / "c.json"
    configs.write_text(json.dumps({"greedy": {"temp": 0}, "hot": {"temp": 1.2}}))
    html = tmp_path / "r.html"
    rc = cli.main(["bench", "samplers", "--quality", "-m", str(real_model_path), "--prompts",
                   str(prompts), "--configs", str(configs), "--samples", "2",
                   "--max-new-tokens", "8", "--json", "--html", str(html), "--no-progress"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["greedy", "hot"] and html.exists()
    assert rows[0]["metrics"]["accuracy"]["mean"] in (0.0, 1.0)
