"""The sampler-configuration benchmark: llamagen.bench.sweep_samplers, its renderings and
`llamagen bench samplers`, on the tiny model (fast: a few short generations per configuration)."""
import csv
import importlib.util
import io
import json
import math

import pytest

import llamagen
from llamagen import SamplingParams, bench
from llamagen.cli import main

FAST = dict(max_new_tokens=16, repeats=2, warmup=1, n_threads=1, progress=False)
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
METRIC_KEYS = [f"{m}_{k}" for m in bench.METRICS for k in ("median", "min", "max", "stdev")]


@pytest.fixture(scope="module")
def default_rows(tiny_model):
    return bench.sweep_samplers(tiny_model, **FAST)


def by_name(rows):
    return {r["name"]: r for r in rows}


def assert_sane(row, *, repeats=2, max_new_tokens=16):
    assert row["error"] is None, row["error"]
    assert row["repeats"] == repeats and len(row["runs"]) == repeats
    for m in bench.METRICS:
        med, lo, hi, sd = (row[f"{m}_{k}"] for k in ("median", "min", "max", "stdev"))
        assert med > 0 and lo > 0, (row["name"], m, med, lo)
        assert lo <= med <= hi
        if repeats > 1:
            assert sd is not None and sd >= 0
        else:
            assert sd is None
    assert 1 <= row["n_tokens"] <= max_new_tokens
    assert row["finish_reason"] in ("stop", "length")
    for run in row["runs"]:  # the per-run numbers are the timings, divided as documented
        n = run["n_tokens"]
        assert n > 0
        assert run["sample_ms"] > 0 and run["decode_ms"] > run["sample_ms"]
        assert math.isclose(run["sample_ms_per_token"], run["sample_ms"] / n)
        assert math.isclose(run["decode_ms_per_token"], (run["decode_ms"] - run["sample_ms"]) / n)
        assert math.isclose(run["tokens_per_second"], n / (run["decode_ms"] / 1000))


# -- the default grid -------------------------------------------------------------------------------

def test_default_grid_rows_are_sane(default_rows):
    assert [r["name"] for r in default_rows] == list(bench.DEFAULT_CONFIGS)
    for row in default_rows:
        assert_sane(row)
        if row["name"] != "grammar_json":  # EOS ignored: every run goes to max_new_tokens
            assert row["n_tokens"] == 16 and row["finish_reason"] == "length"
            assert all(r["n_tokens"] == 16 for r in row["runs"])


def test_default_grid_covers_the_samplers(default_rows):
    p = {r["name"]: r["params"] for r in default_rows}
    assert p["greedy"]["temp"] == 0.0
    assert set(p["default"]) == {"max_new_tokens", "ignore_eos"}  # nothing else changed
    assert p["temp_only"]["top_k"] == 0 and p["temp_only"]["top_p"] == 1.0
    assert p["top_k_40"]["top_k"] == 40
    assert p["top_p_0.9"]["top_k"] == 0 and "top_p" not in p["top_p_0.9"]  # 0.9 is the default
    assert p["min_p_0.05"]["min_p"] == 0.05
    assert p["typical_p_0.9"]["typical_p"] == 0.9
    assert p["penalties"]["repeat_penalty"] == 1.1 and p["penalties"]["frequency_penalty"] == 0.1
    assert p["penalties"]["presence_penalty"] == 0.1 and "repeat_last_n" not in p["penalties"]
    assert p["penalties_ctx"]["repeat_last_n"] == -1
    assert p["mirostat_1"]["mirostat"] == 1 and p["mirostat_2"]["mirostat"] == 2
    assert "root" in p["grammar_json"]["grammar"]
    assert p["dry"]["dry_multiplier"] == 0.8
    assert p["xtc"]["xtc_probability"] == 0.5
    assert SamplingParams(**p["xtc"]).xtc_threshold == 0.1  # the default value
    assert p["top_n_sigma_1.5"]["top_n_sigma"] == 1.5
    for name, params in p.items():
        assert params["max_new_tokens"] == 16
        if name != "grammar_json":
            assert params["ignore_eos"] is True


def test_same_seed_gives_the_same_tokens_each_repeat(tiny_model):
    rows = bench.sweep_samplers(tiny_model, {"d": {}, "m2": {"mirostat": 2}}, max_new_tokens=12,
                                repeats=3, warmup=0, n_threads=1, progress=False)
    for row in rows:
        assert_sane(row, repeats=3, max_new_tokens=12)
        assert {r["n_tokens"] for r in row["runs"]} == {12}


# -- custom configurations ----------------------------------------------------------------------

def test_custom_configs_from_dict(tiny_model):
    configs = {
        "cold": {"temp": 0.0},
        "obj": SamplingParams(top_k=5, temp=1.2, max_new_tokens=200),  # sweep's length applies
        "short": {"max_new_tokens": 5},  # a field dict's own setting wins
    }
    rows = by_name(bench.sweep_samplers(tiny_model, configs, **FAST))
    assert list(rows) == ["cold", "obj", "short"]
    assert_sane(rows["cold"])
    assert rows["cold"]["params"]["temp"] == 0.0
    assert_sane(rows["obj"])
    assert rows["obj"]["params"]["top_k"] == 5 and rows["obj"]["n_tokens"] == 16
    assert_sane(rows["short"], max_new_tokens=5)
    assert rows["short"]["n_tokens"] == 5 and rows["short"]["finish_reason"] == "length"


def test_custom_configs_as_list_and_model_path(tiny_model_path):
    configs = [{"name": "k3", "top_k": 3}, {"name": "p5", "top_k": 0, "top_p": 0.5}]
    rows = bench.sweep_samplers(tiny_model_path, configs, max_new_tokens=8, repeats=1, warmup=0,
                                n_threads=1, progress=False)
    assert [r["name"] for r in rows] == ["k3", "p5"]
    for row in rows:
        assert_sane(row, repeats=1, max_new_tokens=8)
    assert rows[1]["params"]["top_p"] == 0.5


def test_bad_config_records_error_and_sweep_continues(tiny_model):
    configs = {
        "before": {"temp": 0.0},
        "bad_grammar": {"grammar": "root ::= [unclosed"},
        "bad_value": {"top_p": 2.0},
        "bad_field": {"tempp": 0.5},
        "after": {},
    }
    rows = by_name(bench.sweep_samplers(tiny_model, configs, **FAST))
    assert list(rows) == list(configs)
    assert_sane(rows["before"])
    assert_sane(rows["after"])  # the context is still usable after the failure
    assert "GrammarError" in rows["bad_grammar"]["error"]
    assert "top_p" in rows["bad_value"]["error"]
    assert "tempp" in rows["bad_field"]["error"]
    for name in ("bad_grammar", "bad_value", "bad_field"):
        row = rows[name]
        assert row["repeats"] == 0 and row["runs"] == []
        assert all(row[k] is None for k in METRIC_KEYS)
        assert row["n_tokens"] is None and row["finish_reason"] is None


def test_sweep_argument_errors(tiny_model):
    with pytest.raises(ValueError, match="repeats"):
        bench.sweep_samplers(tiny_model, {"a": {}}, repeats=0, progress=False)
    with pytest.raises(ValueError, match="warmup"):
        bench.sweep_samplers(tiny_model, {"a": {}}, warmup=-1, progress=False)
    with pytest.raises(ValueError, match="twice"):
        bench.sweep_samplers(tiny_model, [{"name": "a"}, {"name": "a"}], progress=False)
    with pytest.raises(ValueError, match="name"):
        bench.sweep_samplers(tiny_model, [{"temp": 0.0}], progress=False)
    with pytest.raises(FileNotFoundError):
        bench.sweep_samplers("/nonexistent/model.gguf", {"a": {}}, progress=False)


# -- configuration files ----------------------------------------------------------------------------

def test_load_configs_dict_and_list_files(tmp_path, tiny_model):
    d = tmp_path / "dict.json"
    d.write_text(json.dumps({"greedy": {"temp": 0}, "biased": {"logit_bias": {"5": -100.0}},
                             "stops": {"stop": ["\n"], "repeat_last_n": -1}}))
    loaded = bench.load_configs(d)
    assert list(loaded) == ["greedy", "biased", "stops"]
    assert loaded["biased"]["logit_bias"] == {5: -100.0}  # JSON's string keys made token ids
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps([{"name": "k2", "top_k": 2}, {"name": "miro", "mirostat": 1}]))
    assert bench.load_configs(lst) == {"k2": {"top_k": 2}, "miro": {"mirostat": 1}}

    rows = by_name(bench.sweep_samplers(tiny_model, bench.load_configs(d), **FAST))
    assert list(rows) == ["greedy", "biased", "stops"]
    for row in rows.values():
        assert_sane(row)
    assert rows["biased"]["params"]["logit_bias"] == {5: -100.0}


@pytest.mark.parametrize("content, words", [
    ({"fast": {"temp": 0.5, "top_kk": 3}}, ["fast", "unknown", "top_kk"]),
    ([{"name": "x", "bogus": 1}], ["'x'", "unknown", "bogus"]),
    ({"hot": {"temp": "very"}}, ["'hot'", "temp"]),
    ({"pp": {"top_p": 1.5}}, ["'pp'", "top_p"]),
    ({"notadict": 3}, ["notadict"]),
    ([{"name": "a"}, {"name": "a"}], ["'a'", "twice"]),
    ([{"top_k": 2}], ["name"]),
    ({}, ["no configurations"]),
    (42, ["expected"]),
])
def test_load_configs_errors_are_clear(tmp_path, content, words):
    path = tmp_path / "configs.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError) as ei:
        bench.load_configs(path)
    msg = str(ei.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, msg


def test_load_configs_bad_json_and_missing_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        bench.load_configs(path)
    with pytest.raises(FileNotFoundError):
        bench.load_configs(tmp_path / "missing.json")


# -- renderings -------------------------------------------------------------------------------------

def test_format_table(default_rows):
    table = bench.format_table(default_rows)
    lines = table.rstrip("\n").split("\n")
    assert lines[0].startswith("config") and "sample ms/tok" in lines[0] and "tok/s" in lines[0]
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 2 + len(default_rows)
    for line, row in zip(lines[2:], default_rows):
        assert line.split()[0] == row["name"]
        assert f"{row['sample_ms_per_token_median']:.4f}" in line
    # aligned: every numeric column ends at the same place on each line
    assert len({len(line) for line in lines[1:]}) == 1
    assert "error" not in lines[0]


def test_format_table_shows_errors(tiny_model):
    rows = bench.sweep_samplers(tiny_model, {"ok": {}, "broken": {"grammar": "nonsense"}}, **FAST)
    table = bench.format_table(rows)
    assert "error" in table.split("\n")[0]
    broken = [line for line in table.split("\n") if line.startswith("broken")]
    assert len(broken) == 1 and "GrammarError" in broken[0]


def test_to_json(default_rows):
    data = json.loads(bench.to_json(default_rows))
    assert [r["name"] for r in data] == list(bench.DEFAULT_CONFIGS)
    for r, orig in zip(data, default_rows):
        assert r["sample_ms_per_token_median"] == pytest.approx(orig["sample_ms_per_token_median"])
        assert r["n_tokens"] == orig["n_tokens"] and len(r["runs"]) == 2


def test_to_csv(default_rows):
    text = bench.to_csv(default_rows)
    records = list(csv.DictReader(io.StringIO(text)))
    assert [r["name"] for r in records] == list(bench.DEFAULT_CONFIGS)
    for rec, orig in zip(records, default_rows):
        for k in METRIC_KEYS:
            assert float(rec[k]) == pytest.approx(orig[k])
        assert int(rec["n_tokens"]) == orig["n_tokens"]
        assert rec["finish_reason"] in ("stop", "length")
        assert rec["error"] == ""
        assert json.loads(rec["params"]) == json.loads(json.dumps(orig["params"]))


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib not installed (see the ImportError test)")
def test_plot_writes_png(default_rows, tmp_path):
    out = bench.plot(default_rows, tmp_path / "samplers.png")
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="nothing to plot"):
        bench.plot([{"name": "x", "sample_ms_per_token_median": None}], tmp_path / "empty.png")


@pytest.mark.skipif(HAVE_MPL, reason="matplotlib is installed (see the PNG test)")
def test_plot_without_matplotlib_says_how_to_install(default_rows, tmp_path):
    with pytest.raises(ImportError, match=r'pip install "llamagen\[plot\]"'):
        bench.plot(default_rows, tmp_path / "samplers.png")


def test_progress_goes_to_stderr_unless_disabled(tiny_model, capsys):
    cfg = {"a": {}, "b": {"temp": 0.0}}
    bench.sweep_samplers(tiny_model, cfg, max_new_tokens=4, repeats=1, warmup=1, n_threads=1)
    out, err = capsys.readouterr()
    assert out == ""
    assert "bench samplers" in err and "4/4" in err  # 2 configs x (1 warmup + 1 timed)
    bench.sweep_samplers(tiny_model, cfg, max_new_tokens=4, repeats=1, warmup=1, n_threads=1,
                         progress=False)
    assert capsys.readouterr() == ("", "")


# -- the command line -------------------------------------------------------------------------------

def cli(tiny_model_path, *extra):
    return main(["bench", "samplers", "--model", str(tiny_model_path), "--max-new-tokens", "16",
                 "--repeats", "2", "--warmup", "1", "--threads", "1", *extra])


def test_cli_json(tiny_model_path, capsys):
    assert cli(tiny_model_path, "--json", "--no-progress") == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert [r["name"] for r in rows] == list(bench.DEFAULT_CONFIGS)
    for row in rows:
        assert_sane(row)
    assert "bench samplers" not in err  # --no-progress


def test_cli_table_csv_configs_and_progress(tiny_model_path, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps([{"name": "greedy", "temp": 0}, {"name": "broken", "grammar": "x"}]))
    assert cli(tiny_model_path, "--configs", str(cfg), "--prompt", "the cat") == 0
    out, err = capsys.readouterr()
    lines = out.strip().split("\n")
    assert lines[0].startswith("config") and len(lines) == 4
    assert lines[2].startswith("greedy") and lines[3].startswith("broken")
    assert "GrammarError" in lines[3]
    assert "bench samplers" in err  # the progress bar
    assert "1 configuration(s) failed: broken" in err

    assert cli(tiny_model_path, "--configs", str(cfg), "--csv", "--no-progress") == 0
    records = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["name"] for r in records] == ["greedy", "broken"]
    assert float(records[0]["sample_ms_per_token_median"]) > 0
    assert "GrammarError" in records[1]["error"]


def test_cli_bad_configs_file(tiny_model_path, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"oops": {"temperature": 0.5}}))
    assert cli(tiny_model_path, "--configs", str(cfg), "--no-progress") == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "llamagen: error:" in err and "temperature" in err and "oops" in err


def test_cli_argument_errors(tiny_model_path, capsys):
    for extra in (["--json", "--csv"], ["--repeats", "0"], ["--warmup", "-1"]):
        with pytest.raises(SystemExit) as ei:
            cli(tiny_model_path, *extra)
        assert ei.value.code == 2
    with pytest.raises(SystemExit):
        main(["bench"])  # a bench subcommand is required
    capsys.readouterr()


def test_cli_plot(tiny_model_path, tmp_path, capsys):
    png = tmp_path / "out.png"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"greedy": {"temp": 0}, "default": {}}))
    rc = cli(tiny_model_path, "--configs", str(cfg), "--plot", str(png), "--no-progress")
    out, err = capsys.readouterr()
    if HAVE_MPL:
        assert rc == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "greedy" in out and "default" in out  # the table is still printed
    else:
        assert rc == 2 and not png.exists() and out == ""
        assert 'pip install "llamagen[plot]"' in err


def test_existing_commands_still_work(capsys):
    assert main(["info", "--no-model"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["llamagen"] == llamagen.__version__


def test_results_writers_replace_only_their_own_section(tmp_path):
    # bench/sampling_engines.py writes "## 7." and bench/sampling_replay.py "### 7b." inside it:
    # rewriting one must keep the other and the sections around them
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from sampling_engines import HEADING as H7, replace_section
    from sampling_replay import HEADING as H7B
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# r\n\n## 6. six\n\nsix body\n\n{H7}\n\nold 7\n\n{H7B}\n\nold 7b\n\n## 8. eight\n\n8 body\n")
    replace_section(str(path), H7, f"{H7}\n\nnew 7\n")
    text = path.read_text()
    assert "new 7\n" in text and "old 7\n" not in text
    assert f"{H7B}\n\nold 7b" in text and "six body" in text and "8 body" in text
    replace_section(str(path), H7B, f"{H7B}\n\nnew 7b\n")
    text = path.read_text()
    assert "new 7b" in text and "old 7b" not in text and "new 7\n" in text and "8 body" in text
    assert text.index("## 6.") < text.index(H7) < text.index(H7B) < text.index("## 8.")
    replace_section(str(tmp_path / "none.md"), H7, f"{H7}\n\nfirst\n")
    assert (tmp_path / "none.md").read_text() == f"{H7}\n\nfirst\n"


def test_runner_checks_every_target():
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import run
    row = dict(n=1024, chain="greedy", native=100.0, lcp_stream=80.0, lcp_generate=90.0,
               ratio_stream_native=0.98, ratio_generate_native=1.0,
               ratio_stream_lcp_stream=1.31, ratio_generate_lcp_generate=1.2)
    res = dict(decode=[row, dict(row, n=128, ratio_generate_lcp_generate=None)],
               gil=dict(ratio_generate=0.95, ratio_stream=0.85))
    checks = {c["what"]: c for c in run.target_checks(res)}
    assert len(checks) == 10
    met = {w: c["met"] for w, c in checks.items()}
    assert met["llamagen stream >= 0.99 x native loop (1024 tokens, greedy)"] is False
    assert met["llamagen generate() >= 0.99 x native loop (1024 tokens, greedy)"] is True
    assert met["llamagen stream >= 1.30 x llama-cpp-python stream (1024 tokens, greedy)"] is True
    assert met["llamagen generate() >= 1.30 x llama-cpp-python generate() (1024 tokens, greedy)"] is False
    assert met["llamagen generate() >= 1.10 x llama-cpp-python generate() (128 tokens, greedy)"] is None
    assert met["counting thread keeps >= 90% of its solo rate during the stream loop"] is False
    # the native loop's own ratio: 100 / 90 is below 1.30, so that miss is beyond a binding
    c = checks["llamagen generate() >= 1.30 x llama-cpp-python generate() (1024 tokens, greedy)"]
    assert c["native"] == pytest.approx(100 / 90)
    text = "\n".join(run.target_lines(res))
    assert "5 of 10 met, 1 not measured" in text
    assert "Beyond a binding here: the native C++ loop itself misses llamagen generate() >= 1.30" in text
