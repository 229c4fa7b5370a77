"""Reading and writing the safetensors format without holding tensors in memory.

The format: an 8-byte little-endian header length, a JSON header `{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}` (offsets relative to the end of
the header), then the raw little-endian bytes. Every tensor's location is known from the
header alone.

Reading: `read_header` parses the header; `load_lazy` maps the file privately (mmap, copy on
write, so nothing is read until touched and the file is never modified) and returns a tensor
view per entry. Writing: `write_safetensors` writes the header for known shapes and dtypes,
then streams each tensor's bytes from a producer in blocks, with the same signature as
`torchfile.write_checkpoint`.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from .errors import ConvertError
from .torchfile import TensorSpec

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20  # the reference implementation's limit


def read_header(path: Path) -> tuple[dict, int]:
    """(header without __metadata__, byte offset where tensor data starts)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConvertError(f"{path}: too short for a safetensors file (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise ConvertError(f"{path}: safetensors header length {n} is impossible for a file of "
                                   f"{size} bytes; the file is truncated or not safetensors")
            raw = f.read(n)
    except FileNotFoundError:
        raise ConvertError(f"{path}: not found") from None
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConvertError(f"{path}: safetensors header is not valid JSON; the file is corrupt") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    start = 8 + n
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            b, e = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{path}: tensor '{name}' has an unsupported or malformed header entry "
                               f"({str(info)[:80]})") from None
        numel = 1
        for s in shape:
            numel *= s
        if e - b != numel * dtype.itemsize or b < 0 or start + e > size:
            raise ConvertError(f"{path}: tensor '{name}' has data_offsets [{b}, {e}] that do not fit its shape "
                               f"{shape} {info['dtype']} or the file's size; the file is truncated or corrupt")
    return header, start


def load_lazy(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, as views of a private memory map (read when touched)."""
    path = Path(path)
    header, start = read_header(path)
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else None
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dtype, shape = DTYPES[info["dtype"]], tuple(int(s) for s in info["shape"])
        b, e = info["data_offsets"]
        if e == b:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        # frombuffer keeps a reference to the map, so it lives as long as the tensors do
        t = torch.frombuffer(mm, dtype=torch.uint8, count=e - b, offset=start + b)
        if (start + b) % dtype.itemsize == 0:
            t = t.view(dtype)
        else:  # misaligned (legal in the format, never written by the reference writer): copy
            t = t.clone().view(dtype)
        out[name] = t.reshape(shape)
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
