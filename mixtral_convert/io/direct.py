"""Output files written front to back, by direct I/O where the filesystem takes it.

Every large file the tool writes (shards, the torrent file, safetensors and GGUF files, concat's
joined file) is written in order from its first byte to its last. `OutputFile` takes those bytes
in pieces of any size, copies them into a few page-aligned stage buffers, and a thread of its own
writes each full buffer with `O_DIRECT` at its (aligned) offset: the disk reads the bytes from the
buffer, and the kernel neither copies them into the page cache nor writes dirty pages back later.
Why (the system time a buffered write spends copying into fresh page-cache pages, with the
figures): docs/performance.md, "Direct I/O". The last, partial block is written after the flag is cleared (a plain write
may end anywhere).

Where the filesystem refuses direct I/O (the flag cannot be set, or a direct write fails with
EINVAL: some network and FUSE filesystems), the file is written by plain writes from then on,
the same bytes; a file in memory (tmpfs, ramfs) is written by plain writes (there direct I/O
would only add the stage copy), and `MIXTRAL_CONVERT_DIRECT_IO=0` asks for plain writes
throughout. A failed write (ENOSPC above all) is raised to the caller as the OSError it was, at its next write or at
`finish`, and the caller's atomic output cleans up as for any other failure.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
import threading
from typing import Any, Callable, Iterable, Optional, Sequence

from .pipeline import Worker
from .reads import direct_io_wanted

ALIGN = 4096  # offsets, lengths and buffer addresses of direct writes: a page, and every common block size
STAGE_BYTES = 8 << 20  # bytes per stage buffer (a multiple of ALIGN)
STAGES = 4  # buffers per file: one filling, the others being written
WRITERS = 2  # threads writing them: a direct write waits for the disk, so two keep it busy
_pwrite = os.pwrite  # every write of an output file; tests replace it to inject a failure


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; False where the filesystem refuses it."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | direct) if on else (flags & ~direct))
        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & direct) == on
    except OSError:
        return False


class OutputFile:
    """A new file (created or truncated) written front to back by `write`; `finish` writes what is
    still staged (and fsyncs when asked), `close` releases it. `pos`: the bytes taken so far."""

    def __init__(self, path, stage_bytes: Optional[int] = None, direct: Optional[bool] = None):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        self.pos = 0
        want = direct_io_wanted(self.fd) if direct is None else direct
        self.staged = want and _set_direct(self.fd, True)  # bytes go through the stage buffers
        self.direct = self.staged  # the writes are direct (until a direct write is refused)
        self._lock = threading.Lock()
        self._writers: list[Worker] = []
        if self.staged:
            size = max(ALIGN, (stage_bytes or STAGE_BYTES) // ALIGN * ALIGN)
            self._buffers = [mmap.mmap(-1, size) for _ in range(STAGES)]
            self._free: queue.Queue = queue.Queue()
            for b in self._buffers[1:]:
                self._free.put(b)
            self._cur, self._fill, self._at = self._buffers[0], 0, 0  # _at: file offset of _cur's first byte
            self._writers = [Worker(self._write_stage, "direct-write", done=self._free.put, maxsize=STAGES)
                             for _ in range(WRITERS)]
            self._turn = 0

    # ------------------------------------------------------------------ taking bytes
    def write(self, data) -> int:
        """Take every byte of `data` (any buffer); returns the count."""
        view = memoryview(data).cast("B")
        n = view.nbytes
        if not self.staged:
            write_at(self.fd, view, self.pos)
            self.pos += n
            return n
        done = 0
        while done < n:
            k = min(len(self._cur) - self._fill, n - done)
            self._cur[self._fill:self._fill + k] = view[done:done + k]
            self._fill += k
            done += k
            if self._fill == len(self._cur):
                self._hand_off()
                self._cur, self._fill = self._free.get(), 0  # a buffer the writer is done with
                self._raise_failure()
        self.pos += n
        return n

    def _hand_off(self) -> None:
        self._writers[self._turn].put((self._cur, self._fill, self._at), self._cur)
        self._turn = (self._turn + 1) % len(self._writers)
        self._at += self._fill

    def _raise_failure(self) -> None:
        for w in self._writers:
            if w.error is not None:
                raise w.error

    # ------------------------------------------------------------------ the writer's thread
    def _write_stage(self, item) -> None:
        buf, n, at = item
        with memoryview(buf) as whole:
            view = whole[:n]
            head = n - n % ALIGN if self.direct else 0  # the last buffer may end mid-block
            if head:
                self._pwrite(view[:head], at)
            if head < n:
                self._plain()
                write_at(self.fd, view[head:], at + head)
            view.release()

    def _pwrite(self, view, at: int) -> None:
        try:
            write_at(self.fd, view, at)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # The filesystem took the flag but not the write (or the other writer's refusal cleared
            # it meanwhile): plain writes from here, of the whole range again; one that fails is raised.
            self._plain()
            write_at(self.fd, view, at)

    def _plain(self) -> None:
        """Plain writes from here on. The flag is cleared before `direct` says so: a writer that
        reads `direct` false may write plainly at once."""
        with self._lock:
            if self.direct:
                _set_direct(self.fd, False)
                self.direct = False

    # ------------------------------------------------------------------ the end
    def finish(self, fsync: bool = False) -> int:
        """Write what is staged, wait for every write (raising a failed one), fsync when asked;
        returns the file's size."""
        if self.staged:
            for w in self._writers:
                w.wait()
            if self._fill:  # the last buffer, here: clearing O_DIRECT for its tail affects the whole file
                self._write_stage((self._cur, self._fill, self._at))
                self._at += self._fill
                self._fill = 0
        if fsync:
            os.fsync(self.fd)
        return self.pos

    def close(self) -> None:
        if self._writers:
            for w in self._writers:
                w.halt()  # after a failure, skip what is still queued
            for w in self._writers:
                w.close()
            self._writers = []
            for b in self._buffers:
                try:
                    b.close()
                except BufferError:  # a view still exported: the garbage collector frees it
                    pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "OutputFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_file(path, header: bytes, items: Sequence, produce: Callable[[Any], Iterable], fsync: bool = True,
               hasher=None, pad: Callable[[int], int] = lambda n: 0, stage_bytes: Optional[int] = None) -> int:
    """A file of `header`, then each item's bytes as `produce(item)` yields them (exactly `item.nbytes`,
    then `pad(item.nbytes)` zero bytes): the streaming writer of the safetensors and GGUF encodings.
    `hasher` (hashlib-like) sees every byte in order. Returns the file size. The bytes go to disk
    through an `OutputFile` (`stage_bytes`: its buffers' size)."""
    with OutputFile(path, stage_bytes) as out:
        def write(data) -> None:
            view = memoryview(data).cast("B")
            if hasher is not None:
                hasher.update(view)
            out.write(view)

        write(header)
        for item in items:
            start = out.pos
            for chunk in produce(item):
                write(chunk)
            if out.pos - start != item.nbytes:
                raise AssertionError(f"tensor {item.name}: produced {out.pos - start} bytes, expected {item.nbytes}")
            if pad(item.nbytes):
                write(b"\0" * pad(item.nbytes))
        return out.finish(fsync)


def write_at(fd: int, view, at: int) -> None:
    """Every byte of `view` at offset `at` (plain positioned writes, however short)."""
    view = memoryview(view).cast("B")
    done = 0
    while done < view.nbytes:
        try:
            done += _pwrite(fd, view[done:], at + done)
        except InterruptedError:
            continue
