"""Read the metadata section of a GGUF file, and nothing else.

The ``gguf`` package parses every tensor descriptor and turns each vocabulary string into a
numpy array; on SmolLM2 that takes ~3.7 s, too slow for a shell that should be ready at once.
This reader walks only the key/value header (~50 ms) with the standard library.
"""

from __future__ import annotations

import mmap
import struct
from array import array
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"

# GGUF value types -> struct format of a scalar (None for strings and arrays).
_SCALAR_FORMATS: dict[int, str] = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_TYPE_STRING = 8
_TYPE_ARRAY = 9


class GGUFError(ValueError):
    """The file is not a GGUF model or its header is damaged."""


def is_gguf(path: Path) -> bool:
    """True if the file starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise GGUFError("truncated GGUF header")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.unpack("Q")
        end = self.pos + length
        if end > len(self.buf):
            raise GGUFError("truncated GGUF string")
        raw = self.buf[self.pos : end]
        self.pos = end
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _TYPE_STRING:
            return self.string()
        if vtype == _TYPE_ARRAY:
            item_type = self.unpack("I")
            count = self.unpack("Q")
            if item_type == _TYPE_STRING:
                return [self.string() for _ in range(count)]
            fmt = _SCALAR_FORMATS.get(item_type)
            if fmt is None:
                return [self.value(item_type) for _ in range(count)]
            size = struct.calcsize(fmt)
            end = self.pos + size * count
            if end > len(self.buf):
                raise GGUFError("truncated GGUF array")
            values = array(fmt if fmt != "?" else "B")
            values.frombytes(self.buf[self.pos : end])
            self.pos = end
            return values.tolist()
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise GGUFError(f"unknown GGUF value type {vtype}")
        return self.unpack(fmt)


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Return every metadata key of a GGUF file (tokenizer arrays included)."""
    with open(path, "rb") as fh:
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # empty file
            raise GGUFError("file is empty") from exc
    try:
        if buf[:4] != GGUF_MAGIC:
            raise GGUFError("not a GGUF file (bad magic bytes)")
        cur = _Cursor(buf)
        cur.pos = 4
        version = cur.unpack("I")
        if version < 2:
            raise GGUFError(f"GGUF version {version} is too old")
        cur.unpack("Q")  # tensor count
        kv_count = cur.unpack("Q")
        meta: dict[str, Any] = {"GGUF.version": version}
        for _ in range(kv_count):
            key = cur.string()
            meta[key] = cur.value(cur.unpack("I"))
        return meta
    finally:
        buf.close()
