"""Request bodies, as pydantic models.

Strict types (``"yes"`` is not a bool, ``true`` is not a number), unknown fields ignored (clients
send many).  Ranges are not repeated here: ``llamagen.SamplingParams`` checks every sampling field
and its errors, which name the field, become 400s.
"""
from __future__ import annotations

from typing import Any, List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class SlotAction(_Body):
    """The body of POST /slots/{id}?action=save|restore (erase needs none)."""
    filename: Optional[str] = None


class LoraEntry(_Body):
    """One adapter of llama-server's ``lora`` list: its id in GET /lora-adapters and its scale
    (absent: 0, as llama-server)."""
    id: int
    scale: float = 0.0


class LlamagenSampling(_Body):
    """llamagen's own sampling fields, accepted at the top level of every generation request
    (the llama-server / vLLM convention).  See llamagen.SamplingParams for their meaning."""
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    typical_p: Optional[float] = None
    repeat_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None      # vLLM's name for repeat_penalty
    repeat_last_n: Optional[int] = None
    mirostat: Optional[int] = None
    mirostat_tau: Optional[float] = None
    mirostat_eta: Optional[float] = None
    grammar: Optional[str] = None
    grammar_root: Optional[str] = None
    ignore_eos: Optional[bool] = None
    min_keep: Optional[int] = None
    dynatemp_range: Optional[float] = None
    dynatemp_exponent: Optional[float] = None
    dry_multiplier: Optional[float] = None
    dry_base: Optional[float] = None
    dry_allowed_length: Optional[int] = None
    dry_penalty_last_n: Optional[int] = None
    dry_sequence_breakers: Optional[List[str]] = None
    xtc_probability: Optional[float] = None
    xtc_threshold: Optional[float] = None
    top_n_sigma: Optional[float] = None
    sampler_impl: Optional[str] = None
    seed: Optional[int] = None
    logit_bias: Optional[dict[str, float]] = None     # {token id: bias}, as in OpenAI's API
    # speculative decoding: a type name or {type, n_max, n_min, ngram_n, ngram_m, min_hits,
    # adaptive, exact} (llamagen.Speculative), or llama-server's dotted fields; merged into the server's
    # --spec-type default
    speculative: Optional[Union[str, dict[str, Any]]] = None
    speculative_type: Optional[str] = Field(default=None, alias="speculative.type")
    speculative_n_max: Optional[int] = Field(default=None, alias="speculative.n_max")
    speculative_n_min: Optional[int] = Field(default=None, alias="speculative.n_min")
    speculative_ngram_size_n: Optional[int] = Field(default=None, alias="speculative.ngram_size_n")
    speculative_ngram_size_m: Optional[int] = Field(default=None, alias="speculative.ngram_size_m")
    speculative_ngram_min_hits: Optional[int] = Field(default=None, alias="speculative.ngram_min_hits")
    # LoRA adapters for this request, as llama-server: [{"id", "scale"}]; those not listed are off
    lora: Optional[List[LoraEntry]] = None
    # a thinking budget (llama-server's name; -1: none): the end tag is forced after this many
    # thinking tokens (chat requests with a template that thinks)
    reasoning_budget_tokens: Optional[int] = None
    reasoning_budget_message: Optional[str] = None  # written before the forced end tag


class StreamOptions(_Body):
    include_usage: Optional[bool] = None


class JSONSchemaFormat(_Body):
    """OpenAI's ``response_format.json_schema``."""
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")   # (BaseModel.schema)
    strict: Optional[bool] = None


class ResponseFormat(_Body):
    """``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}``."""
    type: str
    json_schema: Optional[JSONSchemaFormat] = None


class OpenAISampling(LlamagenSampling):
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = None          # null: 1
    stop: Optional[Union[str, List[str]]] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    response_format: Optional[ResponseFormat] = None


class CompletionRequest(OpenAISampling):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None
    logprobs: Optional[int] = None


class ContentPart(_Body):
    type: str
    text: Optional[str] = None


class ChatMessage(_Body):
    role: str
    content: Optional[Union[str, List[ContentPart]]] = None
    reasoning_content: Optional[str] = None
    name: Optional[str] = None
    tool_calls: Optional[List[Any]] = None
    tool_call_id: Optional[str] = None


class ChatCompletionRequest(OpenAISampling):
    messages: List[ChatMessage] = Field(min_length=1)
    # reasoning models: llama-server's fields, and OpenAI's reasoning_effort
    chat_template_kwargs: Optional[dict[str, Any]] = None
    reasoning_format: Optional[str] = None
    reasoning_effort: Optional[str] = None
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[List[Any]] = None
    tool_choice: Optional[Union[str, dict]] = None
    parallel_tool_calls: Optional[bool] = None


class TextBlock(_Body):
    type: str
    text: Optional[str] = None


class ContentBlock(TextBlock):
    """An Anthropic content block: text, thinking / redacted_thinking and tool_use (assistant),
    tool_result (user)."""
    thinking: Optional[str] = None
    signature: Optional[str] = None
    id: Optional[str] = None
    name: Optional[str] = None
    input: Optional[Any] = None
    tool_use_id: Optional[str] = None
    content: Optional[Union[str, List[TextBlock]]] = None
    is_error: Optional[bool] = None


class AnthropicMessage(_Body):
    role: str
    content: Union[str, List[ContentBlock]]


class MessagesRequest(LlamagenSampling):
    model: Optional[str] = None
    messages: List[AnthropicMessage] = Field(min_length=1)
    system: Optional[Union[str, List[TextBlock]]] = None
    max_tokens: int
    stop_sequences: Optional[List[str]] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stream: Optional[bool] = False
    tools: Optional[List[Any]] = None
    tool_choice: Optional[dict] = None
    thinking: Optional[dict] = None                  # {"type": "enabled"|"disabled", ...}
    chat_template_kwargs: Optional[dict[str, Any]] = None


class CountTokensRequest(_Body):
    model: Optional[str] = None
    messages: List[AnthropicMessage] = Field(min_length=1)
    system: Optional[Union[str, List[TextBlock]]] = None
    tools: Optional[List[Any]] = None
    tool_choice: Optional[dict] = None


class EmbeddingRequest(_Body):
    input: Union[str, List[str], List[int], List[List[int]]]
    model: Optional[str] = None
    encoding_format: Optional[str] = None       # "float" (default) or "base64"
    dimensions: Optional[int] = None
    user: Optional[str] = None


class RerankRequest(_Body):
    """llama-server's /v1/rerank (Jina's and Cohere's shape)."""
    query: str
    documents: List[str]
    model: Optional[str] = None
    top_n: Optional[int] = None
    return_documents: bool = False


class TokenizeRequest(_Body):
    """llama-server's shape (``content``), or vLLM's (``prompt``, ``add_special_tokens``: what
    lm-eval's remote tokenizer sends)."""
    content: Optional[str] = None
    add_special: bool = False        # llama-server's defaults
    parse_special: bool = True
    with_pieces: bool = False
    prompt: Optional[str] = None
    add_special_tokens: Optional[bool] = None


class DetokenizeRequest(_Body):
    tokens: List[int]


class ResponsesRequest(LlamagenSampling):
    """OpenAI's Responses API (``POST /v1/responses``); items stay plain dicts (many shapes),
    checked where they are translated (responses_format.py)."""
    model: Optional[str] = None
    input: Union[str, List[Any]]
    instructions: Optional[str] = None
    tools: Optional[List[Any]] = None
    tool_choice: Optional[Union[str, dict]] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[dict] = None
    max_output_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    previous_response_id: Optional[str] = None
    store: Optional[bool] = None
    stream: Optional[bool] = False
    metadata: Optional[dict] = None
    user: Optional[str] = None
    truncation: Optional[str] = None
    reasoning: Optional[dict] = None                 # {"effort": ...}: as reasoning_effort
    include: Optional[List[str]] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    reasoning_format: Optional[str] = None


class InputTokensRequest(ResponsesRequest):
    """``POST /v1/responses/input_tokens``: the prompt a /v1/responses request would have."""


class InfillRequest(LlamagenSampling):
    """llama-server's ``/infill``: fill in between ``input_prefix`` and ``input_suffix``."""
    input_prefix: str
    input_suffix: str
    input_extra: Optional[List[Any]] = None
    prompt: Optional[str] = None
    n_predict: Optional[int] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: Optional[Union[str, List[str]]] = None
    stream: Optional[bool] = False
    model: Optional[str] = None
