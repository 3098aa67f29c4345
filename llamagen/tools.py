"""Tool calling (function calling) through the model's own chat template, as llama-server does it.

llama.cpp's ``common/chat`` does the model-specific work and llamagen links it: the template
renders the tools into the prompt, a grammar for the template's tool-call syntax keeps the calls
well-formed (lazy under ``tool_choice="auto"``: asleep until the model starts a call; from the
first token under ``"required"``), and the template's own parser splits the output into text,
reasoning and calls.  ``llamagen.chat.prepare`` (re-exported here as ``prepare``) turns that
into prompt tokens, sampling parameters and a parser of the replies::

    chat = llamagen.tools.prepare(model, messages, tools=tools, tool_choice="auto")
    text = llamagen.generate(ctx, chat.tokens, params=chat.params(max_new_tokens=256))
    message = chat.reply(text)      # {"role": "assistant", "content": ..., "tool_calls": [...]}

``ToolStream`` does the same incrementally for streamed text (OpenAI-style deltas).  A template
that has no tool syntax (SmolLM2's plain ChatML, say) renders no tools and gets no grammar,
exactly as in llama-server; pass a tool-capable Jinja template with ``template=`` then.
"""
from __future__ import annotations

from typing import List, Optional

from llamagen.chat import ChatPrompt, new_call_id, normalize, prepare

__all__ = ["ChatPrompt", "ToolStream", "prepare", "new_call_id"]


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
            msg = self.chat.parser.parse(self.text, True)
        except ValueError:
            return []               # not parseable yet: more text will tell
        return self._diff(normalize(msg, self._ids))

    def finish(self, finish_reason: Optional[str] = "stop") -> List[dict]:
        self.message, self.parse_error = self.chat.reply_ids(self.text, finish_reason, self._ids)
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

