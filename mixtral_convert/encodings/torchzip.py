"""Reading and writing torch's zip checkpoint format without holding tensors in memory.

Reading: `read_tensors` describes every tensor (its record's offset, shape, dtype, strides)
from data.pkl, unpickled by torch's weights-only unpickler with stand-in storages: nothing but
tensors is ever unpickled, and no tensor byte is read until a block is asked for, then by a
positioned read (`io.reads`). The zip's structure and every storage's record are checked first
(`zipcheck`), so a damaged file is one ConvertError, never a traceback or a read of bytes the
file does not hold there. `check_checkpoint` (concat's check of a joined file) adds a full
torch.load (mmap=True, which reads no tensor data).

Writing: `write_checkpoint` streams a `{name: tensor}` file record by record. The small
`data.pkl` (the dict of tensor descriptions) is pickled from stubs that reduce exactly as
torch's own pickler reduces a tensor (`torch._utils._rebuild_tensor_v2` over a persistent
storage id), so `torch.load(..., weights_only=True)` reads it. Each tensor's bytes then come
from a producer in bounded blocks and go to disk at once; the CRC-32 of every record is
computed on the way, data is 64-byte aligned like torch's own writer, and zip64 records are
used where sizes or offsets pass 4 GiB.
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import struct
import zlib

try:  # ISA-L's CRC-32: zlib's polynomial, several times faster (docs/performance.md)
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal is a dependency; plain zlib is the same result
    _crc32 = zlib.crc32
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..errors import ConvertError
from ..io.direct import OutputFile
from ..io.lazy import OnDisk, TensorSpec
from ..io.pipeline import Worker
from ..io.reads import SourceFile, span
from .zipcheck import DamagedZip, Record, check_storages, first_line, is_zip, meta_tensors, zip_layout, zip_records  # noqa: F401

# (Record and zip_records are re-exported: verify's tests and concat import them from here)

ALIGN = 64
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01
_U32 = 0xFFFFFFFF  # the "see zip64 extra" sentinel
ZIP64_LIMIT = _U32  # sizes/offsets at or past this use zip64 records (tests lower it)


# ----------------------------------------------------------------------------- reading
def read_tensors(path: Path) -> dict[str, OnDisk]:
    """Every tensor of a torch zip checkpoint as a description of where its bytes lie (record
    offset, shape, dtype, strides), read later by positioned reads; refuses anything else. The
    zip's structure is checked first (`zip_layout`), then data.pkl is unpickled by the
    weights-only unpickler with stand-in storages (no tensor data is read), and every tensor
    must lie inside its record: damage is a one-line ConvertError, never a read of bytes the
    file does not hold there."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: not found")
    if not is_zip(path):
        raise ConvertError(f"{path}: not a torch zip checkpoint (no zip end record: truncated, "
                           "or saved in torch's legacy format); re-download it or re-save it with torch.save")
    src = SourceFile(path)  # its identity is recorded before anything of it is read
    layout = zip_layout(path)
    obj, records = meta_tensors(path, layout)
    order = layout.records.get(layout.prefix + "byteorder")
    if order is not None and src.read(order.data_offset, order.size) == b"big":
        raise ConvertError(f"{path}: saved on a big-endian machine; re-save it with torch.save on a little-endian one")
    if isinstance(obj, dict) and set(obj) == {"model"} and isinstance(obj["model"], dict):
        obj = obj["model"]  # Accessory also writes {"model": state_dict}
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    out: dict[str, OnDisk] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ConvertError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor; "
                               "expected a flat dict of tensors")
        rec = records[v.untyped_storage()._cdata]
        start = v.storage_offset() * v.element_size()
        if start + span(tuple(v.shape), v.stride()) * v.element_size() > rec.size:
            raise DamagedZip(path, f"tensor {k!r} reaches past the end of its record {rec.name}")
        out[k] = OnDisk(src, rec.data_offset + start, tuple(v.shape), v.dtype, v.stride(), k)
    return out


# ----------------------------------------------------------------------------- checking a whole file
def check_checkpoint(path: Path) -> tuple[int, int]:
    """Check `path` is a torch zip checkpoint holding a dict of tensors: its structure
    (`zip_layout`), every `data/N` record present with the bytes its storage needs, and
    `torch.load(mmap, weights_only)` succeeding. Returns (tensors, data records). Raises ConvertError."""
    layout = zip_layout(path)
    needs = check_storages(path, layout)
    try:
        state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:  # any failure means "not loadable"
        raise DamagedZip(path, f"torch.load failed: {first_line(e)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DamagedZip(path, "it does not hold a dict of tensors")
    n = len(state)
    del state
    return n, len(needs)


# ----------------------------------------------------------------------------- writing
def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


class _StorageStub:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorStub:
    """Pickles as torch pickles a contiguous tensor that owns its storage."""

    def __init__(self, storage: _StorageStub, shape: tuple[int, ...]):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce__(self):
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= s
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, tuple(reversed(stride)), False, collections.OrderedDict()))


def _storage_type(dtype: torch.dtype):
    name = torch.storage._dtype_to_storage_type_map()[dtype]
    return getattr(torch, name)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageStub):
            return ("storage", _storage_type(obj.dtype), obj.key, "cpu", obj.numel)
        return None


def checkpoint_pickle(specs: list[TensorSpec]) -> bytes:
    """data.pkl for a flat {name: tensor} dict, storages keyed '0', '1', ... in order."""
    obj = {}
    for i, s in enumerate(specs):
        numel = s.nbytes // _itemsize(s.dtype)
        obj[s.name] = _TensorStub(_StorageStub(str(i), s.dtype, numel), s.shape)
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


class _Checksums:
    """The current record's CRC-32 and an optional whole-file hash, each on its own thread."""

    def __init__(self, hasher=None):
        self.crc = 0
        self._crc = Worker(self._update_crc, "zip-crc", maxsize=4)  # slack: the hashers lag the writer in bursts
        self._file = Worker(hasher.update, "zip-hash", maxsize=4) if hasher is not None else None

    def _update_crc(self, view) -> None:
        self.crc = _crc32(view, self.crc)

    def feed(self, view, is_data: bool) -> None:
        if is_data:
            self._crc.put(view)
        if self._file is not None:
            self._file.put(view)

    def take_crc(self) -> int:
        self._crc.wait()
        crc, self.crc = self.crc, 0
        return crc

    def finish(self) -> None:
        self.take_crc()
        if self._file is not None:
            self._file.wait()

    def close(self) -> None:
        for d in (self._crc, self._file):
            if d is not None:
                d.close()


class _ZipWriter:
    """Sequential writer of a stored (uncompressed) zip with aligned data and zip64 support."""

    def __init__(self, out: OutputFile, prefix: str, hasher=None):
        self.out, self.prefix, self.pos = out, prefix, 0
        self.sums = _Checksums(hasher)
        self.central: list[bytes] = []
        self.crcs: list[int] = []

    def _write(self, data, is_data: bool = False) -> None:
        view = memoryview(data).cast("B")
        self.sums.feed(view, is_data)
        self.pos += self.out.write(view)

    def record(self, name: str, size: int, chunks: Iterable) -> None:
        """One stored record. The CRC-32 follows the data in a data descriptor (flag bit 3),
        so the file is written strictly in order and can be hashed as it streams."""
        fname = (self.prefix + name).encode()
        offset = self.pos
        zip64 = size >= ZIP64_LIMIT
        extra = struct.pack("<HHQQ", 1, 16, 0, 0) if zip64 else b""
        base = 30 + len(fname) + len(extra)
        pad = (-(offset + base + 4)) % ALIGN
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        small = _U32 if zip64 else 0
        version = 45 if zip64 else 20
        self._write(struct.pack("<IHHHHHIIIHH", 0x04034B50, version, 0x08, 0, 0, _DOS_DATE, 0,
                                small, small, len(fname), len(extra)) + fname + extra)
        written = self._data(chunks, size)
        crc = self.sums.take_crc()
        self.crcs.append(crc)
        if written != size:
            raise AssertionError(f"record {name}: produced {written} bytes, expected {size}")
        if zip64:
            self._write(struct.pack("<IIQQ", 0x08074B50, crc, size, size))
        else:
            self._write(struct.pack("<IIII", 0x08074B50, crc, size, size))
        cextra_vals = []
        csize = size
        if zip64:
            cextra_vals += [size, size]
            csize = _U32
        coff = offset
        if offset >= ZIP64_LIMIT:
            cextra_vals.append(offset)
            coff = _U32
        cextra = (struct.pack("<HH", 1, 8 * len(cextra_vals)) + struct.pack(f"<{len(cextra_vals)}Q", *cextra_vals)
                  if cextra_vals else b"")
        self.central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, version, 0x08, 0, 0, _DOS_DATE,
                                        crc, csize, csize, len(fname), len(cextra), 0, 0, 0, 0, coff)
                            + fname + cextra)

    def _data(self, chunks: Iterable, size: int) -> int:
        written = 0
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            written += view.nbytes
            self._write(view, is_data=True)
        return written

    def finish(self) -> None:
        cd_offset = self.pos
        for entry in self.central:
            self._write(entry)
        cd_size = self.pos - cd_offset
        n = len(self.central)
        if n >= 0xFFFF or cd_offset >= ZIP64_LIMIT or cd_size >= ZIP64_LIMIT:
            eocd64 = self.pos
            self._write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_size, cd_offset))
            self._write(struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1))
            self._write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, _U32, _U32, 0))
        else:
            self._write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, cd_size, cd_offset, 0))


def write_checkpoint(path: Path, specs: list[TensorSpec], produce: Callable[[TensorSpec], Iterator],
                     fsync: bool = False, hasher=None, stage_bytes=None) -> int:
    """Write a torch zip checkpoint of `specs`; `produce(spec)` yields the tensor's bytes in order.
    `hasher` (hashlib-like) sees every byte of the file in order. Returns the file size.
    Not fsynced unless asked: callers flush all their files once, at the end (`fsync_all`).
    `stage_bytes`: the size of the file's stage buffers (`io.direct`)."""
    with OutputFile(path, stage_bytes) as out:
        zw = _ZipWriter(out, "archive/", hasher)
        try:
            _records(zw, specs, produce)
            zw.sums.finish()  # every byte hashed
            out.finish(fsync)
            return zw.pos
        finally:
            zw.sums.close()


def _records(zw: _ZipWriter, specs: list[TensorSpec], produce: Callable[[TensorSpec], Iterator]) -> None:
    """Every record of a checkpoint of `specs`, in the order torch writes them, and the directory."""
    pkl = checkpoint_pickle(specs)
    zw.record("data.pkl", len(pkl), [pkl])
    zw.record(".format_version", 1, [b"1"])
    zw.record(".storage_alignment", 2, [b"64"])
    zw.record("byteorder", 6, [b"little"])
    for i, spec in enumerate(specs):
        zw.record(f"data/{i}", spec.nbytes, produce(spec))
    zw.record("version", 2, [b"3\n"])
    # torch writes a random id; ours derives from the content, so that the same tensors always
    # give the same file, byte for byte (parallel and repeated runs compare equal)
    sid = hashlib.sha1(pkl + b"".join(struct.pack("<I", c) for c in zw.crcs)).hexdigest().encode()[:20]
    zw.record(".data/serialization_id", len(sid), [sid])
    zw.finish()


class _NoSums:
    def take_crc(self) -> int:
        return 0


class _Sizer(_ZipWriter):
    """The writer's layout without a file, data or checksums: only the positions."""

    def __init__(self, prefix: str):  # not super().__init__: that starts the checksum threads
        self.out, self.prefix, self.pos, self.sums = None, prefix, 0, _NoSums()
        self.central, self.crcs = [], []

    def _write(self, data, is_data: bool = False) -> None:
        self.pos += memoryview(data).nbytes

    def _data(self, chunks: Iterable, size: int) -> int:
        self.pos += size
        return size


def checkpoint_size(specs: list[TensorSpec]) -> int:
    """The exact size of the file `write_checkpoint` writes for `specs`, without writing it."""
    zw = _Sizer("archive/")
    _records(zw, specs, lambda spec: ())
    return zw.pos
