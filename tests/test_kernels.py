"""Our CPU kernels (patches under third_party/) against the ones they replace, bit for bit."""
from __future__ import annotations

import pytest

from script_util import run_script

# a batch's decodes at several row counts (prefills of ~40 rows, then steps of 2-12 rows: full
# tiles and every remainder), every token and top-3 logprob as exact floats.  gemma3's Q4_K_M has
# Q8_0 (its 262k-row output matrix) and Q5_0 (its 640-wide rows) weights, SmolLM2's Q4_1 layers
# and a Q8_0 output matrix
_BATCHES = """
import hashlib, struct
model = llamagen.Model(MODEL)
prompts = [f"Rewrite the line below in capitals.\\n\\nLine {i}: the {w} sat on the mat, and then "
           f"it rained for {i + 2} days over the town." for i, w in enumerate(
               ["cat", "dog", "bird", "fox", "cow", "owl", "bee", "ant", "elk", "yak", "emu", "eel"])]
for size in (2, 3, 5, 7, 9, 12):
    ctx = llamagen.Context(model, n_ctx=size * 256, n_seq_max=size, kv_unified=True, n_threads=2)
    h = hashlib.md5()
    for r in llamagen.map_generate(ctx, prompts[:size], batch_size=size, max_new_tokens=6,
                                   logprobs=3, temp=0):
        h.update(str(r.tokens).encode())
        for lp in r.logprobs:
            h.update(struct.pack("f", lp.logprob))
            for t in lp.top:
                h.update(struct.pack("if", t.token, t.logprob))
    print("SIZE", size, h.hexdigest())
    ctx.close()
"""


def _hashes(model_path, env):
    rc, out = run_script(_BATCHES, env_extra=env, MODEL=str(model_path))
    assert rc == 0, out
    return [line for line in out.splitlines() if line.startswith("SIZE ")]


@pytest.mark.parametrize("which", ["gemma3", "smollm2"])
def test_many_row_products_equal_the_reference_kernels_bit_for_bit(real_model_path, smollm2_path,
                                                                   which):
    # patch 0009: with AVX-512 VNNI, llamafile's Q8_0/Q5_0 products go through lg_matmul and Q4_1
    # through lgQ41; with LLAMAGEN_TINYBLAS_REF=1, through llamafile's mnpack and ggml's vec_dot
    # (without AVX-512 VNNI both runs take those).  One-row mode's use of them is checked
    # against plain decoding by tests/test_speculative.py (exact verification)
    path = real_model_path if which == "gemma3" else smollm2_path
    ref = _hashes(path, {"LLAMAGEN_TINYBLAS_REF": "1"})
    ours = _hashes(path, {})
    assert len(ref) == 6
    assert ours == ref

