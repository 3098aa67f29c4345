"""Sampling parameters: validated once, immutable, reusable across generations and sequences."""
from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Tuple

from llamagen.errors import LlamaError, invalid

if TYPE_CHECKING:
    from llamagen.speculative import Speculative

__all__ = ["SamplingParams", "DEFAULT_DRY_BREAKERS", "SAMPLER_IMPLS"]

DEFAULT_DRY_BREAKERS = ("\n", ":", '"', "*")
SAMPLER_IMPLS = ("fast", "llama.cpp", "backend")
MAX_LOGPROBS = 20           # alternatives per token, as OpenAI's top_logprobs
MAX_DRY_BREAKERS = 64
# a grammar trigger is compiled with std::regex, which recurses per element: a 100,000-character
# pattern (plain letters too) or 100,000 nested groups was a SIGSEGV; 10,000 of either compiled
MAX_TRIGGER_CHARS = 4096
MAX_TRIGGER_NESTING = 256


# the C types the values go to: int32_t (llama.cpp's counts, lengths and token ids) and float
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1
FLT_MIN = struct.unpack("<f", struct.pack("<I", 0x00800000))[0]     # smallest normal float32
FLT_MAX = struct.unpack("<f", struct.pack("<I", 0x7F7FFFFF))[0]
_F32 = struct.Struct("<f")
# the smallest positive temperature: logit / temp stays finite in float32 for |logit| up to 3.4e8
# (at FLT_MIN a logit of 4 already overflows to inf, and sampling from inf logits is random)
TEMP_MIN = 1e-30
# the longest penalty / DRY window an int32 holds: a window longer than the context means the
# whole context, and the sampler builders clamp it to n_ctx (llama.cpp would allocate all of it)
MAX_WINDOW = (1 << 31) - 1


def _field(name: str) -> str:
    """The SamplingParams field an error is about ("logit_bias for token 3" -> "logit_bias")."""
    return name.split(" ", 1)[0]


def _show(value):
    """repr() for an error message; a huge int is described, not printed (it may be thousands of
    digits long, or past the interpreter's int-to-str limit)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an int of {value.bit_length()} bits"
    return repr(value)


def _f32(name, v, original):
    """``v`` (a finite Python float) unless float32, the type llama.cpp computes in, would make it
    something else: inf (|v| > FLT_MAX) or a subnormal / zero (0 < |v| < FLT_MIN)."""
    try:
        (v32,) = _F32.unpack(_F32.pack(v))
    except OverflowError:
        v32 = math.inf
    if v != 0.0 and not FLT_MIN <= abs(v32) <= FLT_MAX:
        raise invalid(ValueError, _field(name), f"{name} does not fit a 32-bit float (nonzero magnitudes from {FLT_MIN:.8g} "
                         f"to {FLT_MAX:.8g}), got {_show(original)}")
    return v


def _is_bool(value) -> bool:
    return isinstance(value, bool) or type(value).__name__ in ("bool", "bool_")   # (numpy's too)


def _num(name, value, lo=-math.inf, hi=math.inf, *, lo_open=False, what=None):
    # numbers.Real takes numpy's floats and ints (np.float32 is not a float subclass)
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise invalid(TypeError, _field(name), f"{name} must be a number, got {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:               # an int beyond float64
        v = math.inf if value > 0 else -math.inf
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        raise invalid(ValueError, _field(name), f"{name} must be {what or f'a finite number in [{lo}, {hi}]'}, "
                         f"got {_show(value)}")
    return _f32(name, v, value)


def _int(name, value, lo=INT32_MIN, hi=INT32_MAX, what=None):
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise invalid(TypeError, _field(name), f"{name} must be an int, got {type(value).__name__}")
    value = operator.index(value)       # numpy's ints -> int
    if value < lo or value > hi:
        raise invalid(ValueError, _field(name), f"{name} must be {what or f'an int in [{lo}, {hi}]'}, got {_show(value)}")
    return value


def _flag(name, value) -> bool:
    """True or False (numpy's bools and 0/1 too); bool("no") is True, so a str is refused."""
    if isinstance(value, str) or not (_is_bool(value) or value in (0, 1)):
        raise invalid(TypeError, _field(name), f"{name} must be True or False, got {value!r}")
    return bool(value)


def _strings(name, value, what):
    """A str or a list of non-empty str (each UTF-8-encodable) -> a tuple of them."""
    items = (value,) if isinstance(value, str) else _tuple(name, value or (), "a str or a list of str")
    for x in items:
        if not isinstance(x, str) or not x:
            raise invalid(ValueError, _field(name), f"{name} must be non-empty {what}")
        _text(name, x)
    return items


def _regex_nesting(pattern):
    """How deep ``pattern``'s groups nest (escapes and character classes skipped)."""
    depth = deepest = 0
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")" and depth > 0:
            depth -= 1
        i += 1
    return deepest


def _triggers(value):
    items = _strings("grammar_triggers", value, "regex strings")
    for i, x in enumerate(items):
        if len(x) > MAX_TRIGGER_CHARS:
            raise invalid(ValueError, "grammar_triggers", f"grammar_triggers[{i}] is {len(x)} characters long: at most "
                             f"{MAX_TRIGGER_CHARS} (std::regex recurses per element)")
        if _regex_nesting(x) > MAX_TRIGGER_NESTING:
            raise invalid(ValueError, "grammar_triggers", f"grammar_triggers[{i}] nests groups more than {MAX_TRIGGER_NESTING} "
                             f"deep (std::regex recurses per group)")
    return items


def _text(name, value):
    """``value`` (a str) unless it cannot be UTF-8 (a lone surrogate): ValueError naming it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise invalid(ValueError, _field(name), f"{name} is not valid Unicode text: {e.reason} at index {e.start} "
                         f"({value[e.start]!r})") from None
    return value


def _tuple(name, value, what):
    try:
        return tuple(value)
    except TypeError:                   # not iterable
        raise invalid(TypeError, _field(name), f"{name} must be {what}, got {type(value).__name__}") from None


@dataclass(frozen=True)
class SamplingParams:
    """Every knob of generation.  Build once (validated here), pass to gen_begin/generate/batches.

    The sampler chain follows llama.cpp's own order: logit_bias -> penalties -> DRY -> top_n_sigma ->
    top_k -> typical_p -> top_p -> min_p -> XTC -> temperature -> dist(seed).  ``mirostat`` 1 or 2
    replaces it with temperature -> mirostat.  ``temp <= 0`` is greedy.
    """
    max_new_tokens: int = 256
    temp: float = 0.8
    top_k: int = 50
    top_p: float = 0.9
    seed: Optional[int] = 42
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    grammar: Optional[str] = None
    # beyond the R API
    stop: Tuple[str, ...] = ()
    logit_bias: Tuple[Tuple[int, float], ...] = ()
    ignore_eos: bool = False
    min_keep: int = 0
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: Tuple[str, ...] = DEFAULT_DRY_BREAKERS
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    top_n_sigma: float = -1.0
    grammar_root: str = "root"
    # which engine runs the chain: "fast" (llamagen's own, token-identical to llama.cpp's),
    # "llama.cpp" (llama.cpp's own sampler objects: the reference, and the fallback) or "backend"
    # (llama.cpp's backend sampling: the chain runs inside the decode graph on the model's output
    # device; greedy picks the same tokens, random draws differ from the host engines'; no grammar)
    sampler_impl: str = "fast"
    # log-probabilities of generated tokens: None (off) or k = 0..20 alternatives per token besides
    # the chosen one (log-softmax of the raw logits, before any sampler, as OpenAI reports them)
    logprobs: Optional[int] = None
    # log-probabilities of the prompt's tokens (vLLM's ``prompt_logprobs``; OpenAI's ``echo`` with
    # ``logprobs``): None (off) or k alternatives per token; each prompt token but the first gets
    # logp(token | tokens before it).  Batches and the engine only (one text: llamagen.score).  The
    # whole prompt is then computed (no prompt cache), and ``max_new_tokens=0`` is allowed
    prompt_logprobs: Optional[int] = None
    # structured output: a JSON schema (dict or JSON text, kept as JSON text) or any JSON object;
    # converted to a grammar by llama.cpp's converter (see llamagen.structured)
    json_schema: Optional[str] = None
    json_object: bool = False
    # what a chat template's tool-call format asks of sampling (llamagen.tools fills them from
    # Model.render_chat_params, as llama-server does): a lazy grammar sleeps until one of the
    # trigger regexes (std::regex, ECMAScript) matches the generated text or a trigger token is
    # sampled; grammar_prefill: tokens the grammar accepts before the first generated one;
    # preserved_tokens: token ids whose text is shown although they are special (control) tokens
    grammar_lazy: bool = False
    grammar_triggers: Tuple[str, ...] = ()
    grammar_trigger_tokens: Tuple[int, ...] = ()
    grammar_prefill: Tuple[int, ...] = ()
    preserved_tokens: Tuple[int, ...] = ()
    # speculative decoding (llamagen.Speculative, a type name or a dict of its fields): draft
    # tokens from the sequence's history and verify them in one decode; the same tokens as
    # without it wherever the logits agree (see llamagen.speculative)
    speculative: Optional["Speculative"] = None
    # LoRA adapters for this request ({llamagen.LoraAdapter: scale}, pairs, or one adapter at
    # scale 1), kept as a tuple of (adapter, scale) without zero scales; () is the base model,
    # None the context's default (Context.set_adapters)
    lora: Optional[Tuple[Tuple[object, float], ...]] = None
    # thinking budget (a template that thinks, common/reasoning-budget.h): at most
    # ``reasoning_budget`` tokens after ``reasoning_start`` and before one of ``reasoning_end``,
    # then ``reasoning_forced`` (default: the first end sequence) is forced token by token.
    # Token ids; llamagen.chat fills start / end from the template (ChatPrompt.params)
    reasoning_budget: Optional[int] = None
    reasoning_start: Tuple[int, ...] = ()
    reasoning_end: Tuple[Tuple[int, ...], ...] = ()
    reasoning_forced: Tuple[int, ...] = ()

    def __post_init__(self):
        s = object.__setattr__
        if self.lora is not None:
            s(self, "lora", canonical_lora(self.lora))
        if self.prompt_logprobs is not None:
            s(self, "prompt_logprobs", _int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS,
                                            f"None (off) or an int from 0 to {MAX_LOGPROBS} "
                                            "(alternatives per prompt token)"))
        # (0: the prompt only, for its prompt_logprobs)
        s(self, "max_new_tokens", _int("max_new_tokens", self.max_new_tokens,
                                       0 if self.prompt_logprobs is not None else 1, INT32_MAX,
                                       "an int from 1 (0 with prompt_logprobs) to 2**31 - 1"))
        s(self, "temp", _num("temp", self.temp, what="a finite number (<= 0 means greedy)"))
        if 0.0 < self.temp < TEMP_MIN:
            raise invalid(ValueError, "temp", f"temp must be <= 0 (greedy) or at least {TEMP_MIN:g}: the logits are "
                             f"divided by it in 32-bit floats and would overflow, got {self.temp!r}")
        s(self, "top_k", _int("top_k", self.top_k, what="an int in [-2**31, 2**31 - 1] (<= 0 = off)"))
        s(self, "top_p", _num("top_p", self.top_p, 0.0, 1.0))
        if self.seed is not None:
            s(self, "seed", _int("seed", self.seed, 0, 0xFFFFFFFE, "None or an int in [0, 2**32 - 2]"))
        s(self, "min_p", _num("min_p", self.min_p, 0.0, 1.0))
        s(self, "typical_p", _num("typical_p", self.typical_p, 0.0, 1.0))
        s(self, "repeat_penalty", _num("repeat_penalty", self.repeat_penalty, 0.0, math.inf, lo_open=True,
                                       what="a finite number > 0 (1 = off)"))
        s(self, "repeat_last_n", _int("repeat_last_n", self.repeat_last_n, -1, MAX_WINDOW,
                                      "-1 (whole context), 0 (off) or a window in tokens (an int32)"))
        s(self, "frequency_penalty", _num("frequency_penalty", self.frequency_penalty,
                                          what="a finite number (0 = off)"))
        s(self, "presence_penalty", _num("presence_penalty", self.presence_penalty,
                                         what="a finite number (0 = off)"))
        if _is_bool(self.mirostat) or not isinstance(self.mirostat, numbers.Integral) or \
                self.mirostat not in (0, 1, 2):
            raise invalid(ValueError, "mirostat", f"mirostat must be 0, 1 or 2, got {self.mirostat!r}")
        s(self, "mirostat", int(self.mirostat))
        s(self, "mirostat_tau", _num("mirostat_tau", self.mirostat_tau, 0.0, math.inf))
        s(self, "mirostat_eta", _num("mirostat_eta", self.mirostat_eta, 0.0, math.inf))
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise invalid(TypeError, "grammar", f"grammar must be a GBNF string or None, got {type(self.grammar).__name__}")
        if self.grammar is not None and not self.grammar.strip():
            raise invalid(ValueError, "grammar", "grammar must not be empty (use None for no grammar)")
        if self.grammar is not None:
            _text("grammar", self.grammar)
            if "\0" in self.grammar:
                raise invalid(ValueError, "grammar", "grammar contains a NUL character (llama.cpp would stop reading "
                                 "there and silently drop the rest)")
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        stop = _tuple("stop", stop, "a str or a list of str")
        for x in stop:
            if not isinstance(x, str):
                raise invalid(TypeError, "stop", f"stop strings must be str, got {type(x).__name__}")
            if not x:
                raise invalid(ValueError, "stop", "stop strings must not be empty")
            _text("stop", x)
        s(self, "stop", stop)
        bias = self.logit_bias
        if bias is None:
            bias = ()
        items = bias.items() if isinstance(bias, Mapping) else \
            _tuple("logit_bias", bias, "a dict {token id: bias}")
        clean = []
        for pair in items:
            try:
                tok, b = pair
            except (TypeError, ValueError):
                raise invalid(TypeError, "logit_bias", "logit_bias must be a dict {token id: bias}") from None
            tok = _int("logit_bias token", tok, 0, INT32_MAX, "a token id in [0, 2**31 - 1]")
            what = "a finite number or -inf (never pick the token)"
            if _is_bool(b) or not isinstance(b, numbers.Real):
                raise invalid(ValueError, "logit_bias", f"logit_bias for token {tok} must be {what}, got {b!r}")
            if b != -math.inf:
                b = _num(f"logit_bias for token {tok}", b, what=what)
            clean.append((tok, float(b)))
        s(self, "logit_bias", tuple(clean))
        s(self, "ignore_eos", _flag("ignore_eos", self.ignore_eos))
        s(self, "min_keep", _int("min_keep", self.min_keep, 0, INT32_MAX, "an int from 0 to 2**31 - 1"))
        s(self, "dynatemp_range", _num("dynatemp_range", self.dynatemp_range, 0.0, math.inf))
        s(self, "dynatemp_exponent", _num("dynatemp_exponent", self.dynatemp_exponent))
        s(self, "dry_multiplier", _num("dry_multiplier", self.dry_multiplier, 0.0, math.inf))
        s(self, "dry_base", _num("dry_base", self.dry_base, 1.0, math.inf, what="a finite number >= 1"))
        s(self, "dry_allowed_length", _int("dry_allowed_length", self.dry_allowed_length, 0,
                                           INT32_MAX, "an int from 0 to 2**31 - 1"))
        s(self, "dry_penalty_last_n", _int("dry_penalty_last_n", self.dry_penalty_last_n, -1,
                                           MAX_WINDOW, "-1 (whole context), 0 (off) or a window "
                                           "in tokens (an int32)"))
        br = _strings("dry_sequence_breakers", self.dry_sequence_breakers, "strings")
        if len(br) > MAX_DRY_BREAKERS:
            # llama.cpp scans the whole vocabulary for each one when a sequence starts
            raise invalid(ValueError, "dry_sequence_breakers", f"dry_sequence_breakers holds {len(br)} strings; the limit is "
                             f"{MAX_DRY_BREAKERS} (each costs ~23 ms per sequence at a 262k "
                             "vocabulary)")
        s(self, "dry_sequence_breakers", br)
        s(self, "xtc_probability", _num("xtc_probability", self.xtc_probability, 0.0, 1.0))
        s(self, "xtc_threshold", _num("xtc_threshold", self.xtc_threshold, 0.0, 1.0))
        s(self, "top_n_sigma", _num("top_n_sigma", self.top_n_sigma, what="a finite number (<= 0 = off)"))
        if not isinstance(self.grammar_root, str) or not self.grammar_root:
            raise invalid(ValueError, "grammar_root", "grammar_root must be a non-empty rule name")
        _text("grammar_root", self.grammar_root)
        if self.sampler_impl not in SAMPLER_IMPLS:
            raise invalid(ValueError, "sampler_impl", f"sampler_impl must be one of {', '.join(map(repr, SAMPLER_IMPLS))}, "
                             f"got {self.sampler_impl!r}")
        if self.logprobs is not None:
            s(self, "logprobs", _int("logprobs", self.logprobs, 0, MAX_LOGPROBS,
                                     f"None (off) or an int from 0 to {MAX_LOGPROBS} (alternatives "
                                     "per token)"))
        s(self, "json_object", _flag("json_object", self.json_object))
        schema_grammar = None
        if self.json_schema is not None or self.json_object:
            from llamagen import structured
            if self.json_schema is not None and self.json_object:
                raise invalid(ValueError, "json_schema", "json_schema and json_object=True are exclusive (a schema already "
                                 "says which JSON it takes)")
            if self.grammar is not None:
                raise invalid(ValueError, "grammar", "grammar and json_schema/json_object are exclusive: the schema is "
                                 "turned into a grammar")
            try:
                if self.json_schema is not None:
                    s(self, "json_schema", structured.normalize(self.json_schema))
                schema_grammar = structured.schema_to_grammar(
                    self.json_schema if self.json_schema is not None
                    else structured.JSON_OBJECT_SCHEMA)
            except (ValueError, TypeError) as e:
                if isinstance(e, LlamaError):       # (a GrammarError, or one with its field)
                    raise
                raise invalid(type(e), "json_schema", str(e)) from None
            if self.grammar_root != "root":
                raise invalid(ValueError, "grammar_root", "grammar_root does not apply to json_schema/json_object (the "
                                 "converted grammar's rule is 'root')")
        s(self, "_schema_grammar", schema_grammar)
        # uniqueItems: the grammar sampler is wrapped in one that rejects repeated items
        s(self, "_unique_spec", structured.unique_spec(self.json_schema)
          if self.json_schema is not None else None)
        s(self, "grammar_lazy", _flag("grammar_lazy", self.grammar_lazy))
        s(self, "grammar_triggers", _triggers(self.grammar_triggers))
        for name in ("grammar_trigger_tokens", "grammar_prefill", "preserved_tokens"):
            ids = _tuple(name, getattr(self, name) or (), "a list of token ids")
            s(self, name, tuple(_int(f"{name} entry", t, 0, INT32_MAX, "a token id in [0, 2**31 - 1]")
                                for t in ids))
        # a set: the sequence looks each generated token up in it (sorted, binary search)
        s(self, "preserved_tokens", tuple(sorted(set(self.preserved_tokens))))
        if (self.grammar_lazy or self.grammar_triggers or self.grammar_trigger_tokens
                or self.grammar_prefill) and self.gbnf is None:
            raise invalid(ValueError, "grammar_lazy", "grammar_lazy, grammar_triggers, grammar_trigger_tokens and "
                             "grammar_prefill need a grammar")
        if self.grammar_lazy and not (self.grammar_triggers or self.grammar_trigger_tokens):
            raise invalid(ValueError, "grammar_lazy", "a lazy grammar needs grammar_triggers or grammar_trigger_tokens "
                             "(nothing would ever wake it)")
        if (self.grammar_triggers or self.grammar_trigger_tokens) and not self.grammar_lazy:
            raise invalid(ValueError, "grammar_triggers", "grammar_triggers/grammar_trigger_tokens only apply to a lazy grammar "
                             "(grammar_lazy=True)")
        if self.sampler_impl == "backend" and self.gbnf is not None:
            raise invalid(ValueError, "sampler_impl", "a grammar cannot be combined with sampler_impl='backend': llama.cpp's "
                             "backend sampling has no grammar, and a rejected token would need "
                             "every logit back on the host (use 'fast')")
        if self.speculative is not None:
            from llamagen.speculative import coerce
            s(self, "speculative", coerce(self.speculative))
        self._check_reasoning(s)
        if self.sampler_impl == "backend" and self.speculative is not None:
            raise invalid(ValueError, "speculative", "speculative decoding cannot be combined with "
                             "sampler_impl='backend': each drafted position is sampled on the host "
                             "(use 'fast')")
        if self.sampler_impl == "backend" and self.prompt_logprobs is not None:
            raise invalid(ValueError, "prompt_logprobs", "prompt_logprobs cannot be combined with "
                             "sampler_impl='backend' (use 'fast')")
        if self.sampler_impl == "backend" and self.logprobs is not None:
            raise invalid(ValueError, "logprobs", "logprobs cannot be combined with sampler_impl='backend': the logits "
                             "stay on the output device (use 'fast')")

    def _check_reasoning(self, s) -> None:
        ids = "token ids (ints >= 0)"
        s(self, "reasoning_start", tuple(_int("reasoning_start", t, 0, INT32_MAX, ids)
                                         for t in _tuple("reasoning_start", self.reasoning_start, ids)))
        ends = []
        for e in _tuple("reasoning_end", self.reasoning_end, "token id sequences"):
            seq = tuple(_int("reasoning_end", t, 0, INT32_MAX, ids) for t in _tuple("reasoning_end", e, ids))
            if seq:
                ends.append(seq)
        s(self, "reasoning_end", tuple(ends))
        s(self, "reasoning_forced", tuple(_int("reasoning_forced", t, 0, INT32_MAX, ids)
                                          for t in _tuple("reasoning_forced", self.reasoning_forced, ids)))
        if self.reasoning_budget is None:
            return
        s(self, "reasoning_budget", _int("reasoning_budget", self.reasoning_budget, 0, INT32_MAX,
                                         "None (no budget) or the most thinking tokens, >= 0"))
        if not self.reasoning_start or not self.reasoning_end:
            raise invalid(ValueError, "reasoning_budget", "reasoning_budget needs the thinking "
                          "tags (reasoning_start / reasoning_end): a chat template that thinks "
                          "fills them (llamagen.chat.prepare(...).params())")
        if not self.reasoning_forced:
            s(self, "reasoning_forced", self.reasoning_end[0])
        if self.sampler_impl == "backend":
            raise invalid(ValueError, "reasoning_budget", "a thinking budget cannot be combined "
                          "with sampler_impl='backend' (use 'fast')")

    @property
    def gbnf(self) -> Optional[str]:
        """The grammar the sampler runs: ``grammar``, or the one made of json_schema/json_object."""
        return self.grammar if self.grammar is not None else self._schema_grammar

    @property
    def greedy(self) -> bool:
        return self.temp <= 0.0 and self.mirostat == 0

    def replace(self, **changes) -> "SamplingParams":
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - _FIELDS_SET
        if unknown:
            raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["logit_bias"] = dict(self.logit_bias)
        d["stop"] = list(self.stop)
        d["dry_sequence_breakers"] = list(self.dry_sequence_breakers)
        for name in ("grammar_triggers", "grammar_trigger_tokens", "grammar_prefill", "preserved_tokens",
                     "reasoning_start", "reasoning_forced"):
            d[name] = list(d[name])
        d["reasoning_end"] = [list(e) for e in self.reasoning_end]
        if self.speculative is not None:
            d["speculative"] = self.speculative.to_dict()
        if self.lora is not None:
            d["lora"] = [{"path": a.path, "scale": sc} for a, sc in self.lora]
        return d


FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
_FIELDS_SET = frozenset(FIELDS)
DEFAULT = SamplingParams()


def _is_adapter(value) -> bool:
    # (by name: this layer is below the compiled core, which imports it)
    t = type(value)
    return t.__name__ == "LoraAdapter" and t.__module__ == "llamagen._core"


def canonical_lora(value) -> Tuple[Tuple[object, float], ...]:
    """A LoRA set as SamplingParams keeps it: ((adapter, scale), ...) sorted, zero scales out."""
    if _is_adapter(value):
        items = [(value, 1.0)]
    elif isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise invalid(TypeError, "lora", "lora must be None, a LoraAdapter, a dict {LoraAdapter: scale} "
                      f"or (adapter, scale) pairs, got {type(value).__name__}")
    else:
        items = [(v, 1.0) if _is_adapter(v) else v for v in value]
    out = {}
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise invalid(TypeError, "lora", f"lora entries must be (LoraAdapter, scale) pairs, got {item!r}")
        a, scale = item
        if not _is_adapter(a):
            raise invalid(TypeError, "lora", f"lora keys must be llamagen.LoraAdapter objects, got {type(a).__name__}")
        if a in out:
            raise invalid(ValueError, "lora", f"the LoRA adapter {a.path!r} is given twice")
        scale = _num("lora scale", scale, what="a finite number (negative subtracts the adapter, 0 leaves it out)")
        out[a] = scale
    return tuple(sorted(((a, sc) for a, sc in out.items() if sc != 0.0), key=lambda p: id(p[0])))


def resolve(params: Optional[SamplingParams], args: Sequence, kwargs: dict) -> SamplingParams:
    """SamplingParams from a params object and/or positional and keyword overrides.

    Positional arguments follow the R API order: max_new_tokens, temp, top_k, top_p, seed, ...
    """
    if params is not None and not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a llamagen.SamplingParams, got {type(params).__name__}")
    base = params if params is not None else DEFAULT
    if len(args) > len(FIELDS):
        raise TypeError(f"too many positional sampling arguments ({len(args)})")
    if not args and not kwargs:
        return base
    changes = dict(zip(FIELDS, args))
    for k, v in kwargs.items():
        if k in changes:
            raise TypeError(f"sampling parameter {k!r} given twice")
        changes[k] = v
    return base.replace(**changes)
