"""The one chat-prompt path: messages (and tools) in, everything generation needs out.

``prepare(model, messages, ...)`` renders the messages with the model's Jinja chat template as
llama-server does (llama.cpp's ``common/chat``; ChatML for a model without one), tokenizes the
result as llama-server does (the template's special tokens parsed, the model's BOS added once),
and returns a ``ChatPrompt``: the prompt text and token ids, the sampling fields the template asks
for (a tool-call grammar, its triggers, extra stop strings) and the parser of the replies.  The
server, the Ray chat stage, the CLI and ``llamagen.tools`` all go through it::

    chat = llamagen.chat.prepare(model, [{"role": "user", "content": "Hi"}])
    out = llamagen.generate(ctx, chat.tokens, params=chat.params(max_new_tokens=64))
    message = chat.reply(out)        # {"role": "assistant", "content": ...}

``AsyncEngine`` takes a ChatPrompt as its prompt (its tokens, and its sampling merged into the
request's).

A final assistant message is a prefill (llama-server's and Anthropic's behaviour): the reply
continues its text.
"""
from __future__ import annotations

import dataclasses
import uuid
from typing import Any, List, Optional, Tuple

from llamagen import _core
from llamagen.errors import invalid
from llamagen.sampling import SamplingParams, resolve

__all__ = ["ChatPrompt", "prepare", "base_template", "new_call_id", "REASONING_FORMATS"]

# llama-server's --reasoning-format values -> llama.cpp's common_reasoning_format: "none" leaves a
# thinking model's reasoning in the content; the others put it in ``reasoning_content``
REASONING_FORMATS = {"none": 0, "auto": 1, "deepseek-legacy": 2, "deepseek": 3}

# llama.cpp's built-in "gemma" turn format as Jinja, for Gemma-family models whose GGUF carries
# no template (the base models): a system message goes at the top of the first user turn, and
# the assistant's turns are the "model"'s
GEMMA_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = ns.system + (m['content'] | trim) -%}"
    "{%- else -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{%- if ns.system and role != 'model' -%}{{ ns.system + '\\n\\n' }}"
    "{%- set ns.system = '' -%}{%- endif -%}"
    "{{ (m['content'] | trim) + '<end_of_turn>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}")

_ARCH_TEMPLATES = {"gemma": GEMMA_TEMPLATE, "gemma2": GEMMA_TEMPLATE, "gemma3": GEMMA_TEMPLATE}


def base_template(model) -> Optional[str]:
    """The template to chat with ``model``: None (its own, or ChatML as in llama-server) unless
    it has none and its architecture has a known turn format (Gemma's base models)."""
    if model.chat_template is not None:
        return None
    return _ARCH_TEMPLATES.get(model.architecture or "")


def new_call_id() -> str:
    """A tool call id (OpenAI's shape), for calls whose syntax carries none."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclasses.dataclass(frozen=True)
class ChatPrompt:
    """A rendered chat with what its template asks of sampling and parsing.

    ``prompt``: the text to generate from; ``tokens``: its token ids (special tokens parsed, one
    BOS); ``sampling``: SamplingParams fields (grammar, its triggers, prefill and preserved
    tokens, the template's extra stop strings) that ``params()`` merges into any parameters;
    ``tools``: whether tool calls are parsed from the output; ``thinking``: whether the
    template has a reasoning syntax (``<think>`` ... ``</think>``), whose text replies then carry
    as ``reasoning_content`` (unless ``reasoning_format`` is "none").  ``parses``: whether the
    replies go through llama.cpp's parser (tools, or reasoning to split out)."""
    prompt: str
    sampling: dict
    tools: bool
    tool_choice: str
    format: str
    generation_prompt: str
    _parser: Any = dataclasses.field(repr=False, compare=False, default=None)   # _core._ChatParser
    tokens: List[int] = dataclasses.field(repr=False, compare=False, default_factory=list)
    _spec: Any = dataclasses.field(repr=False, compare=False, default=None)
    thinking: bool = False
    reasoning_format: str = "deepseek"
    # the model's tokenizer (a budget message's tokens)
    _tokenize: Any = dataclasses.field(repr=False, compare=False, default=None)

    @property
    def parses(self) -> bool:
        return self.tools or (self.thinking and self.reasoning_format != "none")

    @property
    def parser(self):
        """llama.cpp's parser of this format's replies (loaded on first use)."""
        if self._parser is None:
            object.__setattr__(self, "_parser", _core._ChatParser(*self._spec))
        return self._parser

    def params(self, params: Optional[SamplingParams] = None, **overrides) -> SamplingParams:
        """SamplingParams for this chat: ``params`` (or the defaults) with ``overrides``, plus
        what the template asks (its stop strings are added to yours).  A grammar of your own
        cannot be combined with a tool-call grammar (llama-server refuses it too).
        ``reasoning_budget`` uses the template's thinking tags (a ValueError without them)."""
        budget = overrides.pop("reasoning_budget", None)
        message = overrides.pop("reasoning_budget_message", None)
        p = resolve(params, (), overrides)
        extra = dict(self.sampling)
        # (with tools but a template without tool syntax too: calls could not be parsed from
        # output a grammar of the client's shapes)
        if p.gbnf is not None and ("grammar" in extra or self.tools):
            raise invalid(ValueError, "tools", "a grammar (or json_schema) cannot be combined "
                          "with tool calls: the tool-call format brings its own grammar")
        stops = tuple(extra.pop("stop", ()))
        if stops:
            extra["stop"] = tuple(p.stop) + tuple(s for s in stops if s not in p.stop)
        p = p.replace(**extra) if extra else p
        return self.budgeted(p, budget, message, strict=True) if budget is not None else p

    def budgeted(self, p: SamplingParams, budget: Optional[int], message: Optional[str] = None,
                 strict: bool = False) -> SamplingParams:
        """``p`` (made by ``params``) with a thinking budget of ``budget`` tokens, after which
        ``message`` (if any) and the template's end tag are forced.  A template that does not
        think: ``p`` as it is (llama-server ignores the budget then), or a ValueError if
        ``strict``."""
        if budget is None or (not p.reasoning_end and not strict):
            return p
        forced = ()
        if message and p.reasoning_end:
            if not isinstance(message, str):
                raise invalid(TypeError, "reasoning_budget_message", "reasoning_budget_message "
                              f"must be a string, got {type(message).__name__}")
            forced = tuple(self._tokenize(message)) + p.reasoning_end[0]
        return p.replace(reasoning_budget=budget, reasoning_forced=forced)

    def parse(self, text: str, *, partial: bool = False) -> dict:
        """The assistant message in ``text`` (the generated text, as generate() returns it):
        ``{"role": "assistant", "content": str | None, "reasoning_content"?: str,
        "tool_calls"?: [{"type": "function", "id", "function": {"name", "arguments"}}]}``,
        ``arguments`` being JSON text as OpenAI sends it.  Calls whose syntax has no id get one.
        ValueError when the text does not parse (it cannot, when the grammar produced it)."""
        return normalize(self.parser.parse(text, partial), [])

    def reply(self, text: str, finish_reason: Optional[str] = "stop") -> dict:
        """``parse`` for a reply however it ended: one cut short (``finish_reason`` "length", a
        stop string) is parsed as far as it goes, and text that does not parse at all comes back
        as content rather than an error (the client still gets what the model said)."""
        return self.reply_ids(text, finish_reason, [])[0]

    def reply_and_error(self, text: str, finish_reason: Optional[str] = "stop"
                        ) -> Tuple[dict, Optional[str]]:
        """``reply``, and why the text came back as content when it did not parse (None when it
        parsed): the parser's error, e.g. output nesting past llamagen's parser limit."""
        return self.reply_ids(text, finish_reason, [])

    def reply_ids(self, text: str, finish_reason: Optional[str], ids: List[str]
                  ) -> Tuple[dict, Optional[str]]:
        """``reply_and_error`` keeping call ids in ``ids`` (a stream hands them out as it goes)."""
        error = None
        for partial in ((False, True) if finish_reason == "stop" else (True,)):
            try:
                return normalize(self.parser.parse(text, partial), ids), None
            except ValueError as e:
                error = str(e)
        return {"role": "assistant", "content": text or None}, error


def normalize(msg: dict, ids: List[str]) -> dict:
    """llama.cpp's message JSON in OpenAI's shape; ``ids``: the call ids handed out so far (a
    stream keeps them from parse to parse), extended here."""
    out = {"role": "assistant", "content": msg.get("content") or None}
    if msg.get("reasoning_content"):
        out["reasoning_content"] = msg["reasoning_content"]
    calls = []
    for i, call in enumerate(msg.get("tool_calls") or []):
        fn = call.get("function") or {}
        if i >= len(ids):
            ids.append(call.get("id") or new_call_id())
        calls.append({"type": "function", "id": ids[i],
                      "function": {"name": fn.get("name", ""), "arguments": fn.get("arguments", "")}})
    if calls:
        out["tool_calls"] = calls
    return out


def prompt_tokens(model, text: str) -> List[int]:
    """The token ids of a rendered chat prompt, as llama-server makes them: special tokens the
    template wrote (<|im_start|>, <start_of_turn>) are parsed, the model's BOS is added, and a BOS
    the template wrote itself is not doubled."""
    toks = model.tokenize(text, add_special=True, parse_special=True)
    bos = model.bos
    if bos is not None and len(toks) >= 2 and toks[0] == bos and toks[1] == bos:
        del toks[0]
    return toks


def prepare(model, messages, *, tools=None, tool_choice=None, parallel_tool_calls=None,
            template=None, chat_template_kwargs=None, enable_thinking=None,
            reasoning_format: str = "deepseek", tokenize: bool = True) -> ChatPrompt:
    """Render ``messages`` (OpenAI-style dicts, tool calls and ``tool`` results included) with
    ``tools`` for ``model`` (a Model): see Model.render_chat_params for the arguments.  The GIL
    is released while the template renders.  TypeError / ValueError name what is wrong: the
    field (``tools``, ``tool_choice``) or ``messages``.  ``tokenize=False`` leaves ``tokens``
    empty (for callers that only want the text).  ``enable_thinking`` (None: the template's
    default) and ``chat_template_kwargs`` go to the template; ``reasoning_format`` (see
    REASONING_FORMATS) says where a thinking template's reasoning goes in the parsed reply."""
    if reasoning_format not in REASONING_FORMATS:
        raise invalid(ValueError, "reasoning_format",
                      f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}, got "
                      f"{reasoning_format!r}")
    if not tools and tool_choice not in (None, "none", "auto"):
        raise invalid(ValueError, "tool_choice", "tool_choice needs tools")
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant" \
            and messages[-1].get("tool_calls"):
        # a prefill continues text: calls left open would be dropped without a word
        raise invalid(ValueError, "messages", "messages: the last message is an assistant's "
                      "tool calls: send their results after it")
    r = model.render_chat_params(messages, tools=tools, tool_choice=tool_choice,
                                 parallel_tool_calls=parallel_tool_calls, template=template,
                                 chat_template_kwargs=chat_template_kwargs,
                                 enable_thinking=enable_thinking)
    sampling: dict[str, Any] = {}
    if r["additional_stops"]:
        sampling["stop"] = tuple(r["additional_stops"])
    if r["grammar"]:
        sampling["grammar"] = r["grammar"]
        if r["grammar_lazy"]:
            sampling["grammar_lazy"] = True
            sampling["grammar_triggers"] = tuple(r["trigger_patterns"])
            sampling["grammar_trigger_tokens"] = tuple(r["trigger_tokens"])
        elif r["prefill_tokens"]:
            sampling["grammar_prefill"] = tuple(r["prefill_tokens"])
    if r["preserved_ids"]:
        sampling["preserved_tokens"] = tuple(r["preserved_ids"])
    if r["supports_thinking"] and r["thinking_start_tag"] and any(r["thinking_end_tags"]):
        # the thinking tags as tokens, for a thinking budget (SamplingParams.reasoning_budget)
        def ids(tag):
            return tuple(model.tokenize(tag, add_special=False, parse_special=True))
        sampling["reasoning_start"] = ids(r["thinking_start_tag"])
        sampling["reasoning_end"] = tuple(ids(t) for t in r["thinking_end_tags"] if t)
    spec = (r["format_id"], r["generation_prompt"], r["parser"], r["tools"],
            REASONING_FORMATS[reasoning_format])
    cp = ChatPrompt(prompt=r["prompt"], sampling=sampling, tools=r["tools"],
                    tool_choice=r["tool_choice"], format=r["format"],
                    generation_prompt=r["generation_prompt"],
                    tokens=prompt_tokens(model, r["prompt"]) if tokenize else [],
                    _spec=spec, thinking=bool(r["supports_thinking"]),
                    reasoning_format=reasoning_format,
                    _tokenize=lambda t: model.tokenize(t, add_special=False, parse_special=False))
    if cp.parses:
        cp.parser           # (parsed on every reply: load the parser now, once)
    return cp
