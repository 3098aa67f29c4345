"""Embeddings: pooled vectors for many texts per decode (``embed``, ``map_embed``).

    ctx = llamagen.Context(model, n_ctx=8192, n_batch=2048, n_seq_max=32, embeddings=True,
                           pooling="mean")
    vecs = llamagen.embed(ctx, texts)              # float32 array (len(texts), n_embd), L2-normalized

Texts are packed whole into one batch as separate sequences (up to n_batch tokens and n_seq_max
sequences per decode, as llama.cpp's llama-embedding packs them); decoding runs without the GIL.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, List, Union

import numpy as np

from llamagen import _core
from llamagen._core import Context
from llamagen._shared import exclusive, progress_bar

__all__ = ["embed", "map_embed", "rerank", "EmbedResult", "NORMALIZE"]

# normalize= names -> llama.cpp's common_embd_normalize codes
NORMALIZE = {"none": -1, "max": 0, "l1": 1, "l2": 2}


def _norm_code(normalize) -> int:
    if normalize is True:
        return 2
    if normalize is False or normalize is None:
        return -1
    if isinstance(normalize, str) and normalize in NORMALIZE:
        return NORMALIZE[normalize]
    if isinstance(normalize, int) and not isinstance(normalize, bool) and 1 <= normalize <= 64:
        return normalize
    raise ValueError("normalize must be True (L2), False/None, 'l2', 'l1', 'max' (max-abs scaled "
                     f"to the int16 range, llama.cpp's 0) or a p-norm order 1-64, got {normalize!r}")


@dataclass
class EmbedResult:
    """``embed(..., details=True)``: the vectors, each text's token count and whether it was cut."""
    vectors: Union[np.ndarray, List[np.ndarray]]
    n_tokens: List[int]
    truncated: List[bool]

    @property
    def total_tokens(self) -> int:
        return sum(self.n_tokens)


def embed(ctx: Context, texts, *, normalize=True, truncate: bool = False, details: bool = False,
          add_special: bool = True, parse_special: bool = False):
    """Embed every text (str, UTF-8 bytes or a list of token ids) with an embedding context
    (``Context(..., embeddings=True, pooling=...)``).

    Returns a float32 array of shape (len(texts), n_embd); with pooling "none" a list of
    (n_tokens, n_embd) arrays, one per text.  ``normalize``: True / "l2" (default, llama.cpp's
    default), "l1", "max" (max-abs scaled to the int16 range), an int p (p-norm) or False.  A text
    longer than one decode (n_batch, and one sequence's cells) raises PromptTooLongError naming its
    index and length, or is cut to fit with ``truncate=True``.  ``details=True`` returns an
    EmbedResult with the token counts and which texts were cut.
    """
    items = _text_list(texts, "texts", "embed")
    vectors, n_tokens, cut = _embed_items(ctx, items, _norm_code(normalize), truncate,
                                          add_special, parse_special)
    if details:
        return EmbedResult(vectors, n_tokens, cut)
    return vectors


def _text_list(texts, name: str, verb: str) -> list:
    """``texts`` as a non-empty list (one str or bytes is refused: a list of its characters is
    never what was meant)."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{name} must be a list of texts, got one {type(texts).__name__} "
                        "(wrap it in a list)")
    try:
        items = list(texts)
    except TypeError:
        raise TypeError(f"{name} must be a list of texts, got {type(texts).__name__}") from None
    if not items:
        raise ValueError(f"{name} is empty: nothing to {verb}")
    return items


def _embed_items(ctx, items, norm: int, truncate, add_special, parse_special, rank=False):
    """_core._embed with the whole call owning the context (embed, map_embed, rerank); a rank
    (reranker) context only for rerank's pairs, and the other way round."""
    if truncate is not True and truncate is not False:
        raise TypeError(f"truncate must be True or False, got {truncate!r}")
    if isinstance(ctx, Context) and ctx.embeddings and (ctx.pooling == "rank") != rank:
        raise ValueError("this context pools with rank (a reranker's classification head): score "
                         "(query, document) pairs with llamagen.rerank" if not rank else
                         "rerank needs a reranker context: Context(model, embeddings=True, "
                         "pooling='rank')")
    with exclusive(ctx):
        return _core._embed(ctx, items, norm, truncate, add_special, parse_special)


def rerank(ctx: Context, query: str, documents, *, truncate: bool = False, details: bool = False):
    """Relevance of each document to ``query``, from a reranker model (a context made with
    ``embeddings=True`` and pooling "rank", the model's default for rerankers).

    Each pair is formatted as llama-server formats it: the GGUF's "rerank" template with
    {query} and {document} replaced, else [BOS] query [EOS] [SEP] document [EOS] (each special
    token where the vocabulary adds it); pairs are packed into decodes like ``embed``'s texts.
    Returns a float32 array with one score per document: the classification head's first output,
    as llama-server's /rerank reports it (after the softmax llama.cpp applies for Qwen3
    rerankers).  ``details=True`` returns an EmbedResult whose vectors hold every head output
    (shape (len(documents), n_labels)), with the token counts and which pairs were cut.
    """
    if not isinstance(ctx, Context):
        raise TypeError(f"ctx must be a llamagen.Context, got {type(ctx).__name__}")
    if not ctx.embeddings:
        raise ValueError("rerank needs a reranker context: Context(model, embeddings=True, "
                         "pooling='rank') (this one is not an embedding context)")
    items = _rerank_items(ctx.model, query, documents)
    vectors, n_tokens, cut = _embed_items(ctx, items, -1, truncate, False, False, rank=True)
    if details:
        return EmbedResult(vectors, n_tokens, cut)
    return np.ascontiguousarray(vectors[:, 0])


def _rerank_items(model, query, documents) -> list:
    """The token ids of every (query, document) pair, formatted as llama-server does."""
    if not isinstance(query, str):
        raise TypeError(f"query must be str, got {type(query).__name__}")
    items = []
    for i, d in enumerate(_text_list(documents, "documents", "rerank")):
        try:
            items.append(_core._rerank_tokens(model, query, d))
        except TypeError as e:
            raise TypeError(f"documents[{i}]: {e}") from None
    return items


def map_embed(ctx: Context, iterable: Iterable, *, batch_size: int = 64, progress: bool = False,
              normalize=True, truncate: bool = False, add_special: bool = True,
              parse_special: bool = False) -> Iterator[np.ndarray]:
    """The vector of every item of ``iterable``, in order, reading it lazily ``batch_size`` items
    at a time (each chunk goes through ``embed``: packed into as few decodes as fit).  A bad item
    raises, naming its index in the iterable."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    code = _norm_code(normalize)
    total = len(iterable) if hasattr(iterable, "__len__") else None
    bar = None
    if progress:
        bar = progress_bar(total, "map_embed", "text")
    it = iter(iterable)
    base = 0
    try:
        while True:
            chunk = []
            for x in it:
                chunk.append(x)
                if len(chunk) == batch_size:
                    break
            if not chunk:
                return
            try:
                vectors, _, _ = _embed_items(ctx, chunk, code, truncate, add_special, parse_special)
            except (ValueError, TypeError) as e:
                raise _reindex(e, base) from None
            for v in vectors:
                yield v
            if bar is not None:
                bar.update(len(chunk))
            base += len(chunk)
    finally:
        if bar is not None:
            bar.close()


def _reindex(e: Exception, base: int, label: str = "item") -> Exception:
    """The error of a chunk about its text ``e.index`` turned into one about ``label`` ``base +
    index`` of the whole iterable."""
    idx = getattr(e, "index", None)
    if idx is None or (base == 0 and label == "text"):
        return e
    msg, head = str(e), f"text {idx}"
    if msg.startswith(head):
        msg = f"{label} {base + idx}" + msg[len(head):]
    new = type(e).__new__(type(e))
    new.args = (msg,)
    for k, v in getattr(e, "__dict__", {}).items():
        setattr(new, k, v)
    new.index = base + idx
    return new
