"""Checks on GBNF grammar text that llama.cpp's parser gets wrong in ways worse than an error.

llama.cpp (src/llama-grammar.cpp) parses ``x{m,n}`` with ``n < m`` by repeating ``x`` ``n - m``
optional times in unsigned arithmetic: the count wraps to ~2**64 and the parser allocates rules
until memory runs out, with the GIL held.  And ``<[id]>`` takes any 32-bit id, so a token past the
vocabulary makes a rule nothing can match.  This scanner walks the grammar the way the parser
tokenizes it (comments, string literals, character classes and token references are skipped as
units) and reports those two cases; everything else is left to llama.cpp's own parser.
"""
from __future__ import annotations

import re
from typing import Optional

_INT = re.compile(r"\s*([0-9]+)\s*")
_TOKEN_ID = re.compile(r"!?<\[([0-9]+)\]>")


def _skip_quoted(text: str, i: int, close: str) -> int:
    """Index just past the ``close`` that ends the literal opened at ``text[i]`` (escapes
    skipped), or len(text) when it is not closed (the parser reports that itself)."""
    i += 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == close:
            return i + 1
        i += 1
    return n


def check(text: str, n_vocab: int) -> Optional[str]:
    """A message for the first problem found in ``text``, or None."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
        elif c == '"':
            i = _skip_quoted(text, i, '"')
        elif c == "[":
            i = _skip_quoted(text, i, "]")
        elif c in "<!":
            m = _TOKEN_ID.match(text, i)
            if m is not None:
                tok = int(m.group(1))
                if tok >= n_vocab:
                    return (f"token id {tok} in {m.group(0)!r} is past the vocabulary "
                            f"(ids 0..{n_vocab - 1})")
                i = m.end()
            elif c == "<":
                j = text.find(">", i)
                i = n if j < 0 else j + 1
            else:
                i += 1
        elif c == "{":
            j = text.find("}", i)
            if j < 0:
                return None                     # unbalanced: llama.cpp reports it
            body = text[i + 1:j]
            lo_s, comma, hi_s = body.partition(",")
            lo_m = _INT.fullmatch(lo_s) if lo_s.strip() else None
            hi_m = _INT.fullmatch(hi_s) if hi_s.strip() else None
            if comma and lo_m is not None and hi_m is not None:
                lo, hi = int(lo_m.group(1)), int(hi_m.group(1))
                if hi < lo:
                    return (f"repetition {{{body.strip()}}}: the maximum ({hi}) is below the "
                            f"minimum ({lo})")
            i = j + 1
        else:
            i += 1
    return None
