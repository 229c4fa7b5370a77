"""A GGUF file's header read straight from its bytes, for the restack (formats.gguf.restack): the
metadata key/values (each one's raw bytes, decoded only when asked), the tensor infos, the
alignment and where the data starts.

The gguf package's `GGUFReader` builds numpy views of every field part and every tensor, which
takes seconds on a 32000-token vocabulary (docs/performance.md, "Restacking an old per-expert
GGUF"); the restack needs only offsets, and copies the metadata's bytes as they are. The file is
untrusted: every count, length and offset is checked against the file's size before it is used,
and anything damaged is one ConvertError naming the file. The header's bytes are read through the
`SourceFile` the data will be read from (io.reads), so the output's identity check covers them.

`Header.fields[key].contents()` decodes a value as GGUFReader's `ReaderField.contents()` does (a
number, a str, or a list of them), so formats.gguf.source's `field` and `config_of` take a
`Header` as they take a reader.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType
from gguf import GGUFValueType as V

from ...errors import ConvertError
from ...io.reads import SourceFile

T = GGMLQuantizationType
VERSIONS = (2, 3)  # 64-bit counts and lengths (version 1's were 32-bit; gguf's reader takes 2 and 3 as well)
MAX_DIMS = 4  # GGML_MAX_DIMS
_SCALAR = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
           V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}
_SIZE = {k: struct.calcsize(f) for k, f in _SCALAR.items()}
READ_BYTES = 1 << 20  # the header is read this many bytes at a time (a 32000-token vocabulary: about 0.6 MB)
DAMAGED = "the file is damaged or truncated; re-download it"


@dataclass(frozen=True)
class Field:
    """A metadata key/value: its raw bytes are header.raw[start:end]; the value's bytes begin at `at`."""

    header: "Header"
    name: str
    vtype: V
    item: V | None  # an array's element type
    count: int  # an array's length (1 for a scalar or a string)
    start: int
    at: int
    end: int

    @property
    def raw(self) -> bytes:
        return bytes(self.header.raw[self.start:self.end])

    def contents(self):
        """The value, as GGUFReader's ReaderField.contents() gives it."""
        raw, pos = self.header.raw, self.at
        if self.vtype != V.ARRAY:
            return _decode(raw, pos, self.vtype)[0]
        pos += 12  # the element type and the count
        out = []
        for _ in range(self.count):
            v, pos = _decode(raw, pos, self.item)
            out.append(v)
        return out


def _decode(raw, pos: int, vtype: V):
    """(value, position after it) of a scalar or string already bounds-checked by the parser."""
    if vtype == V.STRING:
        n = int.from_bytes(raw[pos:pos + 8], "little")
        return bytes(raw[pos + 8:pos + 8 + n]).decode("utf-8"), pos + 8 + n
    return struct.unpack_from(_SCALAR[vtype], raw, pos)[0], pos + _SIZE[vtype]


@dataclass(frozen=True)
class TensorEntry:
    """A tensor info: `shape` in numpy order (outermost first), `data_offset` its first byte in the file."""

    name: str
    shape: tuple[int, ...]
    tensor_type: T
    data_offset: int
    n_bytes: int


class Header:
    """The parsed header of `file` (a SourceFile): `fields` (key -> Field, in file order),
    `tensors`, `alignment`, `data_start`, and `raw` (the header's bytes)."""

    byte_order = "I"  # as GGUFReader says of a little-endian file (a big-endian one is refused)

    def __init__(self, file: SourceFile):
        self.file, self.path, self.size = file, file.path, file.size
        self.raw = bytearray()
        self.fields: dict[str, Field] = {}
        self.tensors: list[TensorEntry] = []
        self._parse()

    @property
    def kvs(self) -> list[bytes]:
        """The raw bytes of every key/value but gguf-split's (`split.*`, rewritten by whoever splits)."""
        return [f.raw for name, f in self.fields.items() if not name.startswith("split.")]

    # ------------------------------------------------------------------ reading
    def _fail(self, what: str) -> ConvertError:
        return ConvertError(f"{self.path}: {what}; {DAMAGED}")

    def _need(self, pos: int, n: int, what: str) -> None:
        """Bytes [pos, pos + n) of the file in `raw`, or the one-line refusal when the file ends first."""
        if pos + n > self.size:
            raise self._fail(f"{what} at byte {pos} needs {n} bytes, past the end of the file ({self.size} bytes)")
        while len(self.raw) < pos + n:
            want = max(READ_BYTES, pos + n - len(self.raw))
            got = self.file.read(len(self.raw), want)
            if not got:
                raise self._fail(f"{what} at byte {pos}: the file ends at {len(self.raw)} bytes")
            self.raw += got

    def _u(self, pos: int, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self._need(pos, n, what)
        return struct.unpack_from(fmt, self.raw, pos)[0], pos + n

    def _str(self, pos: int, what: str, decode: bool = True):
        n, pos = self._u(pos, "<Q", f"{what}'s length")
        if n > self.size - pos:
            raise self._fail(f"{what} at byte {pos - 8} claims {n} bytes, past the end of the file ({self.size} bytes)")
        self._need(pos, n, what)
        if not decode:
            return None, pos + n
        try:
            return bytes(self.raw[pos:pos + n]).decode("utf-8"), pos + n
        except UnicodeDecodeError:
            raise self._fail(f"{what} at byte {pos - 8} is not UTF-8") from None

    def _vtype(self, pos: int, what: str) -> tuple[V, int]:
        v, pos = self._u(pos, "<I", what)
        try:
            return V(v), pos
        except ValueError:
            raise self._fail(f"{what} has an unknown value type {v}") from None

    def _value(self, pos: int, vtype: V, key: str) -> tuple[V | None, int, int]:
        """(array element type, count, position after the value) of the value at `pos`."""
        if vtype == V.STRING:
            return None, 1, self._str(pos, f"metadata '{key}'", decode=False)[1]
        if vtype != V.ARRAY:
            self._need(pos, _SIZE[vtype], f"metadata '{key}'")
            return None, 1, pos + _SIZE[vtype]
        item, pos = self._vtype(pos, f"metadata '{key}' (an array)")
        count, pos = self._u(pos, "<Q", f"metadata '{key}''s length")
        if item == V.ARRAY:
            raise self._fail(f"metadata '{key}' is an array of arrays, which llama.cpp does not read")
        least = 8 if item == V.STRING else _SIZE[item]
        if count * least > self.size - pos:
            raise self._fail(f"metadata '{key}' claims {count} items, more than the file's {self.size} bytes hold")
        if item != V.STRING:
            self._need(pos, count * least, f"metadata '{key}'")
            return item, count, pos + count * least
        for i in range(count):
            pos = self._str(pos, f"metadata '{key}' item {i}", decode=False)[1]
        return item, count, pos

    def _parse(self) -> None:
        magic, pos = self._u(0, "<I", "the magic")
        if magic != GGUF_MAGIC:
            raise ConvertError(f"{self.path}: not a GGUF file (no GGUF magic)")
        version, pos = self._u(pos, "<I", "the version")
        if version not in VERSIONS:
            if int.from_bytes(version.to_bytes(4, "little"), "big") in VERSIONS:
                raise ConvertError(f"{self.path}: a big-endian GGUF; llama.cpp on this machine reads little-endian "
                                   "files")
            raise ConvertError(f"{self.path}: GGUF version {version}; versions {' and '.join(map(str, VERSIONS))} "
                               "are read (convert it with a current llama.cpp)")
        n_tensors, pos = self._u(pos, "<Q", "the tensor count")
        n_kv, pos = self._u(pos, "<Q", "the metadata count")
        if n_kv * 13 > self.size - pos or n_tensors * 32 > self.size - pos:  # the smallest key/value, tensor info
            raise self._fail(f"the header claims {n_kv} metadata keys and {n_tensors} tensors, more than the file's "
                             f"{self.size} bytes hold")
        for _ in range(n_kv):
            start = pos
            key, pos = self._str(pos, "a metadata key")
            vtype, at = self._vtype(pos, f"metadata '{key}'")
            item, count, pos = self._value(at, vtype, key)
            if key in self.fields:
                raise self._fail(f"metadata '{key}' appears twice")
            self.fields[key] = Field(self, key, vtype, item, count, start, at, pos)
        infos = []
        for _ in range(n_tensors):
            name, pos = self._str(pos, "a tensor name")
            n_dims, pos = self._u(pos, "<I", f"tensor '{name}'")
            if not 1 <= n_dims <= MAX_DIMS:
                raise self._fail(f"tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS} are possible)")
            self._need(pos, 8 * n_dims + 12, f"tensor '{name}'")
            dims = struct.unpack_from(f"<{n_dims}Q", self.raw, pos)
            t, off = struct.unpack_from("<IQ", self.raw, pos + 8 * n_dims)
            pos += 8 * n_dims + 12
            infos.append((name, dims, t, off))
        self.alignment = self._alignment()
        self.data_start = pos + (-pos) % self.alignment
        seen = set()
        for name, dims, t, off in infos:
            if name in seen:
                raise self._fail(f"tensor '{name}' appears twice")
            seen.add(name)
            self.tensors.append(self._tensor(name, dims, t, off))
        del self.raw[self.data_start:]  # only the header is kept

    def _alignment(self) -> int:
        f = self.fields.get("general.alignment")
        if f is None:
            return GGUF_DEFAULT_ALIGNMENT
        a = f.contents() if f.vtype == V.UINT32 else 0
        if a <= 0 or a & (a - 1):
            raise self._fail("general.alignment is not a power of two (a UINT32)")
        return a

    def _tensor(self, name: str, dims: tuple[int, ...], t: int, off: int) -> TensorEntry:
        try:
            ttype = T(t)
            block, size = GGML_QUANT_SIZES[ttype]
        except (ValueError, KeyError):
            raise self._fail(f"tensor '{name}' has an unknown ggml type {t}") from None
        if dims[0] % block:
            raise self._fail(f"tensor '{name}': rows of {dims[0]} values are not whole blocks of {block}, which "
                             f"{ttype.name} needs")
        n = size * (dims[0] // block)
        for d in dims[1:]:
            n *= d
        begin = self.data_start + off
        if begin + n > self.size:
            raise self._fail(f"tensor '{name}' ({n} bytes at byte {begin}) ends past the end of the file "
                             f"({self.size} bytes)")
        return TensorEntry(name, tuple(reversed(dims)), ttype, begin, n)


def parse(path) -> Header:
    """The header of the GGUF file `path` (opened as a SourceFile); ConvertError for anything damaged."""
    return Header(SourceFile(Path(path)))
