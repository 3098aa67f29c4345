"""Read a GGUF file's header, metadata and tensor index without loading it (no llama.cpp).

Used to refuse, before calling into C, files that llama.cpp would abort the process on instead of
returning an error (a block count of 0, a weight with a dimension of 0, heads that do not divide,
...).  Arrays are skipped, not read (except short integer arrays: per-layer hyper-parameters), and
metadata is read on demand, so a caller that needs two keys near the start stops there.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_INT_TYPES = frozenset((0, 1, 2, 3, 4, 5, 10, 11))
_U64 = struct.Struct("<Q")

# llama.cpp asserts 0 < n_layer <= LLAMA_MAX_LAYERS (src/llama-hparams.h) while loading hparams
LLAMA_MAX_LAYERS = 512

# architectures whose every layer is attention: a layer with 0 heads or 0 KV heads aborts while
# building the graph.  (Hybrid ones -- jamba, lfm2, deci, falcon-h1, qwen3next, ... -- mark their
# recurrent or attention-free layers exactly that way, so this is an allow-list, not a rule.)
_EVERY_LAYER_ATTENDS = frozenset({"llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3",
                                  "mistral3"})
# keys whose 0 explains an empty weight
_SIZE_KEYS = ("embedding_length", "feed_forward_length", "attention.head_count",
              "attention.head_count_kv", "attention.key_length", "attention.value_length")


class GGUFArray(NamedTuple):
    """An array value: its element type (GGUF value type) and length, and its values when they are
    integers and at most LLAMA_MAX_LAYERS of them (per-layer hyper-parameters); for the
    vocabulary's token strings (start offset, count), read by GGUFReader.token_texts; None
    otherwise."""
    type: int
    count: int
    values: Optional[Tuple[int, ...]] = None


class GGUFTensor(NamedTuple):
    name: str
    dims: Tuple[int, ...]       # ggml order (ne0 first)
    type: int                   # ggml_type
    offset: int                 # from the start of the data section


class GGUFFormatError(ValueError):
    """Not a GGUF file, or a truncated / malformed one."""


class GGUFReader:
    """``with GGUFReader(path) as r: for key, value in r.metadata(): ...; r.tensors()``."""

    def __init__(self, path):
        self._fh = open(os.fspath(path), "rb")
        self._buf = None
        try:
            self.size = os.fstat(self._fh.fileno()).st_size
            if self.size < 24:
                raise GGUFFormatError("too short for a GGUF header")
            self._buf = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
            magic, self.version, self.n_tensors, self.n_kv = struct.unpack_from("<4sIQQ", self._buf, 0)
            if magic != b"GGUF":
                raise GGUFFormatError("no GGUF magic")
            if self.version not in (2, 3):
                raise GGUFFormatError(f"GGUF version {self.version} (2 or 3 expected)")
        except BaseException:
            self.close()
            raise
        self._off = 24          # where the tensor index starts, once metadata() has been read

    def close(self):
        if self._buf is not None:
            self._buf.close()
            self._buf = None
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _need(self, off, n):
        if n < 0 or off + n > self.size:
            raise GGUFFormatError("truncated")

    def _string(self, off):
        self._need(off, 8)
        (n,) = struct.unpack_from("<Q", self._buf, off)
        self._need(off + 8, n)
        try:
            text = bytes(self._buf[off + 8:off + 8 + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"a string is not UTF-8 ({e})") from None
        return text, off + 8 + n

    def metadata(self) -> Iterator[Tuple[str, Any]]:
        """(key, value) in file order; arrays as GGUFArray.  Read on demand."""
        buf, off = self._buf, 24
        for _ in range(self.n_kv):
            key, off = self._string(off)
            self._need(off, 4)
            (vtype,) = struct.unpack_from("<I", buf, off)
            off += 4
            if vtype == _STRING:
                value, off = self._string(off)
            elif vtype == _ARRAY:
                self._need(off, 12)
                atype, n = struct.unpack_from("<IQ", buf, off)
                off += 12
                values = None
                if atype == _STRING:
                    unpack = _U64.unpack_from       # (a vocabulary: 10**5 strings and more)
                    start, size = off, self.size
                    try:
                        for _ in range(n):
                            off += 8 + unpack(buf, off)[0]
                            if off > size:          # (a length near 2**64 would overflow)
                                raise GGUFFormatError("truncated")
                    except (struct.error, OverflowError):
                        raise GGUFFormatError("truncated") from None
                    self._need(off, 0)
                    if key == "tokenizer.ggml.tokens":
                        values = (start, n)         # read on demand: token_texts()
                elif atype in _SCALARS:
                    size = struct.calcsize(_SCALARS[atype])
                    self._need(off, n * size)
                    if atype in _INT_TYPES and n <= LLAMA_MAX_LAYERS:
                        values = struct.unpack_from(f"<{n}{_SCALARS[atype][1]}", buf, off)
                    off += n * size
                else:
                    raise GGUFFormatError(f"array of value type {atype} in {key!r}")
                value = GGUFArray(atype, n, values)
            elif vtype in _SCALARS:
                fmt = _SCALARS[vtype]
                self._need(off, struct.calcsize(fmt))
                (value,) = struct.unpack_from(fmt, buf, off)
                off += struct.calcsize(fmt)
            else:
                raise GGUFFormatError(f"value type {vtype} of {key!r}")
            self._off = off
            yield key, value

    def token_texts(self, arr: "GGUFArray") -> List[bytes]:
        """The strings of the ``tokenizer.ggml.tokens`` array (raw bytes)."""
        start, n = arr.values
        buf, off, out = self._buf, start, []
        unpack, append = _U64.unpack_from, out.append
        for _ in range(n):
            length = unpack(buf, off)[0]
            off += 8
            append(buf[off:off + length])
            off += length
        return out

    def tensors(self) -> List[GGUFTensor]:
        """The tensor index (reads the metadata first if it has not been read)."""
        if self._off == 24:
            for _ in self.metadata():
                pass
        buf, off, out = self._buf, self._off, []
        for _ in range(self.n_tensors):
            name, off = self._string(off)
            self._need(off, 4)
            (n_dims,) = struct.unpack_from("<I", buf, off)
            if n_dims > 8:
                raise GGUFFormatError(f"tensor {name!r} has {n_dims} dimensions")
            self._need(off, 4 + 8 * n_dims + 12)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
            ttype, offset = struct.unpack_from("<IQ", buf, off + 4 + 8 * n_dims)
            off += 4 + 8 * n_dims + 12
            out.append(GGUFTensor(name, tuple(dims), ttype, offset))
        return out


def read_gguf(path, *, tensors: bool = True) -> Tuple[int, Dict[str, Any], List[GGUFTensor]]:
    """(version, metadata, tensor index) of the GGUF file at ``path``.  Raises GGUFFormatError
    for anything that is not a well-formed GGUF header."""
    with GGUFReader(path) as r:
        meta = dict(r.metadata())
        return r.version, meta, (r.tensors() if tensors else [])


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _per_layer(value, n_layer: int) -> Optional[List[int]]:
    """A key llama.cpp reads with get_key_or_arr: a scalar meant for every layer, or an array of one
    int per layer.  None when it is neither (llama.cpp reports wrong types and lengths itself)."""
    if _is_int(value):
        return [value] * n_layer
    if isinstance(value, GGUFArray) and value.values is not None and value.count == n_layer:
        return list(value.values)
    return None


def _check_hparams(arch: str, meta: Dict[str, Any], n_layer: int) -> Optional[str]:
    """Hyper-parameters that llama.cpp GGML_ASSERTs on (the process aborts) when it builds the
    graph, instead of refusing the file: read the way llama_model_base::load_hparams reads them."""
    k = f"{arch}."
    n_head = _per_layer(meta.get(k + "attention.head_count"), n_layer)
    kv_key = k + "attention.head_count_kv"
    n_head_kv = _per_layer(meta[kv_key], n_layer) if kv_key in meta else n_head
    if n_head is not None and n_head_kv is not None:
        scalars = _is_int(meta.get(k + "attention.head_count")) and _is_int(meta.get(kv_key, 0))
        for il, (h, kv) in enumerate(zip(n_head, n_head_kv)):
            where = "" if scalars else f" in layer {il}"
            if arch in _EVERY_LAYER_ATTENDS and (h <= 0 or kv <= 0):
                return (f"{k}attention.head_count is {h} and {kv_key} is {kv}{where}: every "
                        f"layer of a {arch} model needs attention and KV heads")
            # grouped-query attention shares each KV head among n_head / n_head_kv query heads
            # (ggml_can_mul_mat(k, q) asserts); 0 is a layer without attention (hybrid models)
            if h > 0 and kv > 0 and h % kv:
                return (f"{k}attention.head_count ({h}) is not a multiple of "
                        f"{kv_key} ({kv}){where}")
    if n_head is not None and n_head[0] > 0:
        # llama.cpp derives the head sizes from layer 0's head count unless they are given
        n_embd = meta.get(k + "embedding_length")
        for what in ("key", "value"):
            given = meta.get(f"{k}attention.{what}_length")
            if _is_int(given):
                if given <= 0:
                    return f"{k}attention.{what}_length is {given} (attention heads need a size > 0)"
            elif _is_int(n_embd) and n_embd // n_head[0] <= 0:
                return (f"{k}embedding_length ({n_embd}) / attention.head_count ({n_head[0]}) "
                        f"leaves attention heads of size 0")
    for key in (k + "rope.dimension_count", k + "rope.dimension_count_swa"):
        n_rot = meta.get(key)
        if _is_int(n_rot) and n_rot % 2:
            # rotary embeddings turn pairs of dimensions (ggml_rope asserts n_dims % 2 == 0)
            return f"{key} is {n_rot} (rotary embeddings need an even number of dimensions)"
    return None


def _duplicate_token(path, toks: "GGUFArray") -> Optional[str]:
    """A message when the vocabulary lists a token text twice (llama.cpp asserts), or None.
    (Reading gemma3's 262k token strings takes ~0.07 s.)"""
    try:
        with GGUFReader(path) as r:
            texts = r.token_texts(toks)
    except (OSError, ValueError, struct.error):
        return None
    if len(set(texts)) == len(texts):
        return None
    seen: Dict[bytes, int] = {}
    for i, t in enumerate(texts):
        if t in seen:
            return (f"the vocabulary lists token {t!r} twice (ids {seen[t]} and {i}): llama.cpp "
                    "asserts that token texts are unique")
        seen[t] = i
    return None


def check_loadable(path) -> Optional[str]:
    """A reason llama.cpp would abort the process on this file instead of failing cleanly, or
    None.  Only clear cases are reported; a file this reader cannot parse is left to llama.cpp,
    which reports malformed headers as errors (the checks that need the part it could not read
    are skipped).

    The cases: a block count outside 1..512; a tensor with a dimension of 0 (a feed-forward
    length or a head count of 0 written into the weights' shapes: loading asserts, quantize
    divides by zero); head counts that do not divide (GQA); heads of size 0; an odd rotary
    dimension count.  Per-layer arrays are checked element by element; values a model may
    legitimately have (0 heads or 0 KV heads in a layer without attention, a feed-forward length
    of 0 in Mamba and RWKV files) are left alone -- their weights show whether they are real.
    """
    meta: Dict[str, Any] = {}
    complete = False                    # all the metadata read
    tensors: Optional[List[GGUFTensor]] = None
    try:
        with GGUFReader(path) as r:
            try:
                for key, value in r.metadata():
                    meta[key] = value
                complete = True
                tensors = r.tensors()
            except ValueError:
                pass                    # the block count may still be read before the bad part
    except (OSError, ValueError):
        return None
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        return None
    n = meta.get(f"{arch}.block_count")
    if not _is_int(n):
        return None
    if not 0 < n <= LLAMA_MAX_LAYERS:
        return f"{arch}.block_count is {n} (llama.cpp supports 1 to {LLAMA_MAX_LAYERS} layers)"
    if not complete:
        return None
    toks = meta.get("tokenizer.ggml.tokens")
    if isinstance(toks, GGUFArray) and toks.values is not None and toks.count > 0:
        dup = _duplicate_token(path, toks)
        if dup is not None:
            return dup
    for t in tensors or ():
        if 0 in t.dims:
            zero = [f"{arch}.{key} is 0" for key in _SIZE_KEYS
                    if _is_int(meta.get(f"{arch}.{key}")) and meta[f"{arch}.{key}"] == 0]
            return (f"tensor {t.name!r} has a dimension of 0 (shape {list(t.dims)}"
                    f"{'; ' + ', '.join(zero) if zero else ''}): llama.cpp cannot use an empty weight")
    return _check_hparams(arch, meta, n)


def check_adapter(path, kind: str) -> Optional[str]:
    """A reason to refuse a LoRA adapter (``kind`` "lora") or control vector ("control_vector")
    file before llama.cpp reads it, or None.  Refused: what is not a whole GGUF header, a LoRA
    file that says it is something else, a weight with a dimension of 0, and control vector
    layers outside 1..512 (common's loader would allocate n_embd floats per layer up to the index
    it reads) or not 1-D F32."""
    try:
        _, meta, tensors = read_gguf(path)
    except GGUFFormatError as e:
        return f"not a GGUF file ({e})"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    for t in tensors:
        if any(d == 0 for d in t.dims):
            return f"tensor {t.name!r} has a dimension of 0"
    if kind == "lora":
        if meta.get("general.type") != "adapter":
            return (f"general.type is {meta.get('general.type')!r}, not 'adapter': a model file "
                    "is not a LoRA adapter")
        if meta.get("adapter.type") != "lora":
            return f"adapter.type is {meta.get('adapter.type')!r}, not 'lora'"
        return None
    found = False
    for t in tensors:
        head, _, layer = t.name.partition(".")
        if head != "direction":
            continue
        found = True
        if not layer.isdigit() or not 0 < int(layer) <= LLAMA_MAX_LAYERS:
            return f"tensor {t.name!r}: the layer index must be 1 to {LLAMA_MAX_LAYERS}"
        if t.type != 0 or len(t.dims) != 1:
            return f"tensor {t.name!r} must be a 1-D F32 vector"
    if not found:
        return "no direction.<layer> tensors: not a control vector"
    return None
