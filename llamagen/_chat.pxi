# Chat prompts rendered with the model's Jinja chat template exactly as llama-server renders them
# (llama.cpp's common library, through llamagen/csrc/lg_chat.cpp).  Included by _core.pyx after
# _model.pxi: Model.render_chat / Model.render_chat_params call _render_chat below.
#
# Messages are checked here, before C++, so that a mistake names the message and field at fault;
# whatever gets past (a Jinja error, raise_exception() in a template) comes back from C++ as a
# status and becomes ValueError.

from collections.abc import Mapping as _Mapping, Sequence as _Sequence
import json as _json

# templates parsed for overrides, kept per Model (most recent last)
_CHAT_OVERRIDES_KEPT = 4

# What one render (or a template's load, which renders probes) may cost: llama.cpp's Jinja
# runtime had no bound, so a template with a long loop never returned and one that doubles a
# string took all memory (docs/limits.md has the measurements behind these values).
_template_budget = {"max_steps": 4_000_000, "max_bytes": 384 << 20, "max_seconds": 10.0}


def set_template_budget(*, max_steps=None, max_bytes=None, max_seconds=None):
    """Change what one chat-template render may cost (every thread, every model): statements
    run, bytes of strings produced, wall time (0 = no limit).  A render past one fails with a
    ValueError.  Returns the budget before the change, as a dict."""
    old = dict(_template_budget)
    for name, value, kind in (("max_steps", max_steps, int), ("max_bytes", max_bytes, int),
                              ("max_seconds", max_seconds, (int, float))):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kind) or value < 0 or value != value:
            raise ValueError(f"{name} must be a number >= 0 (0: no limit), got {value!r}")
        _template_budget[name] = value
    return old


def template_budget():
    """What one chat-template render may cost now (set_template_budget)."""
    return dict(_template_budget)


cdef lgchat.Budget _chat_budget():
    cdef lgchat.Budget b
    b.max_steps = _template_budget["max_steps"]
    b.max_bytes = _template_budget["max_bytes"]
    b.max_seconds = _template_budget["max_seconds"]
    return b


cdef class _ChatTemplates:
    """Owns one parsed lgchat::Templates.  A render holds a reference to this object while it
    runs without the GIL, so evicting it from a Model's cache never frees it under a render."""
    cdef lgchat.Templates * ptr

    def __cinit__(self):
        self.ptr = NULL

    def __dealloc__(self):
        if self.ptr != NULL:
            lgchat.templates_free(self.ptr)
            self.ptr = NULL


cdef _ChatTemplates _chat_templates_load(Model model, template):
    """Parse the model's templates (template None) or an override (str); ValueError on failure."""
    cdef string src
    cdef string err
    cdef lgchat.Templates * t
    cdef _ChatTemplates out
    cdef lgchat.Budget budget = _chat_budget()
    if template is not None:
        src = template.encode("utf-8")
    model._pin()
    try:
        with nogil:
            t = lgchat.templates_new(model._model, src, budget, err)
    finally:
        model._release_user()
    if t == NULL:
        what = "the given template" if template is not None else "the model's chat template"
        raise ValueError(f"{what} cannot be used: {err.decode('utf-8', 'replace')}")
    out = _ChatTemplates()
    out.ptr = t
    return out


cdef _ChatTemplates _chat_templates(Model model, template):
    """The cached templates for ``template`` (None = the model's own), parsed on first use."""
    cdef _ChatTemplates t
    if template is None:
        if model._chat_default is None:
            t = _chat_templates_load(model, None)
            if model._chat_default is None:     # another thread may have loaded it meanwhile
                model._chat_default = t
        return model._chat_default
    t = _lru_get(model._chat_overrides, template)
    if t is None:
        t = _chat_templates_load(model, template)
        _lru_put(model._chat_overrides, template, t, _CHAT_OVERRIDES_KEPT)
    return t


cdef str _chat_str(value, str where):
    """``value`` checked as message text: a str without NUL that encodes to UTF-8."""
    if not isinstance(value, str):
        raise TypeError(f"{where} must be a str, not {type(value).__name__}")
    if "\0" in <str>value:
        raise ValueError(f"{where} contains a NUL character")
    try:
        (<str>value).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where} is not valid Unicode ({e.reason} at index {e.start})") from None
    return value


# JSON data nested deeper than this is refused: llama.cpp's Jinja runtime recurses over it with
# no limit of its own (a stack overflow would kill the process)
_CHAT_MAX_DEPTH = 64
# llama.cpp's chat parser recurses over the JSON in model output: a reply nesting 10,000 brackets
# was a SIGSEGV (3,000 parsed), so deeper output is not given to it (issue 26)
cdef int _PARSE_MAX_DEPTH = 512


cdef int _json_depth(const string & s) noexcept nogil:
    """The deepest nesting of [ and { in ``s`` outside JSON strings (a bound on what a JSON
    parser recurses through; stray closers are ignored)."""
    cdef size_t i
    cdef int depth = 0, deepest = 0
    cdef bint in_str = False, esc = False
    cdef char ch
    for i in range(s.size()):
        ch = s[i]
        if in_str:
            if esc:
                esc = False
            elif ch == b'\\':
                esc = True
            elif ch == b'"':
                in_str = False
        elif ch == b'"':
            in_str = True
        elif ch == b'[' or ch == b'{':
            depth += 1
            if depth > deepest:
                deepest = depth
        elif (ch == b']' or ch == b'}') and depth > 0:
            depth -= 1
    return deepest


cdef object _chat_json_value(value, str where, int depth=0):
    """JSON data (tool-call arguments, template kwargs): every string in it checked like
    message text, nesting bounded."""
    if isinstance(value, str):
        return _chat_str(value, where)
    if isinstance(value, (_Mapping, list, tuple)) and depth >= _CHAT_MAX_DEPTH:
        raise ValueError(f"{where} is nested more than {_CHAT_MAX_DEPTH} levels deep")
    if isinstance(value, _Mapping):
        out = {}
        for k, v in value.items():
            out[_chat_str(k, f"{where} key")] = _chat_json_value(v, f"{where}[{k!r}]", depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_chat_json_value(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise TypeError(f"{where} holds a {type(value).__name__}, which is not JSON data")


cdef object _chat_content(value, str where):
    if value is None or isinstance(value, str):
        return None if value is None else _chat_str(value, where)
    if isinstance(value, (bytes, bytearray, _Mapping)) or not isinstance(value, _Sequence):
        raise TypeError(f"{where} must be a str or a list of content parts "
                        f"({{'type': 'text', 'text': ...}}), not {type(value).__name__}")
    parts = []
    for j, part in enumerate(value):
        pw = f"{where}[{j}]"
        if not isinstance(part, _Mapping):
            raise TypeError(f"{pw} must be a dict {{'type': 'text', 'text': ...}}, "
                            f"not {type(part).__name__}")
        if "type" not in part:
            raise ValueError(f"{pw} has no 'type'")
        if part["type"] != "text":
            raise ValueError(f"{pw} has type {part['type']!r}: only 'text' parts are supported")
        if "text" not in part:
            raise ValueError(f"{pw} has no 'text'")
        parts.append({"type": "text", "text": _chat_str(part["text"], f"{pw}['text']")})
    return parts


cdef list _chat_tool_calls(value, str where):
    if isinstance(value, (str, bytes, bytearray, _Mapping)) or not isinstance(value, _Sequence):
        raise TypeError(f"{where} must be a list of tool calls, not {type(value).__name__}")
    calls = []
    for j, call in enumerate(value):
        cw = f"{where}[{j}]"
        if not isinstance(call, _Mapping):
            raise TypeError(f"{cw} must be a dict, not {type(call).__name__}")
        if call.get("type", "function") != "function":
            raise ValueError(f"{cw} has type {call['type']!r}: only 'function' tool calls exist")
        fn = call.get("function")
        if not isinstance(fn, _Mapping):
            raise ValueError(f"{cw} needs a 'function' dict with 'name' and 'arguments'")
        if "name" not in fn:
            raise ValueError(f"{cw}['function'] has no 'name'")
        args = _chat_json_value(fn.get("arguments", "{}"), f"{cw}['function']['arguments']")
        if isinstance(args, str) and _json_depth(args.encode("utf-8")) > _CHAT_MAX_DEPTH:
            # (llama.cpp parses the text as JSON and the template runtime walks it)
            raise ValueError(f"{cw}['function']['arguments'] is JSON nested more than "
                             f"{_CHAT_MAX_DEPTH} levels deep")
        if isinstance(args, str):
            try:
                _json.loads(args)
            except ValueError:
                # a small model's own earlier call, sent back by the agent loop: llama.cpp would
                # refuse the whole conversation ("Failed to parse tool call arguments"); the
                # template gets the text as a JSON string instead
                args = _json.dumps(args, ensure_ascii=False)
        out = {"type": "function",
               "function": {"name": _chat_str(fn["name"], f"{cw}['function']['name']"),
                            "arguments": args}}
        if call.get("id") is not None:
            out["id"] = _chat_str(call["id"], f"{cw}['id']")
        calls.append(out)
    return calls


def _chat_messages_json(messages):
    """OpenAI-style messages -> the UTF-8 JSON that llama.cpp parses, after checking them.

    Known fields are kept (role, content, name, tool_call_id, reasoning_content, tool_calls);
    others are dropped, as llama.cpp ignores them.
    """
    if isinstance(messages, (str, bytes, bytearray, _Mapping)) or not isinstance(messages, _Sequence):
        raise TypeError(f"messages must be a list of dicts, not {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, _Mapping):
            raise TypeError(f"{where} must be a dict with 'role' and 'content', not {type(m).__name__}")
        if "role" not in m:
            raise ValueError(f"{where} has no 'role'")
        role = _chat_str(m["role"], f"{where}['role']")
        if not role:
            raise ValueError(f"{where}['role'] is empty")
        msg = {"role": role}
        if "content" in m:
            msg["content"] = _chat_content(m["content"], f"{where}['content']")
        elif not (role == "assistant" and m.get("tool_calls")):
            # llama-server: only an assistant message that makes tool calls may omit content
            raise ValueError(f"{where} has no 'content'")
        if m.get("tool_calls") is not None:
            msg["tool_calls"] = _chat_tool_calls(m["tool_calls"], f"{where}['tool_calls']")
        for key in ("name", "tool_call_id", "reasoning_content"):
            if m.get(key) is not None:
                msg[key] = _chat_str(m[key], f"{where}[{key!r}]")
        out.append(msg)
    return _json.dumps(out, ensure_ascii=False, allow_nan=False).encode("utf-8")


def _chat_tools_json(tools, tool_choice):
    """OpenAI ``tools`` and ``tool_choice`` checked -> (tools JSON, llama.cpp's tool choice).

    A named choice ({"type": "function", "function": {"name": ...}}) keeps only that tool and
    requires a call (llama.cpp knows auto / none / required)."""
    if tools is None:
        if tool_choice not in (None, "auto", "none"):
            raise ValueError("tool_choice needs tools")
        return b"", b"auto"
    if isinstance(tools, (str, bytes, bytearray, _Mapping)) or not isinstance(tools, _Sequence):
        raise TypeError(f"tools must be a list of dicts, not {type(tools).__name__}")
    out, names = [], []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, _Mapping):
            raise TypeError(f"{where} must be a dict, not {type(tool).__name__}")
        if tool.get("type", "function") != "function":
            raise ValueError(f"{where} has type {tool['type']!r}: only 'function' tools exist")
        fn = tool.get("function")
        if not isinstance(fn, _Mapping):
            raise ValueError(f"{where} needs a 'function' dict with a 'name'")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}['function']['name'] must be a non-empty str")
        entry = {"name": _chat_str(name, f"{where}['function']['name']")}
        if fn.get("description") is not None:
            entry["description"] = _chat_str(fn["description"], f"{where}['function']['description']")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, _Mapping):
            raise TypeError(f"{where}['function']['parameters'] must be a JSON schema (a dict), "
                            f"not {type(params).__name__}")
        entry["parameters"] = _chat_json_value(params, f"{where}['function']['parameters']")
        # llama.cpp converts it to the tool-call grammar: the same checks as response_format
        # (keywords the converter would drop, contradictions, limits)
        _check_schema(entry["parameters"], f"{where}['function']['parameters']")
        if name in names:
            raise ValueError(f"{where}: a second tool named {name!r}")
        names.append(name)
        out.append({"type": "function", "function": entry})
    if tool_choice is None:
        tool_choice = "auto"
    if isinstance(tool_choice, _Mapping):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, _Mapping) else None
        if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
            raise ValueError("tool_choice must be 'auto', 'none', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}")
        if name not in names:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        out = [t for t in out if t["function"]["name"] == name]
        tool_choice = "required"
    elif tool_choice not in ("auto", "none", "required"):
        raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or a named function, "
                         f"not {tool_choice!r}")
    if not out:
        return b"", tool_choice.encode()
    return _json.dumps(out, ensure_ascii=False, allow_nan=False).encode("utf-8"), tool_choice.encode()


cdef object _render_chat(Model model, messages, bint add_generation_prompt, template,
                         chat_template_kwargs, enable_thinking, bint prefill_assistant,
                         bint details, tools=None, tool_choice=None, parallel_tool_calls=None):
    cdef string msgs_json
    cdef string kwargs_json
    cdef string tools_json
    cdef string choice
    cdef int parallel
    cdef string err
    cdef lgchat.Rendered r
    cdef _ChatTemplates t
    cdef int thinking
    cdef int rc
    cdef lgchat.Budget budget = _chat_budget()
    model._check()
    if template is not None:
        if not isinstance(template, str):
            raise TypeError(f"template must be a str (Jinja source or 'chatml'), not "
                            f"{type(template).__name__}")
        _chat_str(template, "template")
        if template != "chatml" and "{{" not in template and "{%" not in template:
            # a bare name would render as literal text; built-in names are apply_chat_template's
            raise ValueError(f"template {template[:60]!r} is not Jinja source: pass a Jinja "
                             "template, 'chatml', or None for the model's own")
    if enable_thinking is None:
        thinking = -1
    elif enable_thinking is True or enable_thinking is False:
        thinking = 1 if enable_thinking else 0
    else:
        raise TypeError(f"enable_thinking must be None, True or False, not "
                        f"{type(enable_thinking).__name__}")
    if chat_template_kwargs is not None:
        if not isinstance(chat_template_kwargs, _Mapping):
            raise TypeError(f"chat_template_kwargs must be a dict, not "
                            f"{type(chat_template_kwargs).__name__}")
        kw = _chat_json_value(chat_template_kwargs, "chat_template_kwargs")
        kwargs_json = _json.dumps(kw, ensure_ascii=False, allow_nan=False).encode("utf-8")
    if parallel_tool_calls is None:
        parallel = -1
    elif parallel_tool_calls is True or parallel_tool_calls is False:
        parallel = 1 if parallel_tool_calls else 0
    else:
        raise TypeError(f"parallel_tool_calls must be None, True or False, not "
                        f"{type(parallel_tool_calls).__name__}")
    tools_json, choice = _chat_tools_json(tools, tool_choice)
    msgs_json = _chat_messages_json(messages)
    t = _chat_templates(model, template)
    # a long history or a heavy template can take a while: other threads run meanwhile (t stays
    # referenced here, and the templates never touch the model after loading; the vocabulary is
    # only read, and the model is kept open by the caller)
    with nogil:
        rc = lgchat.render(t.ptr, model._vocab, msgs_json, kwargs_json, tools_json, choice, parallel,
                           add_generation_prompt, prefill_assistant, thinking, budget, r, err)
    if rc != 0:
        raise ValueError(f"the chat template could not render these messages: "
                         f"{err.decode('utf-8', 'replace')}")
    prompt = r.prompt.decode("utf-8", "replace")
    if not details:
        return prompt
    return {
        "prompt": prompt,
        "additional_stops": [s.decode("utf-8", "replace") for s in r.additional_stops],
        "grammar": r.grammar.decode("utf-8", "replace") or None,
        "grammar_lazy": bool(r.grammar_lazy),
        "preserved_tokens": [s.decode("utf-8", "replace") for s in r.preserved_tokens],
        "generation_prompt": r.generation_prompt.decode("utf-8", "replace"),
        "format": r.format.decode("utf-8", "replace"),
        "supports_thinking": bool(r.supports_thinking),
        "thinking_start_tag": r.thinking_start_tag.decode("utf-8", "replace") or None,
        "thinking_end_tags": [s.decode("utf-8", "replace") for s in r.thinking_end_tags],
        "trigger_patterns": [s.decode("utf-8", "replace") for s in r.trigger_patterns],
        "trigger_tokens": list(r.trigger_tokens),
        "preserved_ids": list(r.preserved_ids),
        "prefill_tokens": list(r.prefill_tokens),
        "tools": bool(tools_json.size()) and choice != b"none",
        "tool_choice": choice.decode(),
        "format_id": r.format_id,
        "parser": bytes(r.parser),
    }


cdef str _chat_template_source(Model model, template):
    cdef _ChatTemplates t
    model._check()
    if template is not None:
        if not isinstance(template, str):
            raise TypeError(f"template must be a str, not {type(template).__name__}")
        _chat_str(template, "template")
    t = _chat_templates(model, template)
    return lgchat.templates_source(t.ptr).decode("utf-8", "replace")


cdef class _ChatParser:
    """llama.cpp's parser of one chat format's replies (see lg_chat.h), loaded once.  Read-only
    after creation: threads may parse with one at once (the GIL is released while parsing)."""
    cdef lgchat.Parser * ptr

    def __cinit__(self, int format_id, generation_prompt, bytes parser, bint parse_tool_calls,
                  int reasoning_format=3):
        # (reasoning_format: llama.cpp's common_reasoning_format, 3 = deepseek, llama-server's
        # default; llamagen.chat.REASONING_FORMATS names them)
        cdef string gp = _chat_str(generation_prompt, "generation_prompt").encode("utf-8")
        cdef string ps = parser
        cdef string err
        if not 0 <= reasoning_format <= 3:
            raise ValueError(f"reasoning_format must be 0 to 3, got {reasoning_format}")
        self.ptr = lgchat.parser_new(format_id, gp, ps, parse_tool_calls, reasoning_format, err)
        if self.ptr == NULL:
            raise ValueError(f"the chat format's output parser could not be loaded: "
                             f"{err.decode('utf-8', 'replace')}")

    def __dealloc__(self):
        if self.ptr != NULL:
            lgchat.parser_free(self.ptr)
            self.ptr = NULL

    def parse(self, text, bint partial=False):
        """The OpenAI message dict in ``text``; ValueError when it does not parse."""
        cdef string t = _chat_str(text, "text").encode("utf-8")
        cdef string out
        cdef string err
        cdef int rc
        with nogil:
            rc = -1 if _json_depth(t) > _PARSE_MAX_DEPTH else 0
            if rc == 0:
                rc = lgchat.parser_parse(self.ptr, t, partial, out, err)
        if rc == -1:
            raise ValueError(f"the model's output nests JSON more than {_PARSE_MAX_DEPTH} levels "
                             f"deep: not parsed (llama.cpp's parser would overflow its stack)")
        if rc != 0:
            raise ValueError(f"the model's output does not parse as a message of this chat "
                             f"format: {err.decode('utf-8', 'replace')}")
        return _json.loads(out.decode("utf-8", "replace"))
