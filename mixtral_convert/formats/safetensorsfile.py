"""Reading and writing the safetensors format without holding tensors in memory.

The format: an 8-byte little-endian header length, a JSON header `{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}` (offsets relative to the end of
the header), then the raw little-endian bytes. Every tensor's location is known from the
header alone.

Reading: `stheader.parse_file` parses and checks the header (one-line errors for every
malformation, the tensors tiling the data exactly); `read_tensors` then opens the file with the
safetensors library (`safe_open`, which maps it) and gives a lazy tensor per entry that copies
out only the block asked for. Writing: `write_safetensors` writes the header for known shapes
and dtypes, then streams each tensor's bytes from a producer in blocks, with the same signature
as `torchzip.write_checkpoint`.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors import safe_open

from ..errors import ConvertError
from ..io.lazy import Lazy, TensorSpec
from .stheader import DTYPES, parse_file

NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


class Sliced(Lazy):
    """A tensor of a safetensors file opened with `safetensors.safe_open`: the library maps the
    file and copies out only the rows (and columns) asked for; nothing is held."""

    def __init__(self, handle, name: str, dtype: torch.dtype, shape: tuple[int, ...]):
        self.handle, self.name, self.dtype, self.shape = handle, name, dtype, shape

    def read(self, r0, r1, c0=None, c1=None):
        sl = self.handle.get_slice(self.name)
        if not self.shape:
            return sl[...].reshape(1)
        return sl[r0:r1] if c0 is None else sl[r0:r1, c0:c1]


def read_tensors(path: Path) -> dict[str, Lazy]:
    """Every tensor of a safetensors file as a lazy tensor. The header is checked first (a
    one-line error naming what is wrong), then the file is opened with the library."""
    path = Path(path)
    entries, _ = parse_file(path)
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as e:  # the library's errors (SafetensorError and others): damaged input
        raise ConvertError(f"{path}: unreadable safetensors file ({str(e).strip()[:160]}); the file is damaged "
                           "or truncated: re-download it") from None
    out: dict[str, Lazy] = {}
    for e in entries:  # in data order
        out[e.name] = Sliced(handle, e.name, e.dtype, e.shape)
    return out


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
                      fsync: bool = True, hasher=None, metadata: Optional[dict[str, str]] = None) -> int:
    """Write a safetensors file of `specs`; `produce(spec)` yields the tensor's bytes in order.
    `hasher` (hashlib-like) sees every byte of the file in order. Returns the file size."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    pos = 0

    def write(data) -> None:
        nonlocal pos
        view = memoryview(data).cast("B")
        if hasher is not None:
            hasher.update(view)
        while view.nbytes:
            n = os.write(fd, view)
            view = view[n:]
            pos += n

    try:
        write(header_bytes(specs, metadata))
        for spec in specs:
            start = pos
            for chunk in produce(spec):
                write(chunk)
            if pos - start != spec.nbytes:
                raise AssertionError(f"tensor {spec.name}: produced {pos - start} bytes, expected {spec.nbytes}")
        if fsync:
            os.fsync(fd)
        return pos
    finally:
        os.close(fd)
