"""A GGUF file's metadata and tensor names, read from its header alone (no numpy, no torch).

The API reads the bundled model's shape from its GGUF before the worker has imported it
(api/fitcheck.py). `gguf.GGUFReader` builds a numpy view of every part of every field on open,
and SmolLM2's tokenizer arrays hold ~100,000 strings: 6 s on an AVX2 EPYC, paid by the first job a
fresh API process creates. This walks the header once with `struct` (~0.1 s): scalars are decoded,
arrays are skipped and only their length kept, tensor infos give their names. Format: the GGUF
specification (ggml's docs/gguf.md), versions 2 and 3, little-endian.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
# value type -> struct format of one scalar; 8 (string) and 9 (array) are handled apart.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """Not a GGUF file this reader understands (bad magic, version, type, or a truncated header)."""


@dataclass
class GGUFHeader:
    """What the header says: `fields` maps each scalar or string key to its value, `array_lengths`
    each array key to its element count (the elements are skipped), `tensors` lists the tensor
    names in file order."""

    version: int
    fields: dict[str, Any] = field(default_factory=dict)
    array_lengths: dict[str, int] = field(default_factory=dict)
    tensors: list[str] = field(default_factory=list)


class _Cursor:
    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error as e:
            raise GGUFFormatError(f"truncated header at byte {self.pos}") from e
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise GGUFFormatError(f"a string of {n} bytes at byte {self.pos} runs past the end of the file")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            n = self.take("Q")
            self.pos += n
        if self.pos > len(self.buf):
            raise GGUFFormatError("a string array runs past the end of the file")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise GGUFFormatError(f"unknown value type {vtype} at byte {self.pos}")
        return self.take(fmt)


def read_header(path: str | Path) -> GGUFHeader:
    """Parse the metadata and tensor infos of the GGUF file at `path`.

    Raises:
        GGUFFormatError: if it is not a little-endian GGUF of version 2 or 3, or is truncated.
    """
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        if bytes(buf[:4]) != MAGIC:
            raise GGUFFormatError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r})")
        cur.pos = 4
        version = cur.take("I")
        if version not in (2, 3):
            raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = cur.take("Q"), cur.take("Q")
        header = GGUFHeader(version=version)
        for _ in range(n_kv):
            key, vtype = cur.string(), cur.take("I")
            if vtype != _ARRAY:
                header.fields[key] = cur.value(vtype)
                continue
            etype, count = cur.take("I"), cur.take("Q")
            header.array_lengths[key] = count
            if etype == _STRING:
                cur.skip_strings(count)
            elif etype in _SCALARS:
                cur.pos += count * struct.calcsize(_SCALARS[etype])
            else:  # arrays of arrays: nothing we read uses them
                raise GGUFFormatError(f"{path}: key {key} is an array of type {etype}; nested arrays are not supported")
        for _ in range(n_tensors):
            name, n_dims = cur.string(), cur.take("I")
            cur.pos += 8 * n_dims + 4 + 8  # dims, type, offset
            header.tensors.append(name)
        return header
