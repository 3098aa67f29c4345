"""Write tiny, deterministic llama-architecture GGUF models for tests and benchmarks.

The model is a real (if useless) transformer: 2 layers, n_embd 64, 4 heads (2 KV heads), random
f32 weights from a fixed numpy seed.  Its SPM ("llama") vocabulary is built so that ANY UTF-8 text
round-trips through tokenize/detokenize:

* ids 0..2: ``<unk>``, ``<s>``, ``</s>`` (UNKNOWN / CONTROL / CONTROL)
* ids 3..258: the 256 byte tokens ``<0x00>``..``<0xFF>`` (type BYTE) - every character the
  pieces below do not cover falls back to these
* the SentencePiece space marker ``▁`` (U+2581) itself (without it a space would come back as a
  literal "▁")
* normal pieces with scores: ``a``-``z``, ``A``-``Z``, ``0``-``9``, some punctuation, ``▁a``-``▁z``
  and a few merged pieces / words (``th``, ``he``, ``▁the``, ...).  In SPM every merge must go
  through pieces that exist, so each multi-character piece is reachable pair by pair.

Usage::

    from tiny_gguf import write_tiny_gguf
    path = write_tiny_gguf(tmp_dir / "tiny.gguf", seed=0)

Writing one takes a few milliseconds and the bytes depend only on the arguments.
"""
from __future__ import annotations

import os
import string
from pathlib import Path

import numpy as np

import gguf

SPACE = "\u2581"  # "▁", SentencePiece's space marker

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
FIRST_BYTE_ID = 3  # <0x00> is id 3, <0xFF> is id 258

# Multi-character pieces beyond "▁x"; listed so that each one splits into two existing pieces.
_MERGES = [
    "th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "es", "or", "ll", "lo",
    "the", "and", "ing", "ion", "ell", "hell", "hello", "wor", "worl", "world",
    f"{SPACE}th", f"{SPACE}the", f"{SPACE}an", f"{SPACE}and", f"{SPACE}in", f"{SPACE}is",
    f"{SPACE}he", f"{SPACE}hel", f"{SPACE}hell", f"{SPACE}hello", f"{SPACE}wor", f"{SPACE}worl",
    f"{SPACE}world", f"{SPACE}of", f"{SPACE}to", f"{SPACE}it",
    f"{SPACE}{SPACE}", f"{SPACE}{SPACE}{SPACE}{SPACE}",
]


def tiny_vocab(control_tokens=()) -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, token types) of the tiny SPM vocabulary (about 370 tokens), with
    ``control_tokens`` (e.g. a chat format's tags) appended as CONTROL tokens."""
    T = gguf.TokenType
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    scores: list[float] = [0.0, 0.0, 0.0]
    types: list[int] = [T.UNKNOWN, T.CONTROL, T.CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(T.BYTE)

    normal: list[str] = [SPACE]
    normal += list(string.ascii_lowercase)
    normal += list(string.ascii_uppercase)
    normal += list(string.digits)
    normal += list(".,!?;:'\"()[]{}-_=+*/<>#")
    normal += [SPACE + c for c in string.ascii_lowercase]
    normal += _MERGES
    seen = set()
    for i, piece in enumerate(normal):
        assert piece not in seen, piece
        seen.add(piece)
        tokens.append(piece)
        # SPM merges the pair whose result has the highest score: longer pieces score higher,
        # ties broken by position so the table is deterministic.
        scores.append(-1000.0 + 10.0 * len(piece) - 0.001 * i)
        types.append(T.NORMAL)
    for piece in control_tokens:
        assert piece not in seen, piece
        seen.add(piece)
        tokens.append(piece)
        scores.append(0.0)
        types.append(T.CONTROL)
    return tokens, scores, [int(t) for t in types]


def _weights(rng: np.random.Generator, *shape: int, scale: float = 0.02,
             dtype=np.float32) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)


def write_tiny_gguf(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    arch: str = "llama",
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 2048,
    name: str = "llamagen-tiny",
    chat_template: str | None = None,
    add_bos: bool = True,
    add_space_prefix: bool = True,
    dtype: str = "f32",
    cls_labels: list[str] | None = None,
    pooling: int | None = None,
    rerank_template: str | None = None,
    control_tokens: tuple[str, ...] = (),
    causal: bool | None = None,
) -> Path:
    """Write a tiny model to ``path`` and return it as a Path.

    ``arch`` is written as general.architecture and as the prefix of the hyper-parameter keys, so
    an unknown name gives a well-formed GGUF that llama.cpp refuses ("unknown model architecture").
    ``dtype="f16"`` stores the 2-D weights as F16 (norms stay F32, as converted models have them);
    the default "f32" stores everything as F32.  ``arch="qwen3"`` adds its per-head q/k norms;
    ``cls_labels`` adds a classifier head (``cls.output``, one row per label: a reranker with
    ``pooling=4``, llama.cpp's RANK), ``rerank_template`` the GGUF's "rerank" chat template,
    ``control_tokens`` special (CONTROL) tokens appended to the vocabulary.  For K-quants (``llamagen.quantize`` to Q4_K_M,
    ...) every weight's row length must be a multiple of 256: use e.g. n_embd=256, n_ff=512
    (``QUANTIZABLE`` below), otherwise llama.cpp falls back to other types for those tensors.
    """
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', not {dtype!r}")
    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, scores, types = tiny_vocab(control_tokens)
    n_vocab = len(tokens)
    head_dim = n_embd // n_head
    n_embd_kv = head_dim * n_head_kv

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    wt = np.float16 if dtype == "f16" else np.float32
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)

    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(UNK_ID)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(add_bos)
    w.add_add_space_prefix(add_space_prefix)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    if rerank_template is not None:
        w.add_string("tokenizer.chat_template.rerank", rerank_template)
    if pooling is not None:
        w.add_uint32(f"{arch}.pooling_type", pooling)
    if causal is not None:       # False: bidirectional attention (an encoder, as BERT)
        w.add_bool(f"{arch}.attention.causal", causal)
    if cls_labels:
        w.add_array(f"{arch}.classifier.output_labels", list(cls_labels))

    # numpy shape is (rows, cols) = GGUF (ne1, ne0): a weight of ggml shape {n_in, n_out} is
    # written as an array of shape (n_out, n_in).
    w.add_tensor("token_embd.weight", _weights(rng, n_vocab, n_embd, scale=0.5, dtype=wt))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", _weights(rng, n_embd, n_embd, dtype=wt))
        w.add_tensor(p + "attn_k.weight", _weights(rng, n_embd_kv, n_embd, dtype=wt))
        w.add_tensor(p + "attn_v.weight", _weights(rng, n_embd_kv, n_embd, dtype=wt))
        w.add_tensor(p + "attn_output.weight", _weights(rng, n_embd, n_embd, dtype=wt))
        if arch == "qwen3":
            w.add_tensor(p + "attn_q_norm.weight", np.ones(head_dim, dtype=np.float32))
            w.add_tensor(p + "attn_k_norm.weight", np.ones(head_dim, dtype=np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", _weights(rng, n_ff, n_embd, dtype=wt))
        w.add_tensor(p + "ffn_up.weight", _weights(rng, n_ff, n_embd, dtype=wt))
        w.add_tensor(p + "ffn_down.weight", _weights(rng, n_embd, n_ff, dtype=wt))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", _weights(rng, n_vocab, n_embd, scale=0.5, dtype=wt))
    if cls_labels:
        w.add_tensor("cls.output.weight", _weights(rng, len(cls_labels), n_embd, dtype=wt))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


N_VOCAB = len(tiny_vocab()[0])

# Hyper-parameters whose weight rows are all multiples of 256 (K-quants apply to every tensor).
QUANTIZABLE = dict(n_embd=256, n_ff=512, n_head=4, n_head_kv=2)

if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    out = write_tiny_gguf(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf")
    print(out, out.stat().st_size, "bytes,", N_VOCAB, "tokens")


def write_lora(
    path: str | os.PathLike,
    shapes: dict[str, tuple[int, int]],
    *,
    arch: str = "llama",
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    scale: float = 0.5,
    task_name: str | None = None,
    alora_tokens: list[int] | None = None,
    dtype=np.float32,
) -> Path:
    """Write a LoRA adapter (GGUF, as convert_lora_to_gguf.py writes them) to ``path``.

    ``shapes`` maps a base weight's name ("blk.0.attn_q.weight") to its ggml shape (n_in, n_out);
    each gets a random pair ``lora_a`` (ggml {n_in, rank}) and ``lora_b`` ({rank, n_out}).
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    if task_name is not None:
        w.add_string("adapter.lora.task_name", task_name)
    if alora_tokens is not None:
        w.add_key_value("adapter.alora.invocation_tokens", list(alora_tokens),
                        gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
    for name, (n_in, n_out) in shapes.items():
        base = name[:-len(".weight")] if name.endswith(".weight") else name
        w.add_tensor(base + ".weight.lora_a", (rng.standard_normal((rank, n_in)) * scale).astype(dtype))
        w.add_tensor(base + ".weight.lora_b", (rng.standard_normal((n_out, rank)) * scale).astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_lora_shapes(n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_head_kv: int = 2,
                     n_ff: int = 128, targets=("attn_q", "attn_v", "ffn_down")) -> dict:
    """The ggml shapes of the tiny model's weights named in ``targets`` (write_lora's ``shapes``)."""
    n_embd_kv = n_embd // n_head * n_head_kv
    dims = {"attn_q": (n_embd, n_embd), "attn_k": (n_embd, n_embd_kv), "attn_v": (n_embd, n_embd_kv),
            "attn_output": (n_embd, n_embd), "ffn_gate": (n_embd, n_ff), "ffn_up": (n_embd, n_ff),
            "ffn_down": (n_ff, n_embd)}
    return {f"blk.{i}.{t}.weight": dims[t] for i in range(n_layer) for t in targets}


def write_control_vector(path: str | os.PathLike, n_embd: int = 64, n_layer: int = 2, *,
                         seed: int = 0, scale: float = 1.0, arch: str = "llama") -> Path:
    """Write a control vector (GGUF "direction.<layer>" F32 tensors, layers 1..n_layer - 1, as
    llama.cpp's cvector-generator writes them)."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.type", "controlvector")
    for layer in range(1, n_layer):
        w.add_tensor(f"direction.{layer}", (rng.standard_normal(n_embd) * scale).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
