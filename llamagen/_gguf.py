"""Read a GGUF file's header, metadata and tensor index without loading it (no llama.cpp).

Used to refuse, before calling into C, files that llama.cpp would abort the process on instead of
returning an error (a block count of 0, say).  Arrays are skipped, not read, and metadata is read
on demand, so a caller that needs two keys near the start stops there.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# llama.cpp asserts 0 < n_layer <= LLAMA_MAX_LAYERS (src/llama-hparams.h) while loading hparams
LLAMA_MAX_LAYERS = 512


class GGUFArray(NamedTuple):
    """An array value, not read: its element type (GGUF value type) and length."""
    type: int
    count: int


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
                if atype == _STRING:
                    for _ in range(n):
                        self._need(off, 8)
                        (k,) = struct.unpack_from("<Q", buf, off)
                        off += 8 + k
                    self._need(off, 0)
                elif atype in _SCALARS:
                    off += n * struct.calcsize(_SCALARS[atype])
                    self._need(off, 0)
                else:
                    raise GGUFFormatError(f"array of value type {atype} in {key!r}")
                value = GGUFArray(atype, n)
            elif vtype in _SCALARS:
                fmt = _SCALARS[vtype]
                self._need(off, struct.calcsize(fmt))
                (value,) = struct.unpack_from(fmt, buf, off)
                off += struct.calcsize(fmt)
            else:
                raise GGUFFormatError(f"value type {vtype} of {key!r}")
            self._off = off
            yield key, value

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


def check_loadable(path) -> Optional[str]:
    """A reason llama.cpp would abort the process on this file instead of failing cleanly, or
    None.  Only clear cases are reported; a file this reader cannot parse is left to llama.cpp,
    which reports malformed headers as errors."""
    arch = block = None
    try:
        with GGUFReader(path) as r:
            for key, value in r.metadata():     # converted models write these first: stop early
                if key == "general.architecture":
                    arch = value
                elif key.endswith(".block_count"):
                    block = (key, value)
                if isinstance(arch, str) and block is not None and block[0] == f"{arch}.block_count":
                    break
    except (OSError, ValueError):
        return None
    if not isinstance(arch, str) or block is None or block[0] != f"{arch}.block_count":
        return None
    n = block[1]
    if isinstance(n, int) and not isinstance(n, bool) and not 0 < n <= LLAMA_MAX_LAYERS:
        return f"{arch}.block_count is {n} (llama.cpp supports 1 to {LLAMA_MAX_LAYERS} layers)"
    return None
