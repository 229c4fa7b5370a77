"""Reading and writing the safetensors format without holding tensors in memory.

The format: an 8-byte little-endian header length, a JSON header `{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}` (offsets relative to the end of
the header), then the raw little-endian bytes. Every tensor's location is known from the
header alone.

Reading: `parse_file` parses and checks the header (one-line errors for every
malformation, the tensors tiling the data exactly); `read_tensors` gives a lazy tensor per
entry that describes where its bytes lie (`io.lazy.OnDisk`), read by positioned reads of only
the block asked for. Writing: `write_safetensors` writes the header for known shapes
and dtypes, then streams each tensor's bytes from a producer in blocks, with the same signature
as `torchzip.write_checkpoint`.

The header checks:
`parse_file` reads a file of its own (what `read_tensors` checks first). A
tar member (mistral-inference's `.tar` downloads) is a safetensors file at an offset inside
another file, and a file joined from byte pieces (`concat`) must be proved whole; all need the
same checks, including the layout ones the safetensors library applies when it opens a file:
the tensors' data regions, sorted by offset, start at 0, follow one another without gap or
overlap, and end exactly at the end of the data. A truncated or padded file fails here with a
one-line error naming the fault; `check_file` adds the library's own opening of a whole
file (what `concat` checks a joined file with).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors import safe_open

from ..errors import ConvertError
from ..io.direct import write_file
from ..io.lazy import Lazy, OnDisk, TensorSpec
from ..io.reads import SourceFile

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100 << 20  # the reference implementation's limit


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: where its bytes are, relative to the data start."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def parse(read_at: Callable[[int, int], bytes], size: int, where: str) -> tuple[list[Entry], int]:
    """(entries in data order, offset of the data from the start of the file) of a safetensors
    file of `size` bytes whose bytes `read_at(offset, n)` gives. ConvertError naming `where`."""
    if size < 8:
        raise ConvertError(f"{where}: {size} bytes, too short for a safetensors file (truncated?)")
    (n,) = struct.unpack("<Q", read_at(0, 8))
    if n > MAX_HEADER or 8 + n > size:
        raise ConvertError(f"{where}: safetensors header length {n} is impossible for a file of {size} bytes; "
                           "the file is truncated or not safetensors")
    raw = read_at(8, n)
    if len(raw) != n:
        raise ConvertError(f"{where}: the safetensors header is cut short ({len(raw)} of {n} bytes); truncated")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConvertError(f"{where}: safetensors header is not valid JSON; the file is corrupt or not "
                           "safetensors") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{where}: safetensors header is not a JSON object; the file is corrupt")
    meta = header.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        raise ConvertError(f"{where}: safetensors __metadata__ is not a JSON object; the file is corrupt")
    start = 8 + n
    entries = [_entry(name, info, where) for name, info in header.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    pos = 0
    for e in entries:
        if e.begin != pos:
            what = "a gap" if e.begin > pos else "an overlap"
            raise ConvertError(f"{where}: tensor '{e.name}' starts at data byte {e.begin}, the previous one ends at "
                               f"{pos} ({what}); the header is corrupt")
        pos = e.end
    if start + pos != size:
        diff = size - start - pos
        how = (f"{diff} bytes after the last tensor" if diff > 0 else
               f"{-diff} bytes missing from the end (truncated)")
        raise ConvertError(f"{where}: the header's tensors need {start + pos} bytes, the file has {size} "
                           f"({how}); the file is damaged: re-download it")
    return entries, start


def _entry(name: str, info, where: str) -> Entry:
    try:
        dtype = DTYPES[info["dtype"]]
        shape = tuple(int(s) for s in info["shape"])
        b, e = (int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise ConvertError(f"{where}: tensor '{name}' has an unsupported or malformed header entry "
                           f"({str(info)[:80]})") from None
    if any(s < 0 for s in shape) or b < 0 or e - b != math.prod(shape) * dtype.itemsize:
        raise ConvertError(f"{where}: tensor '{name}' has data_offsets [{b}, {e}] that do not fit its shape "
                           f"{list(shape)} {info['dtype']}; the file is corrupt")
    return Entry(name, dtype, shape, b, e)


def parse_file(path, where: str = "") -> tuple[list[Entry], int]:
    """`parse` of a file of its own."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)

            def read_at(offset: int, n: int) -> bytes:
                f.seek(offset)
                return f.read(n)

            return parse(read_at, size, where or str(path))
    except FileNotFoundError:
        raise ConvertError(f"{where or path}: not found") from None
    except OSError as e:
        raise ConvertError(f"{where or path}: cannot read ({e.strerror or e})") from None


def check_file(path, where: str = "") -> int:
    """A whole safetensors file: `parse_file`'s checks, then the safetensors library opens it and
    lists the same tensors. Returns the tensor count."""
    where = where or str(path)
    try:
        entries, _ = parse_file(path, where)
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
    except OSError as e:
        raise ConvertError(f"{where}: cannot read ({e.strerror or e})") from None
    except ConvertError:
        raise
    except Exception as e:  # the library's own refusal: damaged content
        raise ConvertError(f"{where}: not a loadable safetensors file ({str(e).strip()[:120]})") from None
    if names != {e.name for e in entries}:
        raise ConvertError(f"{where}: the safetensors library reads other tensors than the header lists; the file "
                           "is corrupt")
    return len(entries)


NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def read_tensors(path: Path) -> dict[str, Lazy]:
    """Every tensor of a safetensors file as a description of where its bytes lie, in data
    order, read later by positioned reads (`io.reads`). The header is checked first (a one-line
    error naming what is wrong); the file's identity is recorded before it is read."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: not found")
    src = SourceFile(path)
    entries, start = parse(src.read, src.size, str(path))
    return {e.name: OnDisk(src, start + e.begin, e.shape, e.dtype, name=e.name) for e in entries}


def file_size(specs: list[TensorSpec], metadata: Optional[dict[str, str]] = None) -> int:
    """The exact size of the file `write_safetensors` writes for `specs` (for --dry-run)."""
    return len(header_bytes(specs, metadata)) + sum(s.nbytes for s in specs)


def header_bytes(specs: list[TensorSpec], metadata: Optional[dict[str, str]] = None) -> bytes:
    """The 8-byte length and the JSON header for tensors laid out in `specs` order, padded with
    spaces so that data starts 8-byte aligned (as the reference writer does)."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    pos = 0
    for s in specs:
        if s.dtype not in NAMES:
            raise ConvertError(f"tensor '{s.name}': dtype {s.dtype} has no safetensors name")
        header[s.name] = {"dtype": NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        pos += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: Path, specs: list[TensorSpec], produce: Callable[[TensorSpec], Iterator],
                      fsync: bool = True, hasher=None, metadata: Optional[dict[str, str]] = None,
                      stage_bytes: Optional[int] = None) -> int:
    """Write a safetensors file of `specs`; `produce(spec)` yields the tensor's bytes in order.
    `hasher` (hashlib-like) sees every byte of the file in order. Returns the file size."""
    return write_file(path, header_bytes(specs, metadata), specs, produce, fsync, hasher, stage_bytes=stage_bytes)
