"""The structure of a torch zip checkpoint, checked without reading tensor data.

Damaged downloads (bit flips, overwritten bytes, truncation) must end in one line naming the
file, never in a traceback from zipfile or torch, and never in a tensor that views bytes the
file does not hold there. `zip_layout` checks every record: its local header where the zip's
directory says and with the same name, stored (not compressed), inside the file and ending
where its data descriptor (or its local header) says, no two records overlapping; and the
CRC-32 of data.pkl and of the other small records (byteorder, version, ...), so a damaged
pickle is refused rather than misread. `check_storages` then checks that every storage
data.pkl names has a record holding the bytes its tensors need, so no tensor is read past
its record (or past the end of a truncated file).

Used by `torchzip.read_tensors` before it hands out views, and by `torchzip.check_checkpoint`
(concat's check of a joined file). Every failure is a `DamagedZip` (a ConvertError) whose
`why` says where the damage is.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import torch

from ..errors import ConvertError

_U32 = 0xFFFFFFFF  # the "see zip64 extra" sentinel


class DamagedZip(ConvertError):
    """A torch zip checkpoint whose records do not hold together; `why` says where."""

    def __init__(self, path: Path, why: str):
        why = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in why)  # damage can put anything in a name
        super().__init__(f"{path}: not a loadable torch checkpoint ({why}); the file is damaged or "
                         "truncated: re-download it")
        self.why = why


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


@dataclass(frozen=True)
class Record:
    name: str
    data_offset: int  # where the record's bytes start in the file
    size: int
    crc: int


@dataclass(frozen=True)
class Layout:
    """A torch zip checkpoint's records (checked), the name prefix of its records and its data.pkl."""

    records: dict[str, Record]
    prefix: str
    pkl: bytes


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[tuple[zipfile.ZipFile, BinaryIO]]:
    """The file and its zip directory. Failing to open the file is "cannot read"; anything the
    zip parser raises after that (BadZipFile, a seek to an impossible offset, ...) is damage."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e.strerror or first_line(e)})") from None
    with f:
        try:
            zf = zipfile.ZipFile(f)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: a seek to an offset the damaged directory made up
                raise ConvertError(f"{path}: cannot read ({e.strerror or first_line(e)})") from None
            raise DamagedZip(path, f"its zip directory is damaged: {first_line(e)}") from None
        except Exception as e:  # BadZipFile, and what else a damaged directory makes zipfile raise
            why = (f"no zip end record: {e}" if "not a zip file" in str(e) else
                   f"its zip directory is damaged: {type(e).__name__}: {first_line(e)}")
            raise DamagedZip(path, why) from None
        with zf:
            yield zf, f


def is_zip(path: Path) -> bool:
    """zipfile.is_zipfile, except that a damaged zip64 end record is damage, not an exception
    of its own (is_zipfile lets BadZipFile "span multiple disks" and ValueError through)."""
    try:
        return zipfile.is_zipfile(path)
    except Exception as e:
        raise DamagedZip(path, f"its zip end record is damaged: {type(e).__name__}: {first_line(e)}") from None


def _descriptor_matches(d: bytes, info: zipfile.ZipInfo) -> bool:
    """Whether `d` is a data descriptor for `info` (32- or 64-bit sizes). Its signature is optional
    in the zip spec, but torch's writer (miniz), Python's zipfile and this tool all write it, and
    without it a local header whose extra length grew by 4 would still find "a" descriptor."""
    want = (info.CRC, info.compress_size, info.file_size)
    return d[:4] == b"PK\x07\x08" and any(
        len(d) >= 4 + struct.calcsize(fmt) and struct.unpack_from(fmt, d, 4) == want for fmt in ("<III", "<IQQ"))


def _checked_records(path: Path, zf: zipfile.ZipFile, f) -> dict[str, Record]:
    """Every record of the zip, each checked: a local header where the directory says, with the
    same name, stored, lying inside the file and ending where its data descriptor (or its
    local header) says, no two records overlapping. What torch would map is then what it reads."""
    size = os.fstat(f.fileno()).st_size
    infos = zf.infolist()
    if not infos:
        raise DamagedZip(path, "the zip is empty")
    shift = min(i.header_offset for i in infos)  # zipfile moves offsets by what is missing
    if shift != 0:
        raise DamagedZip(path, f"{-shift} bytes missing before the zip's directory" if shift < 0
                         else f"{shift} extra bytes before the zip's directory")
    records: dict[str, Record] = {}
    spans = []
    for info in infos:
        name, off = info.filename, info.header_offset
        if name in records:
            raise DamagedZip(path, f"record {name} is listed twice")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1 or info.compress_size != info.file_size:
            raise DamagedZip(path, f"record {name} is compressed or encrypted, which torch never writes")
        head = b""
        if 0 <= off <= size - 30:
            f.seek(off)
            head = f.read(30)
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            raise DamagedZip(path, f"no local header for {name} at {off}")
        flag, crc, csize, usize, nlen, xlen = struct.unpack("<6xH6xIIIHH", head)
        if f.read(nlen) != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
            raise DamagedZip(path, f"local header at {off} is not {name}")
        data = off + 30 + nlen + xlen
        end = data + info.file_size
        if end > size:
            raise DamagedZip(path, f"record {name} runs past the end of the file")
        if flag & 8:
            f.seek(end)
            ok = _descriptor_matches(f.read(24), info)
        else:
            ok = crc == info.CRC and (csize, usize) in ((info.compress_size, info.file_size), (_U32, _U32))
        if not ok:
            raise DamagedZip(path, f"record {name} does not end where the zip's directory says")
        records[name] = Record(name, data, info.file_size, info.CRC)
        spans.append((off, end, name))
    spans.sort()
    following = spans[1:] + [(getattr(zf, "start_dir", size), 0, "")]  # the directory comes after the last
    for (_, end, name), (nxt, _, other) in zip(spans, following, strict=True):
        if end > nxt:
            raise DamagedZip(path, f"record {name} overlaps {other or 'the zip directory'}")
    return records


def zip_records(path: Path) -> list[Record]:
    """The records of a zip file with the byte offset of their data, checked as `zip_layout` does."""
    with _opened(path) as (zf, f):
        return list(_checked_records(path, zf, f).values())


_STORAGE = re.compile(r"data/\d+\Z")
SMALL_RECORD = 64 << 20  # records other than storages up to this size have their CRC-32 checked


def zip_layout(path: Path) -> Layout:
    """Check a torch zip checkpoint's structure without reading tensor data: the records
    (`_checked_records`), and the CRC-32 of data.pkl and of every other small record that is
    not a storage (so a damaged pickle or byteorder is refused, not misread). Raises ConvertError."""
    with _opened(path) as (zf, f):
        records = _checked_records(path, zf, f)
        prefix = next((n[: -len("data.pkl")] for n in records if n.endswith("/data.pkl")), None)
        if prefix is None:
            raise DamagedZip(path, "no data.pkl record")
        pkl = b""
        for name, rec in records.items():
            storage = name.startswith(prefix) and _STORAGE.match(name[len(prefix):])
            if storage or (rec.size > SMALL_RECORD and name != prefix + "data.pkl"):
                continue
            try:
                content = zf.read(name)
            except Exception as e:  # a bad CRC-32, or what else zipfile makes of damage
                raise DamagedZip(path, f"record {name}: {first_line(e)}") from None
            if name == prefix + "data.pkl":
                pkl = content
            elif name == prefix + "byteorder" and content not in (b"little", b"big"):
                raise DamagedZip(path, f"record {name} holds {content[:16]!r}, not little or big")
    return Layout(records, prefix, pkl)


def check_storages(path: Path, layout: Layout) -> dict[str, int]:
    """Every storage data.pkl names has its record, holding at least the bytes its tensors need."""
    return _checked_needs(path, layout, _unpickle_meta(path, layout.pkl)[1])


def _checked_needs(path: Path, layout: Layout, needs: dict[str, int]) -> dict[str, int]:
    for key, nbytes in needs.items():
        name = f"{layout.prefix}data/{key}"
        if name not in layout.records:
            raise DamagedZip(path, f"record {name} is missing")
        if layout.records[name].size < nbytes:
            raise DamagedZip(path, f"record {name} has {layout.records[name].size} bytes, its tensors need {nbytes}")
    return needs


class Refused(ConvertError):
    """data.pkl names an object other than tensors (the weights-only unpickler refused it)."""


def meta_tensors(path: Path, layout: Layout) -> tuple[object, dict[int, Record]]:
    """data.pkl unpickled by torch's weights-only unpickler (no arbitrary code runs) with every
    storage stood in for by a 'meta' storage of the right size, so that no tensor data is read:
    (the object, {id of a tensor's storage: the record holding its bytes}). Each record is checked
    to hold its storage's bytes (`check_storages`)."""
    obj, needs, keys = _unpickle_meta(path, layout.pkl, refuse=True)
    _checked_needs(path, layout, needs)
    return obj, {cdata: layout.records[f"{layout.prefix}data/{key}"] for cdata, key in keys.items()}


def _unpickle_meta(path: Path, pkl: bytes, refuse: bool = False):
    """(object, bytes each storage record must hold, {storage id: key}) of data.pkl, storages
    stood in for by 'meta' storages of the right size."""
    from torch import _weights_only_unpickler

    needs: dict[str, int] = {}
    keys: dict[int, str] = {}
    alive = []  # the stand-ins stay alive while their ids are in use

    def persistent_load(saved_id):
        _, storage_type, key, _location, numel = saved_id
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        nbytes = numel * torch._utils._element_size(dtype)
        needs[key] = max(needs.get(key, 0), nbytes)
        untyped = torch.UntypedStorage(nbytes, device="meta")
        alive.append(untyped)
        keys[untyped._cdata] = key
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

    try:
        up = _weights_only_unpickler.Unpickler(io.BytesIO(pkl), encoding="utf-8")
        up.persistent_load = persistent_load
        obj = up.load()
    except Exception as e:
        if refuse and isinstance(e, pickle.UnpicklingError) and re.search(r"[Uu]nsupported|not an allowed", str(e)):
            m = re.search(r"(?:unsupported|Unsupported) (?:global|GLOBAL|operand) ?:? ?(?:GLOBAL )?([\w.]+)", str(e))
            first = (f"it would call {m.group(1)}" if m and "." in m.group(1) else
                     next((ln for ln in str(e).splitlines() if ln.strip()), "not allowed by weights_only"))
            raise Refused(f"{path}: refused to load: it holds objects other than tensors ({first[:160]}); only "
                          "plain tensor checkpoints are accepted") from None
        raise DamagedZip(path, f"data.pkl does not unpickle: {first_line(e)}") from None
    return obj, needs, keys
