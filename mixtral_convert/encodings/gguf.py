"""The GGUF byte encoding (docs/formats.md, "GGUF"), written as a stream of known size.

A GGUF file (version 3, little-endian): magic `GGUF`, version, tensor count, metadata count,
the metadata key/values, the tensor infos (name, dims innermost first, ggml type, offset from
the data start), padding to the alignment (32), then each tensor's bytes padded to the
alignment. Everything before the data depends only on names, shapes and types, so
`header_bytes` is computed up front and `file_size` is exact before a byte of data exists.
`write_gguf` then streams each tensor's bytes from a producer, a block at a time, the way the
safetensors and torch zip writers do (the `gguf` package's own writer wants whole tensors).

Values are typed with the `gguf` package's `GGUFValueType`; tensor types and their block
sizes are its `GGMLQuantizationType` and `GGML_QUANT_SIZES`. `quantize_rows` turns float rows
into a type's bytes (Q8_0 blocks of an f16 scale and 32 int8) as the package's quantizer
(`gguf.quants`) writes them (Q8_0 by `encodings.q8_0`, spread over the cores), the same bytes
for the same rows however the tensor is cut into row blocks.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, Union

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, GGMLQuantizationType, quants
from gguf import GGUFValueType as V

from ..errors import ConvertError
from ..io.direct import write_file
from . import q8_0

T = GGMLQuantizationType
TORCH_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}  # stored as-is
_SCALAR = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
           V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}
_ARRAY_NP = {V.FLOAT32: "<f4", V.INT32: "<i4", V.UINT32: "<u4", V.UINT8: "u1", V.INT8: "i1"}


@dataclass(frozen=True)
class Value:
    """A metadata value: `vtype` a scalar or STRING type, or ARRAY with `item` the element type."""

    vtype: V
    value: object
    item: Union[V, None] = None


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the header describes it: `shape` in numpy (row-major) order."""

    name: str
    shape: tuple[int, ...]
    ggml_type: T

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        if self.shape[-1] % block:
            raise ConvertError(f"tensor '{self.name}': rows of {self.shape[-1]} values are not whole blocks of "
                               f"{block}, which {self.ggml_type.name} needs")
        return math.prod(self.shape[:-1]) * (self.shape[-1] // block) * size


def string_bytes(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def value_bytes(v: Value) -> bytes:
    if v.vtype == V.STRING:
        return string_bytes(v.value)
    if v.vtype != V.ARRAY:
        return struct.pack(_SCALAR[v.vtype], v.value)
    items = list(v.value)
    head = struct.pack("<IQ", int(v.item), len(items))
    if v.item == V.STRING:
        return head + b"".join(string_bytes(s) for s in items)
    if v.item in _ARRAY_NP:
        return head + np.asarray(items, dtype=_ARRAY_NP[v.item]).tobytes()
    return head + b"".join(struct.pack(_SCALAR[v.item], x) for x in items)


def _pad(n: int, alignment: int = GGUF_DEFAULT_ALIGNMENT) -> int:
    return (-n) % alignment


def offsets(tensors: Sequence[TensorInfo]) -> list[int]:
    """Each tensor's offset from the data start: the previous one's end, aligned."""
    out, pos = [], 0
    for t in tensors:
        out.append(pos)
        pos += t.nbytes + _pad(t.nbytes)
    return out


def header_bytes(metadata: dict[str, Value], tensors: Sequence[TensorInfo]) -> bytes:
    """Everything before the tensor data, padding included."""
    parts = [struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(tensors), len(metadata))]
    for key, v in metadata.items():
        parts.append(string_bytes(key) + struct.pack("<I", int(v.vtype)) + value_bytes(v))
    for t, off in zip(tensors, offsets(tensors), strict=True):
        dims = tuple(reversed(t.shape))  # GGUF lists the innermost dimension first
        parts.append(string_bytes(t.name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, int(t.ggml_type), off))
    raw = b"".join(parts)
    return raw + b"\0" * _pad(len(raw))


def file_size(metadata: dict[str, Value], tensors: Sequence[TensorInfo]) -> int:
    """The exact size `write_gguf` will write."""
    data = sum(t.nbytes + _pad(t.nbytes) for t in tensors)
    return len(header_bytes(metadata, tensors)) + data


def quantize_rows(block: torch.Tensor, ggml_type: T, label: str = "tensor") -> np.ndarray:
    """Rows of values as `ggml_type`'s bytes (uint8): float types cast by torch (rounding to
    nearest even, as every cast in this tool); Q8_0 by `encodings.q8_0` over the cores, byte for
    byte the gguf package's quantizer from float32 (what llama.cpp's converter quantizes from),
    refusing inf and NaN (`label` names the tensor); other types by the gguf package itself."""
    if ggml_type in TORCH_TYPES:
        t = block.to(TORCH_TYPES[ggml_type]).contiguous()
        return t.reshape(-1).view(torch.uint8).numpy()
    if ggml_type == T.Q8_0:
        return q8_0.quantize(block, label)
    rows = block.float().contiguous().numpy()
    return quants.quantize(rows, ggml_type).reshape(-1)


def write_gguf(path, metadata: dict[str, Value], tensors: Sequence[TensorInfo],
               produce: Callable[[TensorInfo], Iterator], fsync: bool = True, hasher=None) -> int:
    """Write a GGUF file; `produce(info)` yields the tensor's bytes in order (exactly `nbytes`).
    `hasher` (hashlib-like) sees every byte in order. Returns the file size."""
    return write_file(path, header_bytes(metadata, tensors), tensors, produce, fsync, hasher, pad=_pad)
