"""Fill-in-the-middle prompts: code completion between a prefix and a suffix, with the model's own
FIM tokens, laid out as llama-server's ``/infill`` lays them out (its ``format_prompt_infill``,
the repo-level pattern of https://arxiv.org/pdf/2409.12186)::

    [FIM_REP]myproject\\n [FIM_SEP]file0\\n text0 ... [FIM_SEP]filename\\n
    [FIM_PRE]prefix [FIM_SUF]suffix [FIM_MID]prompt

``fim_tokens(model, prefix, suffix, extra=[{"filename", "text"}], prompt="")`` returns the token
ids; generate from them with any API (``generate``, ``BatchGenerator``, ``AsyncEngine``)::

    toks = llamagen.infill.fim_tokens(model, "def add(a, b):\\n    ", "\\n\\nprint(add(1, 2))")
    middle = llamagen.generate(ctx, toks, max_new_tokens=32, temp=0)
"""
from __future__ import annotations

from typing import Iterable, List, Mapping, Optional

from llamagen.errors import invalid

__all__ = ["fim_tokens", "supports_infill"]


def supports_infill(model) -> bool:
    """Whether ``model`` has the prefix, suffix and middle tokens FIM needs."""
    t = model.fim_tokens
    return all(t[k] is not None for k in ("pre", "suf", "mid"))


def _text(value, field: str) -> str:
    if not isinstance(value, str):
        raise invalid(TypeError, field, f"{field} must be a string, got {type(value).__name__}")
    return value


def fim_tokens(model, prefix: str, suffix: str, *, extra: Iterable[Mapping] = (),
               prompt: str = "", n_batch: int = 512, n_predict: int = 0,
               n_ctx: Optional[int] = None, spm: bool = False) -> List[int]:
    """The FIM prompt's token ids (see the module).  As llama-server: the prefix keeps its last
    3/4 of ``n_batch`` tokens and the suffix its first 1/4 (less the prompt's), extra chunks fill
    what ``n_ctx`` leaves beyond a batch and twice ``n_predict``, newest last; ``spm``: suffix
    first (llama-server's --spm-infill).  ValueError when the model has no FIM tokens."""
    t = model.fim_tokens
    missing = [k for k in ("pre", "suf", "mid") if t[k] is None]
    if missing:
        raise invalid(ValueError, "model", "this model has no fill-in-the-middle tokens ("
                      + ", ".join(f"FIM {k}" for k in missing) + " missing)")
    prefix = _text(prefix, "input_prefix")
    suffix = _text(suffix, "input_suffix")
    prompt = _text(prompt, "prompt")
    if n_ctx is None:
        n_ctx = n_batch * 4

    def tok(text: str) -> List[int]:
        return model.tokenize(text, add_special=False, parse_special=False) if text else []

    extra_tokens: List[int] = []
    if t["rep"] is not None:
        extra_tokens += [t["rep"]] + tok("myproject\n")
    for i, chunk in enumerate(extra):
        if not isinstance(chunk, Mapping):
            raise invalid(TypeError, f"input_extra[{i}]", f"input_extra[{i}] must be an object "
                          "{\"filename\": str, \"text\": str}")
        text = _text(chunk.get("text"), f"input_extra[{i}].text")
        filename = _text(chunk.get("filename", "tmp"), f"input_extra[{i}].filename")
        if t["sep"] is not None:
            extra_tokens += [t["sep"]] + tok(filename + "\n")
        else:
            extra_tokens += tok("\n\n--- snippet ---\n\n")
        extra_tokens += tok(text)
    if t["sep"] is not None:
        extra_tokens += [t["sep"]] + tok("filename\n")

    prompt_tokens = tok(prompt)
    pre, suf = tok(prefix), tok(suffix)
    n_pre = min(len(pre), 3 * (n_batch // 4))
    n_suf = min(len(suf), max(0, n_batch // 4 - (2 + len(prompt_tokens))))
    n_extra = min(max(0, n_ctx - n_batch - 2 * n_predict), len(extra_tokens))
    pre = [t["pre"]] + pre[len(pre) - n_pre:] + prompt_tokens
    suf = [t["suf"]] + suf[:n_suf]
    first, second = (suf, pre) if spm else (pre, suf)
    out = list(first)
    if model.add_bos and model.bos is not None:
        out.insert(0, model.bos)
    out[0:0] = extra_tokens[len(extra_tokens) - n_extra:]
    return out + second + [t["mid"]]
