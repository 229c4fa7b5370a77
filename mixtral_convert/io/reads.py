"""The one place where source bytes come off the disk: positioned reads of opened files.

A `SourceFile` is a file opened for reading once, with its identity (size, mtime_ns, inode,
device) recorded when it was opened. Every byte of a source (tensor data, headers, small
members of an archive) is read from it by `read_into` / `read`: `os.preadv` at a known offset
into a buffer the caller owns, never a page fault on a mapping. So a short read (the file was
truncated, or shrank while it was read) or an I/O error (EIO from a failing disk, a dropped
network or FUSE request) is one `ConvertError` naming the file, the offset and what to do,
instead of a SIGBUS that kills the process with no message.

`mark` / `opened_since(mark)` say which files a command opened, and `check_unchanged` compares
each one's identity now with the one recorded at opening: the commands call it right before an
output is renamed into place, so an output made from a source rewritten during the run is
never published. `identity_of(path)` gives the manifest what was checked.

Files are kept only as long as something refers to them (weak references): the descriptor is
closed when the last lazy tensor reading it is gone.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..errors import ConvertError

_preadv = os.preadv  # the read itself; tests replace it to inject a short read or an EIO
_WHAT_TO_DO = "the file is damaged or was changed while it was read: check the disk (dmesg), then re-download it"


@dataclass(frozen=True)
class Identity:
    """What a file is, for telling whether it changed: size, mtime_ns, inode and device."""

    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, st: os.stat_result) -> "Identity":
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)

    def as_dict(self) -> dict:
        return {"size": self.size, "mtime_ns": self.mtime_ns, "inode": self.inode}


class SourceChanged(ConvertError):
    """A source file whose size, mtime or inode is not what it was when it was opened."""


class SourceFile:
    """A source file opened for positioned reads, with its identity at opening."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise ConvertError(f"{self.path}: not found") from None
        except OSError as e:
            raise ConvertError(f"{self.path}: cannot read ({e.strerror or e})") from None
        self._closer = weakref.finalize(self, os.close, self.fd)
        self.identity = Identity.of(os.fstat(self.fd))
        self.size = self.identity.size
        _register(self)

    def read_into(self, offset: int, buf) -> None:
        """Fill `buf` (any writable buffer) with the bytes at `offset`, all of them, or raise the
        one-line error."""
        view = memoryview(buf).cast("B")
        want, done = view.nbytes, 0
        while done < want:
            try:
                n = _preadv(self.fd, [view[done:]], offset + done)
            except InterruptedError:
                continue
            except OSError as e:
                raise ConvertError(f"{self.path}: cannot read {want} bytes at offset {offset} "
                                   f"({e.strerror or errno.errorcode.get(e.errno, e)}); {_WHAT_TO_DO}") from None
            if n == 0:
                now = _size_now(self.fd)
                raise ConvertError(f"{self.path}: only {done} of {want} bytes could be read at offset {offset} "
                                   f"(the file has {now} bytes now, {self.size} when it was opened); "
                                   f"{_WHAT_TO_DO}")
            done += n

    def read_rows(self, offset: int, stride: int, out) -> None:
        """Row i of the 2-D byte array `out` (C-contiguous) from `offset + i * stride`: the rows
        of a narrow column band, one positioned read each, straight into place. A row that
        comes short or fails goes through `read_into` (which continues it, or raises)."""
        rows, width = out.shape
        view = memoryview(out).cast("B")
        fd, pread = self.fd, _preadv
        for i in range(rows):
            row = view[i * width:(i + 1) * width]
            try:
                n = pread(fd, [row], offset + i * stride)
            except OSError:
                n = 0
            if n != width:
                self.read_into(offset + i * stride + n, row[n:])

    def read(self, offset: int, n: int) -> bytes:
        """`n` bytes at `offset` (fewer only where the file ends first: for headers whose length
        the caller checks itself)."""
        n = max(0, min(n, self.size - offset))
        buf = bytearray(n)
        self.read_into(offset, buf)
        return bytes(buf)

    def advise(self, offset: int, n: int) -> None:
        """Ask the kernel to start reading [offset, offset + n) into the page cache now
        (asynchronously), so that the disk reads while the writer writes. Only a hint."""
        try:
            os.posix_fadvise(self.fd, offset, n, os.POSIX_FADV_WILLNEED)
        except (OSError, AttributeError):
            pass

    def changed(self) -> Optional[str]:
        """What differs from the identity recorded at opening ('' or None when nothing)."""
        try:
            now = Identity.of(os.stat(self.path))
        except OSError as e:
            return f"it cannot be found any more ({e.strerror})"
        old = self.identity
        if (now.inode, now.device) != (old.inode, old.device):
            return "it was replaced by another file (its inode changed)"
        if now.size != old.size:
            return f"its size changed from {old.size} to {now.size} bytes"
        if now.mtime_ns != old.mtime_ns:
            return "it was modified (its mtime changed)"
        return None


def _size_now(fd: int) -> object:
    try:
        return os.fstat(fd).st_size
    except OSError:
        return "?"


# ----------------------------------------------------------------------------- which files a command read
_lock = threading.Lock()
_seq = itertools.count()
_opened: "weakref.WeakValueDictionary[int, SourceFile]" = weakref.WeakValueDictionary()


def _register(f: SourceFile) -> None:
    with _lock:
        f.seq = next(_seq)
        _opened[f.seq] = f


def mark() -> int:
    """A point in time: `opened_since(mark())` lists the files opened after it."""
    with _lock:
        return next(_seq)


def opened_since(since: int) -> list[SourceFile]:
    """The source files opened after `since` and still in use, in the order they were opened."""
    with _lock:
        return [f for seq, f in sorted(_opened.items()) if seq > since]


def check_unchanged(files: Iterable[SourceFile], what: str = "the output") -> None:
    """Refuse (SourceChanged) when any of `files` is not the file it was when it was opened."""
    for f in files:
        why = f.changed()
        if why:
            done = "nothing was written" if what == "the output" else "nothing was proved"
            raise SourceChanged(f"{f.path}: the source changed while it was read ({why}); {what} would mix old "
                                f"and new bytes, so {done}: wait until the file is complete, then run again")


def identity_of(path: Path) -> Optional[Identity]:
    """The identity recorded when `path` was opened by this process (the most recent opening
    still in use), or None when it was not."""
    try:
        key = os.path.realpath(path)
    except OSError:
        return None
    with _lock:
        found = [f for _, f in sorted(_opened.items()) if os.path.realpath(f.path) == key]
    return found[-1].identity if found else None


# ----------------------------------------------------------------------------- tensors
def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def span(shape: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """Elements from a view's first element to its last, inclusive (0 when it is empty)."""
    if any(n == 0 for n in shape):
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))


NARROW = 4  # a region whose span is over NARROW times its bytes is read row by row


def read_view(f: SourceFile, offset: int, shape: tuple[int, ...], strides: tuple[int, ...], dtype) -> torch.Tensor:
    """The tensor of `shape` and element `strides` whose first element is at byte `offset` of
    `f`, read into fresh memory (torch.empty: not zeroed; glibc reuses freed blocks, see
    prefetch.reuse_freed_blocks). Usually one positioned read of the bytes it spans, viewed
    with its strides; a narrow band of long rows (a rank's columns) is read row by row straight
    into a contiguous result instead, so that the columns other ranks hold are not copied."""
    item = dtype.itemsize
    n = span(shape, strides)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    count = 1
    for s in shape:
        count *= s
    if len(shape) >= 2 and shape[0] > 1 and n > NARROW * count and \
            tuple(strides[1:]) == contiguous_strides(tuple(shape[1:])):
        out = torch.empty(shape, dtype=dtype)
        f.read_rows(offset, strides[0] * item, out.view(shape[0], -1).view(torch.uint8).numpy())
        return out
    buf = torch.empty(n * item, dtype=torch.uint8)
    f.read_into(offset, buf.numpy())
    return buf.view(dtype).as_strided(shape, strides)
