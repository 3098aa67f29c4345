"""llamagen.ray: the Ray Data stages on a local 2-CPU cluster with the tiny model.

One cluster for the module (starting Ray costs seconds); each dataset run a few seconds more.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

import llamagen

ray = pytest.importorskip(
    "ray", reason='Ray is not installed: pip install "ray[data]" (the "ray" and "test" extras '
                  "have it)")
pytest.importorskip("ray.data", reason='Ray Data is not installed: pip install "ray[data]"')

import llamagen.ray as lray  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")

PROMPTS = ["Once upon a time", "The cat", "hello world", "abc def", "1 2 3 4", "zebra",
           "What is", "Once upon a time there was", "a", "The quick brown fox", "xyz", "The dog"]
N_CTX_SEQ = 128


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs whose workers import this checkout's llamagen (and this
    module, for the test stage below)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")      # Ray >= 2.59's token auth
    path = os.pathsep.join(p for p in (ROOT, TESTS, os.environ.get("PYTHONPATH")) if p)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
             runtime_env={"env_vars": {"PYTHONPATH": path}}, log_to_driver=False)
    with warnings.catch_warnings():     # Ray's own deprecated fields, read when it is made
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_tiny_path(make_tiny_model):
    return str(make_tiny_model())


def _local_outputs(path, items, n_seq_max, **sampling):
    with llamagen.Model(path) as m, llamagen.Context(m, n_ctx=n_seq_max * N_CTX_SEQ,
                                                     n_seq_max=n_seq_max, n_threads=1) as ctx:
        return list(llamagen.map_generate(ctx, items, batch_size=n_seq_max, **sampling))


def _run(ds, timeout=120):
    """take_all() with a deadline: a dataset that hangs fails the test instead of CI."""
    box = {}

    def go():
        try:
            box["rows"] = ds.take_all()
        except BaseException as e:      # noqa: BLE001 - re-raised below
            box["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"the dataset did not finish in {timeout} s")
    if "error" in box:
        raise box["error"]
    return box["rows"]


# -- no cluster needed ---------------------------------------------------------------------------

def test_import_llamagen_does_not_import_ray():
    code = "import sys, llamagen; assert 'ray' not in sys.modules, 'llamagen imported ray'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("version, key", [("2.8.1", "compute"), ("2.9.0", "concurrency"),
                                          ("2.50.2", "concurrency"), ("2.51.0", "compute"),
                                          ("2.60.0", "compute"), ("3.0.0.dev0", "compute")])
def test_actor_pool_argument_follows_the_ray_version(monkeypatch, version, key):
    monkeypatch.setattr(ray, "__version__", version)
    kw = lray.actor_pool_kwargs(3)
    assert list(kw) == [key]
    if key == "concurrency":
        assert kw[key] == 3 and lray.actor_pool_kwargs((1, 4)) == {"concurrency": (1, 4)}
    else:
        assert (kw[key].min_size, kw[key].max_size) == (3, 3)
    with pytest.raises(ValueError, match="actors"):
        lray.actor_pool_kwargs(0)


@pytest.mark.parametrize("nodes, actors, cpus, expect", [
    ([2], 1, 2, (1.0, 2)),              # one actor would take both CPUs: it asks for one
    ([2], 2, 1, (0.5, 1)),
    ([8], 2, 2, (2, None)),             # a CPU stays free anyway
    ([8, 8], 8, 2, (1.75, 2)),          # four per node, 7 of 8 CPUs
    ([0, 8], 3, 2, (2, None)),          # a head node without CPUs does not count
])
def test_a_cpu_is_left_for_read_tasks(monkeypatch, nodes, actors, cpus, expect):
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": c}}
                                               for c in nodes])
    assert lray._actor_request(actors, cpus, None) == expect
    assert lray._actor_request(actors, cpus, False) == (cpus, None)


def test_the_stage_called_directly(ray_tiny_path):
    """A batch in, its columns plus the outputs back; overrides per row, nulls keep the
    stage's value; a bad row gets its error."""
    stage = lray.GenerateStage(ray_tiny_path, n_seq_max=2, n_ctx_seq=N_CTX_SEQ, n_threads=1,
                               temp=0, max_new_tokens=6)
    assert stage.ctx.n_threads == 1
    batch = {"id": np.arange(4), "prompt": np.array(["The cat", "hello", None, "abc"], dtype=object),
             "max_new_tokens": np.array([2.0, np.nan, 3.0, 0.0])}
    out = stage(batch)
    assert list(out["id"]) == [0, 1, 2, 3]
    assert list(out["n_tokens"]) == [2, 6, 0, 0]
    assert out["error"][0] is None and out["error"][1] is None
    assert "prompt" in out["error"][2]                  # a null prompt
    assert "max_new_tokens" in out["error"][3]          # 0 is not allowed
    assert out["finish_reason"][0] == "length" and out["text"][2] == ""
    assert out["n_prompt_tokens"][1] == len(stage.model.tokenize("hello"))
    import pandas as pd
    df = pd.DataFrame({"prompt": ["The cat"], "seed": [None]})      # a pandas batch
    res = stage(df)
    assert res["error"][0] is None and res["n_tokens"][0] == 6
    with pytest.raises(KeyError, match="no input column 'prompt'"):
        stage({"text_in": np.array(["x"])})
    with pytest.raises(ValueError, match="overwritten"):
        lray.GenerateStage(ray_tiny_path, prompt_column="text")
    with pytest.raises(FileNotFoundError, match="every node"):
        lray.GenerateStage("/no/such/model.gguf")


# -- on the cluster ------------------------------------------------------------------------------

def test_greedy_outputs_equal_map_generate(cluster, ray_tiny_path):
    """Two actors, several batches, input order kept; a max_new_tokens column per row."""
    rows = [{"id": i, "prompt": p, "max_new_tokens": 4 + i % 5} for i, p in enumerate(PROMPTS)]
    ds = ray.data.from_items(rows, override_num_blocks=3)
    out = lray.generate(ds, model=ray_tiny_path, actors=2, cpus_per_actor=1, batch_size=4,
                        n_seq_max=4, n_ctx_seq=N_CTX_SEQ, preserve_order=True, temp=0)
    got = _run(out)
    assert [r["id"] for r in got] == list(range(len(PROMPTS)))
    want = _local_outputs(ray_tiny_path, [{"prompt": r["prompt"],
                                           "max_new_tokens": r["max_new_tokens"]} for r in rows],
                          4, temp=0)
    for g, w in zip(got, want):
        assert g["error"] is None
        assert g["prompt"] == w.prompt
        assert (g["text"], g["finish_reason"], g["n_tokens"]) == \
            (w.text, w.finish_reason, len(w.tokens))
        assert g["n_prompt_tokens"] == w.choices[0].n_prompt_tokens
        assert g["n_tokens"] <= g["max_new_tokens"]


def test_a_bad_row_gets_its_error(cluster, ray_tiny_path):
    rows = [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS[:6])]
    rows[2]["prompt"] = "a " * (2 * N_CTX_SEQ)              # longer than a sequence's context
    rows[4]["prompt"] = None
    out = lray.generate(ray.data.from_items(rows), model=ray_tiny_path, actors=1,
                        cpus_per_actor=1, batch_size=6, n_seq_max=3, n_ctx_seq=N_CTX_SEQ,
                        temp=0, max_new_tokens=4)
    got = {r["id"]: r for r in _run(out)}
    assert sorted(got) == list(range(6))
    # (PromptTooLongError, a ValueError: the same error as the engine and generate raise)
    assert got[2]["error"].startswith("PromptTooLongError: ") and "tokens" in got[2]["error"]
    assert got[4]["error"] and got[4]["text"] == "" and got[4]["n_tokens"] == 0
    for i in (0, 1, 3, 5):
        assert got[i]["error"] is None and got[i]["n_tokens"] == 4


class KillOnce(lray.GenerateStage):
    """Kills its own process (as an OOM kill or a crash would) the first time it sees the marker
    row; the file ``flag`` makes it happen once across actor restarts."""

    def __init__(self, model, *, flag, marker, **kwargs):
        super().__init__(model, **kwargs)
        self.flag, self.marker = flag, marker

    def __call__(self, batch):
        if self.marker in list(batch["prompt"]) and not os.path.exists(self.flag):
            with open(self.flag, "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)
        return super().__call__(batch)


def test_every_row_comes_back_once_when_an_actor_dies(cluster, ray_tiny_path, tmp_path):
    n = 24
    rows = [{"id": i, "prompt": f"{PROMPTS[i % len(PROMPTS)]} {i}"} for i in range(n)]
    flag = tmp_path / "killed"
    ds = ray.data.from_items(rows, override_num_blocks=6)
    out = ds.map_batches(KillOnce, fn_constructor_kwargs=dict(
        model=ray_tiny_path, flag=str(flag), marker=rows[13]["prompt"], n_seq_max=4,
        n_ctx_seq=N_CTX_SEQ, n_threads=1, temp=0, max_new_tokens=3),
        batch_size=4, num_cpus=1, **lray.actor_pool_kwargs(1))
    got = _run(out, timeout=180)
    assert flag.exists(), "the actor was not killed"
    ids = sorted(r["id"] for r in got)
    assert ids == list(range(n))
    assert all(r["error"] is None and r["n_tokens"] == 3 for r in got)


def test_read_tasks_run_beside_an_actor_that_wants_every_cpu(cluster, ray_tiny_path, tmp_path):
    """read_parquet needs a CPU for its read tasks; 1 actor x 2 CPUs on 2 CPUs would hang
    without the reserve (ray issue 44687).  Written back with write_parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    src = tmp_path / "in"
    src.mkdir()
    for k in range(2):
        pq.write_table(pa.table({"id": [2 * k, 2 * k + 1], "prompt": PROMPTS[2 * k:2 * k + 2]}),
                       src / f"{k}.parquet")
    out = lray.generate(ray.data.read_parquet(str(src)), model=ray_tiny_path, actors=1,
                        cpus_per_actor=2, batch_size=4, n_seq_max=4, n_ctx_seq=N_CTX_SEQ,
                        temp=0, max_new_tokens=3)
    got = _run(out)
    assert sorted(r["id"] for r in got) == [0, 1, 2, 3]
    assert all(r["error"] is None for r in got)


def test_embed_stage_matches_llamagen_embed(cluster, ray_tiny_path):
    texts = PROMPTS[:8]
    rows = [{"id": i, "text": t} for i, t in enumerate(texts)]
    rows.append({"id": 8, "text": "a " * 300})          # longer than one decode (n_batch 128)
    out = lray.embed(ray.data.from_items(rows), model=ray_tiny_path, pooling="mean", actors=1,
                     cpus_per_actor=1, batch_size=16, n_seq_max=8, n_batch=128,
                     preserve_order=True)
    got = _run(out)
    assert [r["id"] for r in got] == list(range(9))
    with llamagen.Model(ray_tiny_path) as m, llamagen.Context(
            m, n_ctx=128, n_batch=128, n_seq_max=8, embeddings=True, pooling="mean",
            n_threads=1) as ctx:
        want = llamagen.embed(ctx, texts, details=True)
    for r, v, k in zip(got, want.vectors, want.n_tokens):
        assert r["error"] is None and r["n_tokens"] == k
        assert r["embedding"].dtype == np.float32 and r["embedding"].shape == v.shape
        assert float(np.dot(r["embedding"], v)) > 0.9999
        np.testing.assert_allclose(r["embedding"], v, atol=1e-4)
    assert "row 8" in got[8]["error"] and np.isnan(got[8]["embedding"]).all()


TEMPLATE = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")


def test_chat_stage_renders_with_the_template(cluster, make_tiny_model):
    path = str(make_tiny_model(chat_template=TEMPLATE))
    convs = [[{"role": "user", "content": "hello"}],
             [{"role": "system", "content": "be brief", "name": "sys"},
              {"role": "user", "content": "The cat"}],
             [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "def"},
              {"role": "user", "content": "ghi"}],
             [{"content": "no role"}]]
    rows = [{"id": i, "messages": c, "seed": i} for i, c in enumerate(convs)]
    out = lray.chat(ray.data.from_items(rows), model=path, actors=1, cpus_per_actor=1,
                    batch_size=4, n_seq_max=4, n_ctx_seq=N_CTX_SEQ, preserve_order=True,
                    temp=0, max_new_tokens=5)
    got = _run(out)
    assert [r["id"] for r in got] == [0, 1, 2, 3]
    with llamagen.Model(path) as m:
        prompts = [m.render_chat(c) for c in convs[:3]]
        assert prompts[0] == "[user]hello\n[assistant]"
        tokens = [m.tokenize(p, add_special=True, parse_special=True) for p in prompts]
    want = _local_outputs(path, tokens, 4, temp=0, max_new_tokens=5)
    for g, w, t in zip(got, want, tokens):
        assert g["error"] is None
        assert g["n_prompt_tokens"] == len(t)
        assert g["text"] == w.text
    assert "role" in got[3]["error"]


def test_the_stage_speculates(ray_tiny_path):
    """speculative= on the stage: the texts of plain decoding (deterministic context), with
    drafts accepted (the tiny model's greedy text loops)."""
    kw = dict(n_seq_max=2, n_ctx_seq=N_CTX_SEQ, n_threads=1, temp=0, max_new_tokens=48,
              ignore_eos=True, context_kwargs={"deterministic": True})
    batch = {"prompt": np.array(["The cat", "hello"], dtype=object)}
    plain = lray.GenerateStage(ray_tiny_path, **kw)(batch)
    stage = lray.GenerateStage(ray_tiny_path, speculative={"type": "ngram-simple", "ngram_n": 3,
                                                           "ngram_m": 16}, **kw)
    out = stage(batch)
    assert list(out["text"]) == list(plain["text"])
    assert stage.stats["accepted_draft_tokens"] > 0
    # a draft model (the same weights: greedy drafts accepted), by path, lengths from speculative=
    stage = lray.GenerateStage(ray_tiny_path, draft_model=ray_tiny_path,
                               speculative={"type": "ngram-simple", "n_max": 6}, **kw)
    out = stage(batch)
    assert list(out["text"]) == list(plain["text"])
    assert stage.params.speculative.type == "draft-simple" and stage.params.speculative.n_max == 6
    assert stage.stats["accepted_draft_tokens"] > 20
