"""Tool calling (function calling) through the model's own chat template, as llama-server does it.

llama.cpp's ``common/chat`` does the model-specific work and llamagen links it: the template
renders the tools into the prompt, a grammar for the template's tool-call syntax keeps the calls
well-formed (lazy under ``tool_choice="auto"``: asleep until the model starts a call; from the
first token under ``"required"``), and the template's own parser splits the output into text,
reasoning and calls.  This module turns that into sampling parameters and messages::

    chat = llamagen.tools.prepare(model, messages, tools=tools, tool_choice="auto")
    text = llamagen.generate(ctx, chat.prompt, params=chat.params(max_new_tokens=256),
                             parse_special=True)      # the template's special tokens
    message = chat.reply(text)      # {"role": "assistant", "content": ..., "tool_calls": [...]}

``ToolStream`` does the same incrementally for streamed text (OpenAI-style deltas).  A template
that has no tool syntax (SmolLM2's plain ChatML, say) renders no tools and gets no grammar,
exactly as in llama-server; pass a tool-capable Jinja template with ``template=`` then.
"""
from __future__ import annotations

import dataclasses
import uuid
from typing import Any, List, Optional, Tuple

from llamagen import _core
from llamagen.sampling import SamplingParams, resolve

__all__ = ["ChatPrompt", "ToolStream", "prepare", "new_call_id"]


def new_call_id() -> str:
    """A tool call id (OpenAI's shape), for calls whose syntax carries none."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclasses.dataclass(frozen=True)
class ChatPrompt:
    """A rendered chat with what its template asks of sampling and parsing.

    ``prompt``: the text to generate from; ``sampling``: SamplingParams fields (grammar, its
    triggers, prefill and preserved tokens, the template's extra stop strings) that ``params()``
    merges into any parameters; ``tools``: whether tool calls are parsed from the output."""
    prompt: str
    sampling: dict
    tools: bool
    tool_choice: str
    format: str
    generation_prompt: str
    _parser: Any = dataclasses.field(repr=False, compare=False, default=None)   # _core._ChatParser

    def params(self, params: Optional[SamplingParams] = None, **overrides) -> SamplingParams:
        """SamplingParams for this chat: ``params`` (or the defaults) with ``overrides``, plus
        what the template asks (its stop strings are added to yours).  A grammar of your own
        cannot be combined with a tool-call grammar (llama-server refuses it too)."""
        p = resolve(params, (), overrides)
        extra = dict(self.sampling)
        if "grammar" in extra and p.gbnf is not None:
            raise ValueError("a grammar (or json_schema) cannot be combined with tool calls: the "
                             "tool-call format brings its own grammar")
        stops = tuple(extra.pop("stop", ()))
        if stops:
            extra["stop"] = tuple(p.stop) + tuple(s for s in stops if s not in p.stop)
        return p.replace(**extra) if extra else p

    def parse(self, text: str, *, partial: bool = False) -> dict:
        """The assistant message in ``text`` (the generated text, as generate() returns it):
        ``{"role": "assistant", "content": str | None, "reasoning_content"?: str,
        "tool_calls"?: [{"type": "function", "id", "function": {"name", "arguments"}}]}``,
        ``arguments`` being JSON text as OpenAI sends it.  Calls whose syntax has no id get one.
        ValueError when the text does not parse (it cannot, when the grammar produced it)."""
        return _normalize(self._parser.parse(text, partial), [])

    def reply(self, text: str, finish_reason: Optional[str] = "stop") -> dict:
        """``parse`` for a reply however it ended: one cut short (``finish_reason`` "length", a
        stop string) is parsed as far as it goes, and text that does not parse at all comes back
        as content rather than an error (the client still gets what the model said)."""
        return self._reply(text, finish_reason, [])[0]

    def reply_and_error(self, text: str, finish_reason: Optional[str] = "stop"
                        ) -> Tuple[dict, Optional[str]]:
        """``reply``, and why the text came back as content when it did not parse (None when it
        parsed): the parser's error, e.g. output nesting past llamagen's parser limit."""
        return self._reply(text, finish_reason, [])

    def _reply(self, text: str, finish_reason: Optional[str], ids: List[str]
               ) -> Tuple[dict, Optional[str]]:
        error = None
        for partial in ((False, True) if finish_reason == "stop" else (True,)):
            try:
                return _normalize(self._parser.parse(text, partial), ids), None
            except ValueError as e:
                error = str(e)
        return {"role": "assistant", "content": text or None}, error


def _normalize(msg: dict, ids: List[str]) -> dict:
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


def prepare(model, messages, *, tools=None, tool_choice=None, parallel_tool_calls=None,
            template=None, chat_template_kwargs=None, enable_thinking=None) -> ChatPrompt:
    """Render ``messages`` (OpenAI-style, tool calls and ``tool`` results included) with
    ``tools`` for ``model`` (a Model): see Model.render_chat_params for the arguments.  The GIL
    is released while the template renders; TypeError / ValueError name what is wrong."""
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
    return ChatPrompt(prompt=r["prompt"], sampling=sampling, tools=r["tools"],
                      tool_choice=r["tool_choice"], format=r["format"],
                      generation_prompt=r["generation_prompt"],
                      _parser=_core._ChatParser(r["format_id"], r["generation_prompt"], r["parser"],
                                                r["tools"]))


class ToolStream:
    """Streamed text -> OpenAI chat deltas, by re-parsing the text so far as llama-server does
    (llama.cpp's parser in partial mode).  ``feed(text)`` returns the deltas that text makes
    certain: ``{"content": ...}``, ``{"reasoning_content": ...}`` and ``{"tool_calls": [{"index",
    "id", "type", "function": {"name", "arguments"}}]}`` (a call's id and name first, then its
    arguments in pieces); ``finish(finish_reason)`` parses the whole text (ChatPrompt.reply) and
    returns the rest, and ``message`` is then the final message (``parse_error``: why it is text
    only, when the text did not parse)."""

    def __init__(self, chat: ChatPrompt):
        self.chat = chat
        self.text = ""
        self.message: Optional[dict] = None
        self.parse_error: Optional[str] = None
        self._ids: List[str] = []
        self._sent = {"content": "", "reasoning_content": ""}
        self._args: List[str] = []         # per call whose id and name went out: arguments sent

    def feed(self, text: str) -> List[dict]:
        self.text += text
        if not text:
            return []
        try:
            msg = self.chat._parser.parse(self.text, True)
        except ValueError:
            return []               # not parseable yet: more text will tell
        return self._diff(_normalize(msg, self._ids))

    def finish(self, finish_reason: Optional[str] = "stop") -> List[dict]:
        self.message, self.parse_error = self.chat._reply(self.text, finish_reason, self._ids)
        return self._diff(self.message)

    def _diff(self, msg: dict) -> List[dict]:
        deltas = []
        for key in ("reasoning_content", "content"):
            now, sent = msg.get(key) or "", self._sent[key]
            # partial parses only grow; text that changed under us is held until it settles
            if len(now) > len(sent) and now.startswith(sent):
                deltas.append({key: now[len(sent):]})
                self._sent[key] = now
        for i, call in enumerate(msg.get("tool_calls") or []):
            fn = call["function"]
            if i == len(self._args):
                if not fn["name"]:
                    break
                self._args.append("")
                deltas.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                               "function": {"name": fn["name"], "arguments": ""}}]})
            sent, args = self._args[i], fn["arguments"]
            if len(args) > len(sent) and args.startswith(sent):
                deltas.append({"tool_calls": [{"index": i, "function": {"arguments": args[len(sent):]}}]})
                self._args[i] = args
        return deltas

