"""Schema keywords llama.cpp's converter does not implement, made into ones it does (or into
grammar of our own) before it runs, so that they are enforced rather than refused:

- ``format`` email, hostname, ipv4, uri on strings: a ``pattern`` the converter turns into grammar;
- ``minimum`` / ``maximum`` / ``exclusiveMinimum`` / ``exclusiveMaximum`` on numbers: a decimal
  range grammar of our own (no exponent, at most 15 fraction digits), put where the converter
  writes a placeholder ``const``; exclusive bounds become the next float, so a validator reading
  the number as a double agrees;
- ``multipleOf`` on integers (and integral ``multipleOf`` on numbers): the multiples as an
  ``enum`` when bounds leave at most 1,000 of them, else (no bounds, or one) a divisibility
  grammar (a digit automaton: remainder, and with one bound how the digits compare with it).

``lower(schema)`` returns the rewritten schema and the grammar of each placeholder;
``llamagen.structured`` puts them together.  What is left (float ``multipleOf``, ``uniqueItems``,
...) is refused there, by keyword and JSON pointer.
"""
from __future__ import annotations

import itertools
import json
import math
from decimal import Decimal, localcontext
from typing import Any, Dict, Optional, Tuple

__all__ = ["lower", "FORMAT_PATTERNS", "MAX_FRACTION_DIGITS", "MAX_ENUM_MULTIPLES"]

_LABEL = "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
FORMAT_PATTERNS = {
    "email": f"^[A-Za-z0-9._%+-]{{1,64}}@{_LABEL}(\\.{_LABEL}){{0,3}}\\.[A-Za-z]{{2,12}}$",
    "hostname": f"^{_LABEL}(\\.{_LABEL}){{0,4}}$",
    "ipv4": f"^{_OCTET}(\\.{_OCTET}){{3}}$",
    "uri": f"^https?://{_LABEL}(\\.{_LABEL}){{0,3}}\\.[A-Za-z]{{2,12}}(/[A-Za-z0-9._~%-]{{1,40}}){{0,6}}$",
}
MAX_FRACTION_DIGITS = 15       # digits after the point: a double still tells the bounds apart
MAX_INT_DIGITS = 16            # as the converter's own number rule
MAX_ENUM_MULTIPLES = 1000      # bounded multipleOf as an enum up to this many values
MAX_DFA_MODULUS = 100          # unbounded integer multipleOf as a divisibility grammar up to this
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_KEEP = ("title", "description", "default", "examples", "$comment")
_counter = itertools.count()


class Unenforceable(ValueError):
    """A keyword neither the converter nor these rewrites can enforce (message names it)."""


def lower(schema: Any) -> Tuple[Any, Dict[str, Tuple[str, str]]]:
    """(rewritten copy of ``schema``, {placeholder: (GBNF expression, rules it uses)}).  The copy
    is ``schema`` itself when nothing needs rewriting.  Unenforceable (a ValueError) for a keyword
    nothing here can enforce."""
    if not isinstance(schema, dict) or not _needs(schema):
        return schema, {}
    out = json.loads(json.dumps(schema))    # (a copy; json's C code takes deep nesting)
    subs: Dict[str, Tuple[str, str]] = {}
    seen = set()
    stack = [(out, "#")]
    while stack:
        node, path = stack.pop()
        if not isinstance(node, dict) or id(node) in seen:
            continue
        seen.add(id(node))
        _rewrite(node, path, subs)
        for key, val in list(node.items()):
            if key in ("properties", "$defs", "definitions", "patternProperties",
                       "dependentSchemas") and isinstance(val, dict):
                stack.extend((v, f"{path}/{key}/{k}") for k, v in val.items())
            elif isinstance(val, dict) and key not in ("const", "enum", "default", "examples"):
                stack.append((val, f"{path}/{key}"))
            elif isinstance(val, list) and key in ("anyOf", "oneOf", "allOf", "prefixItems", "items"):
                stack.extend((v, f"{path}/{key}/{i}") for i, v in enumerate(val))
    return out, subs


def _needs(schema: Any) -> bool:
    seen = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict) or id(node) in seen:
            continue
        seen.add(id(node))
        t = node.get("type")
        ts = [t] if isinstance(t, str) else t if isinstance(t, list) else []
        if node.get("format") in FORMAT_PATTERNS or ("multipleOf" in node and
                                                     ("integer" in ts or "number" in ts)):
            return True
        if "number" in ts and any(k in node for k in _BOUNDS):
            return True
        stack.extend(v for k, v in node.items() if k not in ("const", "enum", "default", "examples"))
    return False


def _rewrite(node: dict, path: str, subs: Dict[str, str]) -> None:
    t = node.get("type")
    if isinstance(t, list) and len(t) > 1 and any(x in ("number", "integer") for x in t) and \
            any(k in node for k in _BOUNDS + ("multipleOf",)):
        # each type its own alternative, every keyword with it (JSON Schema applies number
        # keywords to numbers only)
        alts = [{**{k: v for k, v in node.items() if k != "type"}, "type": x} for x in t]
        node.clear()
        node["anyOf"] = alts
        return
    if t == "string" or (t is None and "format" in node):
        fmt = node.get("format")
        if fmt in FORMAT_PATTERNS and "pattern" not in node:
            del node["format"]
            node["pattern"] = FORMAT_PATTERNS[fmt]
            node.setdefault("type", "string")
        return
    if t not in ("number", "integer"):
        return
    mult = node.get("multipleOf")
    if mult is not None:
        _multiple(node, path, t, mult, subs)
        return
    if t == "number" and any(k in node for k in _BOUNDS):
        lo, hi = _bounds(node, path)
        _placeholder(node, subs, _number_range(lo, hi))


def _num(path: str, key: str, v) -> Decimal:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise Unenforceable(f"{key} at {path} must be a finite number, got {v!r}")
    return Decimal(v) if isinstance(v, int) else Decimal(repr(v))


def _bounds(node: dict, path: str) -> Tuple[Optional[Decimal], Optional[Decimal]]:
    """The inclusive decimal bounds of a number node (None: unbounded)."""
    lo = hi = None
    if "minimum" in node:
        lo = _num(path, "minimum", node["minimum"])
    if "exclusiveMinimum" in node:
        v = node["exclusiveMinimum"]
        _num(path, "exclusiveMinimum", v)
        x = Decimal(repr(math.nextafter(float(v), math.inf)))   # (the next double: a validator
        if float(x) <= v:                                         # compares doubles)
            x = Decimal(repr(math.nextafter(float(x), math.inf)))
        lo = x if lo is None else max(lo, x)
    if "maximum" in node:
        hi = _num(path, "maximum", node["maximum"])
    if "exclusiveMaximum" in node:
        v = node["exclusiveMaximum"]
        _num(path, "exclusiveMaximum", v)
        x = Decimal(repr(math.nextafter(float(v), -math.inf)))
        if float(x) >= v:
            x = Decimal(repr(math.nextafter(float(x), -math.inf)))
        hi = x if hi is None else min(hi, x)
    limit = Decimal(10) ** MAX_INT_DIGITS
    if (lo is not None and abs(lo) >= limit) or (hi is not None and abs(hi) >= limit):
        raise Unenforceable(f"number bounds at {path} are beyond 1e{MAX_INT_DIGITS}")
    # fraction digits beyond MAX_FRACTION_DIGITS cannot be written: round inward
    q = Decimal(1).scaleb(-MAX_FRACTION_DIGITS)
    with localcontext() as dc:
        dc.prec = MAX_INT_DIGITS + MAX_FRACTION_DIGITS + 4
        if lo is not None:
            lo = lo.quantize(q, rounding="ROUND_CEILING")
        if hi is not None:
            hi = hi.quantize(q, rounding="ROUND_FLOOR")
    if lo is not None and hi is not None and lo > hi:
        raise Unenforceable(f"no number lies between the bounds at {path} ({lo} > {hi})")
    return lo, hi


def _multiple(node: dict, path: str, t: str, mult, subs) -> None:
    if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not mult > 0 or \
            not math.isfinite(mult):
        raise Unenforceable(f"multipleOf at {path} must be a number > 0, got {mult!r}")
    if float(mult) != int(mult):
        raise Unenforceable(
            f"multipleOf {mult!r} on a number at {path} cannot be guaranteed: JSON Schema "
            "validators divide in binary floating point (0.3 / 0.1 is not 3); use an integer "
            "multipleOf, or an integer count of the unit")
    m = int(mult)
    lo, hi = _int_bounds(node, path)
    if lo is not None and hi is not None:
        first = -(-lo // m) * m
        if first > hi:
            raise Unenforceable(f"no multiple of {m} lies between the bounds at {path}")
        n = (hi - first) // m + 1
        if n <= MAX_ENUM_MULTIPLES:
            values = list(range(first, hi + 1, m))
            keep = {k: node[k] for k in _KEEP if k in node}
            node.clear()
            node.update(keep)
            node["enum"] = values
            return
        raise Unenforceable(f"multipleOf {m} between bounds that hold {n} multiples at {path}: "
                            f"at most {MAX_ENUM_MULTIPLES} are enforced")
    if m > MAX_DFA_MODULUS:
        raise Unenforceable(f"multipleOf {m} {'beside one bound' if lo is not None or hi is not None else 'without bounds'} "
                            f"at {path}: at most {MAX_DFA_MODULUS} is enforced (give minimum and maximum)")
    name = f"lgmul{next(_counter)}"
    if lo is None and hi is None:
        _placeholder(node, subs, *_multiples_grammar(m, name))
    else:
        _placeholder(node, subs, *_one_bound_multiples(m, lo, hi, name))


def _int_bounds(node: dict, path: str) -> Tuple[Optional[int], Optional[int]]:
    lo = hi = None
    for k in _BOUNDS:
        if k in node:
            _num(path, k, node[k])
    if "minimum" in node:
        lo = math.ceil(node["minimum"])
    if "exclusiveMinimum" in node:
        x = math.floor(node["exclusiveMinimum"]) + 1
        lo = x if lo is None else max(lo, x)
    if "maximum" in node:
        hi = math.floor(node["maximum"])
    if "exclusiveMaximum" in node:
        x = math.ceil(node["exclusiveMaximum"]) - 1
        hi = x if hi is None else min(hi, x)
    return lo, hi


def _placeholder(node: dict, subs: Dict[str, Tuple[str, str]], grammar: str, rules: str = "") -> None:
    name = f"__llamagen_{next(_counter)}__"
    keep = {k: node[k] for k in _KEEP if k in node}
    node.clear()
    node.update(keep)
    node["const"] = name
    subs[name] = (grammar, rules)


# -- grammar --------------------------------------------------------------------------------------

def _alt(parts) -> str:
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else "(" + " | ".join(parts) + ")"


def _seq(*parts) -> str:
    return " ".join(p for p in parts if p)


def _digit_class(a: int, b: int) -> Optional[str]:
    if a > b:
        return None
    return f'"{a}"' if a == b else f"[{a}-{b}]"


def _any(n_min: int, n_max: int) -> str:
    if n_max <= 0:
        return ""
    return f"[0-9]{{{n_min},{n_max}}}" if n_min != n_max else f"[0-9]{{{n_min}}}"


def _same_len(lo: str, hi: str) -> Optional[str]:
    """Digit strings of len(lo) == len(hi) between lo and hi (inclusive), leading zeros allowed."""
    if not lo:
        return ""
    a, b = int(lo[0]), int(hi[0])
    if a == b:
        rest = _same_len(lo[1:], hi[1:])
        return None if rest is None else _seq(f'"{a}"', rest)
    n = len(lo) - 1
    return _alt([_seq(f'"{a}"', _at_least(lo[1:])), _seq(_digit_class(a + 1, b - 1), _any(n, n))
                 if a + 1 <= b - 1 else None, _seq(f'"{b}"', _at_most(hi[1:]))])


def _at_least(s: str) -> str:
    if not s:
        return ""
    d, n = int(s[0]), len(s) - 1
    return _alt([_seq(f'"{d}"', _at_least(s[1:])),
                 _seq(_digit_class(d + 1, 9), _any(n, n)) if d < 9 else None])


def _at_most(s: str) -> str:
    if not s:
        return ""
    d, n = int(s[0]), len(s) - 1
    return _alt([_seq(f'"{d}"', _at_most(s[1:])),
                 _seq(_digit_class(0, d - 1), _any(n, n)) if d > 0 else None])


def _int_range(p: int, q: Optional[int]) -> str:
    """Non-negative integers in [p, q] (q None: no upper bound, at most MAX_INT_DIGITS digits),
    without leading zeros."""
    parts = []
    lp = len(str(p))
    lq = len(str(q)) if q is not None else MAX_INT_DIGITS
    for L in range(lp, lq + 1):
        lo = max(p, 10 ** (L - 1) if L > 1 else 0)
        hi = min(q, 10 ** L - 1) if q is not None else 10 ** L - 1
        if lo > hi:
            continue
        if q is None and L > lp:
            parts.append(_seq("[1-9]", _any(L - 1, lq - 1)))
            break
        parts.append(_same_len(str(lo), str(hi)))
    return _alt(parts)


def _frac(lo: Optional[str], hi: Optional[str], n: int = MAX_FRACTION_DIGITS) -> Optional[str]:
    """Fraction digit strings (1 to n digits, value read as 0.<digits>) with lo <= value <= hi,
    lo / hi given as digit strings (None: no bound).  None when none exists."""
    def go(i, tl, th):
        # tl / th: the digits so far equal lo's / hi's prefix; returns the rest from digit i
        if tl and i >= len(lo):
            tl = False                              # lo's rest reads as zeros: met
        if not tl and not th:
            return _any(1 if i == 0 else 0, n - i) or '""'
        opts = ['""'] if i > 0 and not tl else []   # stop: the rest reads as zeros
        if i < n:
            a = int(lo[i]) if tl else 0
            b = (int(hi[i]) if i < len(hi) else 0) if th else 9
            if a <= b:
                nxt = go(i + 1, tl, th and a == b)
                if nxt is not None:
                    opts.append(f'"{a}"' if nxt == '""' else _seq(f'"{a}"', nxt))
            if b > a:
                nxt = go(i + 1, False, th)
                if nxt is not None:
                    opts.append(f'"{b}"' if nxt == '""' else _seq(f'"{b}"', nxt))
            if a + 1 <= b - 1:
                rest = _any(0, n - i - 1)
                opts.append(_seq(_digit_class(a + 1, b - 1), rest))
        return _alt(opts)
    lo = (lo or "").rstrip("0") or None
    hi = hi.rstrip("0") if hi is not None else None
    return go(0, lo is not None, hi is not None) if lo is not None or hi is not None else \
        _any(1, n)


def _split(x: Decimal) -> Tuple[int, str]:
    """(integer part, fraction digits) of a non-negative decimal."""
    i = int(x)
    f = format(x - i, "f")
    return i, (f.split(".")[1] if "." in f else "").rstrip("0")


def _magnitude(lo: Decimal, hi: Optional[Decimal]) -> Optional[str]:
    """Non-negative decimals in [lo, hi] (hi None: unbounded) as GBNF: int part, optional
    fraction."""
    li, lf = _split(lo)
    frac_any = f'("." {_any(1, MAX_FRACTION_DIGITS)})?'
    parts = []
    if hi is not None:
        hi_i, hf = _split(hi)
        if li == hi_i:
            f = _frac(lf or None, hf) if (lf or hf) else None
            whole = not lf                              # li itself (no fraction) is >= lo
            body = _alt(([f'"." {f}'] if f and f != '""' else []) + ([] if not whole else ['""']))
            return _seq(_int_range(li, li), f"({body})?" if whole and body != '""' and body
                        else (body if body != '""' else ""))
        parts.append(_seq(_int_range(li, li), f'("." {_frac(lf, None)})' if lf else frac_any))
        if li + 1 <= hi_i - 1:
            parts.append(_seq(_int_range(li + 1, hi_i - 1), frac_any))
        parts.append(_seq(_int_range(hi_i, hi_i), f'("." {_frac(None, hf)})?' if hf
                          else f'("." "0"{{1,{MAX_FRACTION_DIGITS}}})?'))
    else:
        parts.append(_seq(_int_range(li, li), f'("." {_frac(lf, None)})' if lf else frac_any))
        parts.append(_seq(_int_range(li + 1, None), frac_any))
    return _alt(parts)


def _number_range(lo: Optional[Decimal], hi: Optional[Decimal]) -> str:
    parts = []
    if hi is None or hi >= 0:
        parts.append(_magnitude(max(lo, Decimal(0)) if lo is not None else Decimal(0), hi))
    if lo is None or lo < 0:
        # negatives: -m with m in [max(-hi, 0), -lo], m > 0 (0 is written without the sign)
        mlo = max(-hi, Decimal(0)) if hi is not None else Decimal(0)
        mhi = -lo if lo is not None else None
        neg = _magnitude(mlo, mhi)
        if neg:
            parts.append(_seq('"-"', neg))
    return _alt(parts)


def _magnitudes(m: int, bound: int, ge: bool, name: str) -> Tuple[Optional[str], list]:
    """Magnitudes (1 to MAX_INT_DIGITS digits, no leading zero) divisible by m and >= bound
    (``ge``) or <= bound, bound >= 1: (expression, rules), None when there are none.  A digit
    automaton: the remainder so far, the digits written, and how the digits compare with the
    bound's first ones (t: equal so far, g: greater, l: less); states that cannot reach an end
    are dropped, so a model is never led where no number is left."""
    B = str(bound)
    D = len(B)
    L = MAX_INT_DIGITS

    def step(w, c, r, d):
        w2, r2 = w + 1, (10 * r + d) % m
        if w2 > D:
            return None if not ge else (w2, "x", r2)
        c2 = c if c != "t" else ("g" if d > int(B[w2 - 1]) else "l" if d < int(B[w2 - 1]) else "t")
        return (w2, c2, r2)

    def accepting(st):
        w, c, r = st
        if r != 0:
            return False
        if ge:
            return w > D or (w == D and c in "tg")
        return w < D or (w == D and c in "tl")

    # every state reachable from the start, with its moves
    start = [(d, (1, "t" if d == int(B[0]) else "g" if d > int(B[0]) else "l", d % m))
             for d in range(1, 10) if not (not ge and D == 1 and d > int(B[0]))]
    moves: dict = {}
    todo = [st for _, st in start]
    while todo:
        st = todo.pop()
        if st in moves:
            continue
        out = []
        if st[0] < L:
            for d in range(10):
                nxt = step(*st, d)
                if nxt is not None:
                    out.append((d, nxt))
                    todo.append(nxt)
        moves[st] = out
    live = {st for st in moves if accepting(st)}
    grew = True
    while grew:
        grew = False
        for st, out in moves.items():
            if st not in live and any(n in live for _, n in out):
                live.add(st)
                grew = True

    def rule(st):
        w, c, r = st
        return f"{name}-{w}{c}{r}"

    def alts(out):
        by: dict = {}
        for d, n in out:
            if n in live:
                by.setdefault(n, []).append(d)
        res = []
        for n, ds in sorted(by.items(), key=lambda kv: kv[1]):
            cls = f'"{ds[0]}"' if len(ds) == 1 else "[" + "".join(map(str, ds)) + "]"
            res.append(f"{cls} {rule(n)}")
        return res

    rules = []
    for st in sorted(live):
        a = alts(moves[st]) + (['""'] if accepting(st) else [])
        rules.append(f"{rule(st)} ::= " + " | ".join(a))
    first = alts(start)
    return (_alt(first) if first else None), rules


def _one_bound_multiples(m: int, lo: Optional[int], hi: Optional[int], name: str) -> Tuple[str, str]:
    """Integers divisible by m with one bound (lo or hi), as the converter writes integers (at
    most MAX_INT_DIGITS digits, "0" unsigned): (expression, rules)."""
    parts, rules = [], []

    def add(expr, rs, neg=False):
        if expr is not None:
            parts.append(f'"-" {expr}' if neg else expr)
            rules.extend(rs)

    if lo is not None:
        if lo >= 1:
            add(*_magnitudes(m, lo, True, f"{name}-p"))
        else:
            parts.append('"0"')
            add(*_magnitudes(m, 1, True, f"{name}-p"))
            if lo <= -1:
                add(*_magnitudes(m, -lo, False, f"{name}-n"), neg=True)
    else:
        if hi >= 0:
            parts.append('"0"')
            if hi >= 1:
                add(*_magnitudes(m, hi, False, f"{name}-p"))
            add(*_magnitudes(m, 1, True, f"{name}-n"), neg=True)
        else:
            add(*_magnitudes(m, -hi, True, f"{name}-n"), neg=True)
    if not parts:
        raise Unenforceable(f"no multiple of {m} of at most {MAX_INT_DIGITS} digits meets the bound")
    return _alt(parts), "\n".join(rules)


def _multiples_grammar(m: int, name: str) -> Tuple[str, str]:
    """Integers divisible by m with at most MAX_INT_DIGITS digits, optionally negative, without
    leading zeros: (expression, the rules it uses).  The rules are a remainder automaton over the
    decimal digits unrolled by length (one rule per remainder and digits left, those that cannot
    reach a multiple dropped): a model cannot run on adding digits forever."""
    if m == 1:
        return '"-"? ("0" | [1-9] [0-9]{0,15})', ""
    L = MAX_INT_DIGITS
    # ok[k]: the remainders from which some k digits or fewer end on a multiple
    ok = [{0}]
    for k in range(1, L):
        ok.append({r for r in range(m) if r == 0 or any((10 * r + d) % m in ok[k - 1]
                                                      for d in range(10))})

    def state(r, k):
        return f"{name}-r{r}-{k}"

    def moves(r, k, first):
        by = {}
        for d in range(1 if first else 0, 10):
            t = (10 * r + d) % m
            if t in ok[k - 1]:
                by.setdefault(t, []).append(d)
        out = []
        for t, ds in sorted(by.items()):
            cls = f'"{ds[0]}"' if len(ds) == 1 else "[" + "".join(str(d) for d in ds) + "]"
            out.append(f"{cls} {state(t, k - 1)}" if k - 1 > 0 else cls if t == 0 else None)
        return [o for o in out if o is not None]

    rules = []
    for k in range(1, L):
        for r in sorted(ok[k]):
            alts = moves(r, k, False) + (['""'] if r == 0 else [])
            rules.append(f"{state(r, k)} ::= " + " | ".join(alts))
    expr = '"-"? ("0" | ' + " | ".join(moves(0, L, True)) + ")"
    return expr, "\n".join(rules)
