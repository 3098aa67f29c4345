"""Checks on GBNF grammar text that llama.cpp's parser handles in ways worse than an error.

llama.cpp (src/llama-grammar.cpp) parses grammars recursively, expands repetitions into copies, and
reads the text as a C string.  Left to it, some grammars end the process or never finish:

- ``x{m,n}`` with ``n < m`` repeats ``x`` ``n - m`` optional times in unsigned arithmetic: the count
  wraps to ~2**64 and the parser allocates rules until memory runs out, with the GIL held;
- nested repetitions multiply (``((x{2000}){2000}){2000}``: 8e9 copies);
- parentheses nested 20,000 deep overflow the C stack in the parser (10,000 passed), and a chain
  of rules that each start with the next (``a ::= b``, ``b ::= c``, ...) overflows it in grammar
  initialisation somewhere between 50,000 (passed) and 200,000 (measured on the main thread's
  8 MB stack; limits here: 256 and 2,000, far below, for threads with small stacks);
- a NUL character ends the text early (the rest is silently dropped);
- ``<[id]>`` takes any 32-bit id, so a token past the vocabulary makes a rule nothing can match;
- every alternative that can start at one position is a parse stack, and llama.cpp deduplicates
  new stacks with a linear search: quadratic in their number.  A rule of 10,000 alternatives took
  0.24 s to build (once to check, once per sequence, again at the first token), 30,000 took 1.9 s,
  100,000 took 40 s -- an ``enum`` of 100,000 values in a JSON schema is such a rule.

This scanner reads the text exactly as the parser tokenizes it -- comments run to ``\\r`` or
``\\n``; string literals, character classes and token references are skipped as units; inside
``{...}`` spaces, tabs, newlines and comments may surround the numbers -- without recursion, and
reports those cases.  Everything else (syntax errors, undefined rules, left recursion) is left to
llama.cpp's own parser, whose message goes into the GrammarError.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set

MAX_NESTING = 256           # parentheses
MAX_CHAIN = 2000            # rules that each start with a reference to the next
MAX_EXPANDED = 2_000_000    # grammar symbols once repetitions are expanded (about)
MAX_FANOUT = 4096           # alternatives open at one position (an enum of 4,000: prepared in 0.03 s)
REPETITION_THRESHOLD = 2000  # llama.cpp: a larger minimum is an error, a larger maximum unbounded

_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
_DIGITS = frozenset("0123456789")


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


def _space(text: str, i: int) -> int:
    """llama.cpp's parse_space with newlines allowed: spaces, tabs, newlines and # comments
    (a comment ends at \\r or \\n)."""
    n = len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
        elif c == "#":
            while i < n and text[i] not in "\r\n":
                i += 1
        else:
            break
    return i


def _int(text: str, i: int):
    j = i
    while j < len(text) and text[j] in _DIGITS:
        j += 1
    return (int(text[i:j]), j) if j > i else (None, i)


def _repetition(text: str, i: int):
    """(min, max or None for unbounded, index past '}') of the ``{...}`` at ``text[i]``, read as
    llama.cpp reads it; None when it does not parse (llama.cpp reports that itself)."""
    lo, i = _int(text, _space(text, i + 1))
    if lo is None:
        return None
    i = _space(text, i)
    if i < len(text) and text[i] == "}":
        return lo, lo, i + 1
    if i >= len(text) or text[i] != ",":
        return None
    hi, i = _int(text, _space(text, i + 1))
    i = _space(text, i)
    if i >= len(text) or text[i] != "}":
        return None
    if hi is not None and hi > REPETITION_THRESHOLD:
        hi = None                       # llama.cpp: unbounded
    return lo, hi, i + 1


def _fold(edges: Dict[str, Set[str]], combine: Callable[[str, List[int]], int]) -> Dict[str, int]:
    """``combine(rule, values of the rules it starts with)`` for every rule, those first, along
    "starts with" edges (cycles cut: left recursion is llama.cpp's error to report).  Iterative
    DFS: a long chain of rules cannot overflow Python's stack here."""
    out: Dict[str, int] = {}
    for start in edges:
        if start in out:
            continue
        stack = [(start, iter(edges[start]))]
        on_path = {start}
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                on_path.discard(node)
                out[node] = combine(node, [out.get(k, 0) for k in edges[node] if k not in on_path])
            elif nxt not in out and nxt not in on_path and nxt in edges:
                on_path.add(nxt)
                stack.append((nxt, iter(edges[nxt])))
    return out


def _longest_chain(edges: Dict[str, Set[str]]) -> int:
    """The longest path (in rules) along "starts with" edges."""
    return max(_fold(edges, lambda rule, below: 1 + max(below, default=0)).values(), default=0)


def _widest_fanout(alts: Dict[str, int], edges: Dict[str, Set[str]]) -> tuple:
    """(fan-out, rule): the most alternatives one rule opens at its start, counting those of
    the rules its alternatives start with."""
    fan = _fold(edges, lambda rule, below: alts.get(rule, 1) + sum(below))
    if not fan:
        return 0, None
    rule = max(fan, key=fan.get)
    return fan[rule], rule


def check(text: str, n_vocab: int) -> Optional[str]:
    """A message for the first problem found in ``text``, or None."""
    if "\0" in text:
        return (f"the grammar contains a NUL character at offset {text.index(chr(0))} (llama.cpp "
                "would stop reading there and drop the rest)")
    n = len(text)
    i = 0
    depth = 0
    rule: Optional[str] = None
    edges: Dict[str, Set[str]] = {}
    alts: Dict[str, int] = {}           # rule -> its alternatives ('|' at any depth, plus one)
    at_start = False                    # the next element begins an alternative
    frames: List[List[int]] = [[0, 0]]  # per open group: [symbols so far, last element's]
    total = 0

    def atom(size: int = 1):
        frames[-1][0] += size
        frames[-1][1] = size

    while i < n:
        c = text[i]
        if c in " \t\r\n#":
            i = _space(text, i)
        elif c == '"':
            i = _skip_quoted(text, i, '"')
            atom()
            at_start = False
        elif c == "[":
            i = _skip_quoted(text, i, "]")
            atom()
            at_start = False
        elif c == "<" or (c == "!" and text.startswith("<", i + 1)):
            j = i + 1 if c == "!" else i
            if text.startswith("<[", j):
                tok, k = _int(text, j + 2)
                if tok is not None and tok >= n_vocab:
                    return (f"token id {tok} in {text[i:k + 2]!r} is past the vocabulary "
                            f"(ids 0..{n_vocab - 1})")
            k = text.find(">", j)
            i = n if k < 0 else k + 1
            atom()
            at_start = False
        elif c in _WORD:
            j = i
            while j < n and text[j] in _WORD:
                j += 1
            name = text[i:j]
            k = _space(text, j)
            if depth == 0 and text.startswith("::=", k):
                # a new rule: the previous one's size counts
                total += frames[0][0]
                frames = [[0, 0]]
                rule = name
                edges.setdefault(rule, set())
                alts[rule] = alts.get(rule, 0) + 1
                at_start = True
                i = k + 3
                continue
            if at_start and rule is not None:
                edges[rule].add(name)
            atom()
            at_start = False
            i = j
        elif c == "|":
            at_start = True
            if rule is not None:
                alts[rule] += 1
            i += 1
        elif c == "(":
            depth += 1
            if depth > MAX_NESTING:
                return (f"parentheses nest more than {MAX_NESTING} deep (llama.cpp's parser "
                        "recurses once per level and would overflow the C stack)")
            frames.append([0, 0])
            i += 1
        elif c == ")":
            if depth > 0:
                depth -= 1
                size = max(1, frames.pop()[0])
                atom(size)
            at_start = False
            i += 1
        elif c in "*+?":
            last = frames[-1][1]
            frames[-1][0] += last
            frames[-1][1] = 2 * last
            i += 1
        elif c == "{":
            rep = _repetition(text, i)
            if rep is None:
                return None                     # malformed: llama.cpp reports it
            lo, hi, i = rep
            if hi is not None and hi < lo:
                return (f"repetition {{{lo},{hi}}}: the maximum ({hi}) is below the minimum "
                        f"({lo})")
            copies = (hi if hi is not None else lo + 1) if lo <= REPETITION_THRESHOLD else 1
            last = frames[-1][1]
            frames[-1][0] += last * max(0, copies - 1)
            frames[-1][1] = last * max(1, copies)
        else:
            if c == ".":
                atom()
                at_start = False
            i += 1
        if frames[-1][0] + total > MAX_EXPANDED:
            return (f"repetitions expand to more than {MAX_EXPANDED:,} grammar symbols "
                    "(nested repetition counts multiply); use smaller counts or * / +")
    fanout, wide = _widest_fanout(alts, edges)
    if fanout > MAX_FANOUT:
        return (f"rule {wide!r} opens {fanout:,} alternatives at one position (the limit is "
                f"{MAX_FANOUT:,}: llama.cpp's grammar takes time quadratic in them); a JSON-schema "
                "enum or anyOf this long is such a rule: use a pattern or fewer values")
    chain = _longest_chain(edges)
    if chain > MAX_CHAIN:
        return (f"{chain} rules each start with a reference to the next (the limit is "
                f"{MAX_CHAIN}: llama.cpp follows such chains recursively and would overflow the "
                "C stack)")
    return None
