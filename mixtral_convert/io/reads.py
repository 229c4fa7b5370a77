"""The one place where source bytes come off the disk: positioned reads of opened files.

A `SourceFile` is a file opened for reading once, with its identity (size, mtime_ns, inode,
device) recorded when it was opened. Every byte of a source (tensor data, headers, small
members of an archive) is read from it by `read_into` / `read`: `os.preadv` at a known offset
into a buffer the caller owns, never a page fault on a mapping. So a short read (the file was
truncated, or shrank while it was read) or an I/O error (EIO from a failing disk, a dropped
network or FUSE request) is one `ConvertError` naming the file, the offset and what to do,
instead of a SIGBUS that kills the process with no message.

A reader records the files it opened on the `Checkpoint` it returns (`Checkpoint.sources`), and
`check_unchanged` compares each one's identity now with the one recorded at opening: the
commands call it right before an output is renamed into place, so an output made from a source
rewritten during the run is never published.

Files are kept only as long as something refers to them (weak references): the descriptor is
closed when the last lazy tensor reading it is gone.

Blocks of a megabyte and more are read into reused buffers (`io.buffers`), and contiguous
ranges read once by direct I/O (`read_direct`), past the page cache.
"""

from __future__ import annotations

import errno
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..errors import ConvertError
from .buffers import empty, from_pool

_preadv = os.preadv  # the read itself; tests replace it to inject a short read or an EIO
ALIGN = 4096  # offsets and lengths of direct reads: a page, and every common block size
ADVISE_BYTES = 2 << 20  # read-ahead requests, each within the kernel's window
DIRECT_MIN = 1 << 20  # contiguous ranges of at least this many bytes are read by direct I/O


_IN_MEMORY = {0x01021994, 0x858458F6}  # statfs f_type of tmpfs and ramfs


def direct_io_wanted(fd: Optional[int] = None) -> bool:
    """Direct I/O (reads of ranges read once, and writes: io.direct) unless
    MIXTRAL_CONVERT_DIRECT_IO=0 asks for the page cache throughout, or the file `fd` lies in
    memory (tmpfs, ramfs): there the page cache is the file, and direct I/O is one more copy."""
    if os.environ.get("MIXTRAL_CONVERT_DIRECT_IO", "1") == "0":
        return False
    return fd is None or _fs_type(fd) not in _IN_MEMORY


def _fs_type(fd: int) -> Optional[int]:
    """The filesystem's magic number (statfs f_type, the struct's first field), None when unknown."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(256)  # larger than struct statfs on every Linux ABI
        if libc.fstatfs(fd, buf) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


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
        self._direct: Optional[int] = None if direct_io_wanted(self.fd) else -1  # O_DIRECT descriptor, on demand

    def _direct_fd(self) -> int:
        """A second descriptor of the same file with O_DIRECT (-1 where the filesystem refuses
        it): reopened through /proc/self/fd, so that it is the file opened, whatever the path
        names now."""
        if self._direct is None:
            self._direct = -1
            flag = getattr(os, "O_DIRECT", 0)
            if flag:
                try:
                    fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | flag | getattr(os, "O_CLOEXEC", 0))
                except OSError:
                    return -1
                st = os.fstat(fd)
                if (st.st_ino, st.st_dev) != (self.identity.inode, self.identity.device):
                    os.close(fd)
                    return -1
                weakref.finalize(self, os.close, fd)
                self._direct = fd
        return self._direct

    @property
    def direct(self) -> bool:
        """Whether ranges read once are read by direct I/O from this file."""
        return self._direct_fd() >= 0

    def read_direct(self, offset: int, n: int) -> Optional[torch.Tensor]:
        """The `n` bytes at `offset` (a uint8 tensor in a reused buffer), read by direct I/O:
        from the disk into the buffer, without a copy through the page cache. For ranges read
        once (a rank's rows, a whole expert); None where direct I/O is not available, and the
        caller reads through the page cache instead."""
        fd = self._direct_fd()
        if fd < 0:
            return None
        a0 = offset - offset % ALIGN
        a1 = min(-(-(offset + n) // ALIGN) * ALIGN, -(-self.size // ALIGN) * ALIGN)
        buf = from_pool(a1 - a0)  # page-aligned, as direct I/O needs, whatever its size
        view = memoryview(buf.numpy())
        need, done = offset + n - a0, 0
        while done < need:
            try:
                got = _preadv(fd, [view[done:]], a0 + done)
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.EINVAL and done == 0:  # the filesystem takes the flag but not the read
                    self._direct = -1
                    return None
                raise self._failed(n, offset, e) from None
            if got == 0 or (got % ALIGN and done + got < need):
                break  # the end of the file, or a short direct read: read_into says which, or continues
            done += got
        head = offset - a0
        out = buf[head:head + n]
        if done < need:
            have = max(0, done - head)
            self.read_into(offset + have, out.numpy()[have:])
        return out

    def _failed(self, n: int, offset: int, e: OSError) -> ConvertError:
        return ConvertError(f"{self.path}: cannot read {n} bytes at offset {offset} "
                            f"({e.strerror or errno.errorcode.get(e.errno, e)}); {_WHAT_TO_DO}")

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
                raise self._failed(want, offset, e) from None
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
        (asynchronously), so that the disk reads while the writer writes. Only a hint. Asked in
        pieces: the kernel reads ahead at most its read-ahead window per request, and a range
        left to faults would be read a page at a time (a rank's band of columns takes a few
        bytes of every row)."""
        end = min(offset + n, self.size)
        try:
            for at in range(offset, end, ADVISE_BYTES):
                os.posix_fadvise(self.fd, at, min(ADVISE_BYTES, end - at), os.POSIX_FADV_WILLNEED)
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


# ----------------------------------------------------------------------------- whether a source changed
def check_unchanged(files: Iterable[SourceFile], what: str = "the output") -> None:
    """Refuse (SourceChanged) when any of `files` is not the file it was when it was opened."""
    for f in files:
        why = f.changed()
        if why:
            done = "nothing was written" if what == "the output" else "nothing was proved"
            raise SourceChanged(f"{f.path}: the source changed while it was read ({why}); {what} would mix old "
                                f"and new bytes, so {done}: wait until the file is complete, then run again")


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


def reads_direct(shape: tuple[int, ...], strides: tuple[int, ...], item: int) -> bool:
    """Whether `read_view` reads this region by direct I/O (where the file allows it): a contiguous
    range of DIRECT_MIN bytes or more, which no other part of a conversion reads again. Bands of
    columns (read row by row, or shared by the ranks) go through the page cache."""
    count = 1
    for n in shape:
        count *= n
    return count * item >= DIRECT_MIN and tuple(strides) == contiguous_strides(tuple(shape))


NARROW = 4  # a region whose span is over NARROW times its bytes is read row by row


def read_view(f: SourceFile, offset: int, shape: tuple[int, ...], strides: tuple[int, ...], dtype) -> torch.Tensor:
    """The tensor of `shape` and element `strides` whose first element is at byte `offset` of
    `f`, read into fresh memory (torch.empty: not zeroed; glibc reuses freed blocks, see
    prefetch.reuse_freed_blocks). Usually one positioned read of the bytes it spans, viewed
    with its strides; a narrow band of long rows (a rank's columns) is read row by row straight
    into a contiguous result instead, so that the columns other ranks hold are not copied.
    The memory comes from `empty` (reused buffers)."""
    item = dtype.itemsize
    n = span(shape, strides)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    count = 1
    for s in shape:
        count *= s
    if len(shape) >= 2 and shape[0] > 1 and n > NARROW * count and \
            tuple(strides[1:]) == contiguous_strides(tuple(shape[1:])):
        out = empty(shape, dtype)
        f.read_rows(offset, strides[0] * item, out.view(shape[0], -1).view(torch.uint8).numpy())
        return out
    if reads_direct(shape, strides, item):
        got = f.read_direct(offset, n * item)
        if got is not None:
            return got.view(dtype).view(shape)
    buf = empty((n * item,), torch.uint8)
    f.read_into(offset, buf.numpy())
    return buf.view(dtype).as_strided(shape, strides)
