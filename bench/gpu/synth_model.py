"""Write a synthetic Llama-architecture GGUF of a real model's shape: random weights, fixed seed.

    python bench/gpu/synth_model.py llama-3.2-1b /tmp/llama-1b-f16.gguf
    python bench/gpu/synth_model.py llama-3.1-8b /tmp/llama-8b-f16.gguf
    python bench/gpu/synth_model.py --tiny /tmp/tiny-f16.gguf          # smoke tests

The weights are F16 (norms F32, as in converted models), normal with a small standard deviation
(0.02) so activations stay finite and the logits are spread enough for sampling to produce varied
tokens.  Speed and memory traffic are what a real model of that shape has; the text is noise.

The vocabulary is a synthetic byte-level BPE ("gpt2" tokenizer model, "llama-bpe" pre-tokenizer,
as Llama 3 has) of 128,256 tokens: the 256 byte symbols (so any text tokenizes), ~128k tokens made
by merges of existing tokens (word-like pieces, each reachable through its merge), and 256 special
tokens at the end with Llama 3's names (<|begin_of_text|> = BOS, <|end_of_text|> and <|eot_id|>
end of generation).

Writing streams one tensor at a time (16 GB of F16 for the 8B shape never sits in memory at once);
random numbers come from one pool per file (fixed seed), copied into each tensor from a random
offset, so no tensor repeats another and no per-element Python work is done.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
import time

import numpy as np

import gguf

PRESETS = {
    # Llama 3.2 1B: tied input/output embeddings
    "llama-3.2-1b": dict(n_embd=2048, n_layer=16, n_head=32, n_head_kv=8, n_ff=8192,
                         rope_theta=500000.0, tied=True, n_ctx_train=131072),
    # Llama 3.1 8B: separate output matrix
    "llama-3.1-8b": dict(n_embd=4096, n_layer=32, n_head=32, n_head_kv=8, n_ff=14336,
                         rope_theta=500000.0, tied=False, n_ctx_train=131072),
    # smoke tests: the real 128k vocabulary, a tiny body (K-quants apply: rows of 256)
    "tiny": dict(n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512,
                 rope_theta=500000.0, tied=True, n_ctx_train=8192),
}
VOCAB_SIZE = 128256
POOL = (1 << 24) + 43        # random values per file; odd, so rows taken from it do not repeat

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                   "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: every byte as a printable character (space -> 'Ġ')."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


def synth_vocab(vocab_size: int = VOCAB_SIZE, seed: int = 0):
    """(tokens, token types, merges, special ids) of a synthetic byte-level BPE vocabulary."""
    n_special = 256 if vocab_size >= 4096 else 16
    if vocab_size < 256 + n_special + 64:
        raise ValueError(f"vocab_size {vocab_size} is too small")
    b2u = bytes_to_unicode()
    space = b2u[ord(" ")]
    tokens = [b2u[b] for b in range(256)]
    seen = set(tokens)
    merges: list[str] = []
    n_normal = vocab_size - n_special
    rnd = random.Random(seed)

    def add(left: str, right: str) -> bool:
        new = left + right
        if new in seen or len(new) > 16:
            return False
        seen.add(new)
        tokens.append(new)
        merges.append(f"{left} {right}")
        return True

    lower = string.ascii_lowercase
    # frequent English-like pairs first (low ranks), then growing word pieces
    words = []
    for c in lower:
        add(space, c)
        words.append(space + c)
    for a in lower:
        for b in "aeioustnrlh":
            if len(tokens) < n_normal and add(a, b):
                words.append(a + b)
    for d in string.digits:
        for e in string.digits:
            if len(tokens) < n_normal:
                add(d, e)
    while len(tokens) < n_normal:
        r = rnd.random()
        left = words[int(len(words) * rnd.random() ** 0.7)]
        if r < 0.75:
            right = lower[int(26 * rnd.random() ** 1.5)]
        elif r < 0.9:
            right = words[rnd.randrange(len(words))]
            if right.startswith(space):
                continue
        else:
            right = rnd.choice(string.ascii_uppercase + string.punctuation)
            if right not in seen:
                continue
        if add(left, right):
            words.append(left + right)
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    specials = LLAMA3_SPECIALS + [f"<|reserved_special_token_{i}|>"
                                  for i in range(3, 3 + n_special - len(LLAMA3_SPECIALS))]
    specials = specials[:n_special]
    tokens += specials
    types += [int(gguf.TokenType.CONTROL)] * len(specials)
    assert len(tokens) == vocab_size == len(set(tokens))
    ids = dict(bos=n_normal, eos=n_normal + 1,
               eot=n_normal + specials.index("<|eot_id|>") if "<|eot_id|>" in specials else None)
    return tokens, types, merges, ids


class _Pool:
    """Random F16 values, filled into tensors from random offsets (a copy, no per-element work)."""

    def __init__(self, rng: np.random.Generator, std: float):
        self.rng = rng
        self.values = (rng.standard_normal(POOL, dtype=np.float32) * std).astype(np.float16)

    def take(self, shape) -> np.ndarray:
        n = int(np.prod(shape))
        out = np.empty(n, dtype=np.float16)
        o = int(self.rng.integers(POOL))
        pos = 0
        while pos < n:
            k = min(n - pos, POOL - o)
            out[pos:pos + k] = self.values[o:o + k]
            pos += k
            o = 0
        return out.reshape(shape)


def tensor_plan(cfg: dict, n_vocab: int):
    """[(name, numpy shape, dtype)] in file order (numpy shape = (ne1, ne0))."""
    e, f = cfg["n_embd"], cfg["n_ff"]
    kv = e // cfg["n_head"] * cfg["n_head_kv"]
    plan = [("token_embd.weight", (n_vocab, e), np.float16)]
    for i in range(cfg["n_layer"]):
        p = f"blk.{i}."
        plan += [(p + "attn_norm.weight", (e,), np.float32),
                 (p + "attn_q.weight", (e, e), np.float16),
                 (p + "attn_k.weight", (kv, e), np.float16),
                 (p + "attn_v.weight", (kv, e), np.float16),
                 (p + "attn_output.weight", (e, e), np.float16),
                 (p + "ffn_norm.weight", (e,), np.float32),
                 (p + "ffn_gate.weight", (f, e), np.float16),
                 (p + "ffn_up.weight", (f, e), np.float16),
                 (p + "ffn_down.weight", (e, f), np.float16)]
    plan.append(("output_norm.weight", (e,), np.float32))
    if not cfg["tied"]:
        plan.append(("output.weight", (n_vocab, e), np.float16))
    return plan


def write_synth_model(path, preset: str = "tiny", *, seed: int = 0, vocab_size: int = VOCAB_SIZE,
                      std: float = 0.02, n_layer: int | None = None, progress: bool = False) -> dict:
    """Write the model; return a summary (path, preset, bytes, n_params, seconds, ...)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    t0 = time.perf_counter()
    cfg = dict(PRESETS[preset])
    if n_layer is not None:
        cfg["n_layer"] = n_layer
    tokens, types, merges, ids = synth_vocab(vocab_size, seed)
    head_dim = cfg["n_embd"] // cfg["n_head"]
    path = os.fspath(path)
    tmp = path + ".partial"

    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(f"llamagen-synthetic-{preset}")
    w.add_description(f"synthetic {preset}-shaped model, random weights (seed {seed}, std {std})")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(cfg["n_ctx_train"])
    w.add_embedding_length(cfg["n_embd"])
    w.add_block_count(cfg["n_layer"])
    w.add_feed_forward_length(cfg["n_ff"])
    w.add_head_count(cfg["n_head"])
    w.add_head_count_kv(cfg["n_head_kv"])
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(ids["bos"])
    w.add_eos_token_id(ids["eos"])
    if ids["eot"] is not None:
        w.add_eot_token_id(ids["eot"])
    w.add_add_bos_token(True)

    plan = tensor_plan(cfg, vocab_size)
    n_params = 0
    for name, shape, dtype in plan:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        w.add_tensor_info(name, shape, np.dtype(dtype), nbytes)
        n_params += int(np.prod(shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    pool = _Pool(np.random.default_rng(seed), std)
    ones = {}
    for i, (name, shape, dtype) in enumerate(plan):
        if dtype == np.float32:          # norms: 1, as a freshly initialised model has them
            arr = ones.setdefault(shape, np.ones(shape, dtype=np.float32))
        else:
            arr = pool.take(shape)
        w.write_tensor_data(arr)
        if progress and (i % 16 == 0 or i == len(plan) - 1):
            print(f"  {i + 1}/{len(plan)} tensors", file=sys.stderr, flush=True)
    w.close()
    os.replace(tmp, path)
    return dict(path=path, preset=preset, seed=seed, vocab_size=vocab_size, n_params=n_params,
                bytes=os.path.getsize(path), seconds=time.perf_counter() - t0,
                **{k: cfg[k] for k in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "tied")})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", nargs="?", choices=sorted(PRESETS), help="model shape")
    ap.add_argument("out", help="output .gguf path")
    ap.add_argument("--tiny", action="store_true", help="the tiny preset (smoke tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02, help="weights' standard deviation")
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    ap.add_argument("--n-layer", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    preset = "tiny" if a.tiny else a.preset
    if preset is None:
        ap.error("give a preset or --tiny")
    info = write_synth_model(a.out, preset, seed=a.seed, vocab_size=a.vocab_size, std=a.std,
                             n_layer=a.n_layer, progress=not a.quiet)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
