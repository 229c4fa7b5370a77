#!/usr/bin/env python3
"""The direct-copy reference of `make bench`: the bytes moved with reads and writes overlapped.

A reader thread reads every source in 16 MiB pieces into page-aligned buffers (four of them), a
writer thread writes each buffer out as soon as it is full, both with O_DIRECT (the page cache is
neither filled nor written back), so the disk reads and writes at once. Where a filesystem refuses
O_DIRECT (tmpfs, some network filesystems: the flag or a direct read or write fails with EINVAL),
that side goes on with plain reads or writes. A file's last piece that does not end on a 4 KiB
boundary is written plainly after its aligned part; so is everything after the first such boundary
when sources are joined (-o FILE with several sources: concat's reference), through a staging
buffer. Each output is fsynced at its end, as `sync` ends the cat reference.

    python bench/direct_copy.py -o DST SRC...     # SRC joined into the file DST
    python bench/direct_copy.py -d DIR SRC...     # each SRC copied to DIR/name
    python bench/direct_copy.py --null SRC...     # read only (verify's reference)
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import mmap
import os
import queue
import sys
import threading

PIECE = 16 << 20
BUFFERS = 4
ALIGN = 4096
DIRECT = getattr(os, "O_DIRECT", 0)


def open_direct(path: str, flags: int) -> tuple[int, bool]:
    """(fd, direct): O_DIRECT where the filesystem takes it."""
    if DIRECT:
        try:
            return os.open(path, flags | DIRECT, 0o644), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644), False


def plain(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~DIRECT)


def reader(sources: list[str], free: queue.Queue, full: queue.Queue) -> None:
    try:
        for i, src in enumerate(sources):
            fd, direct = open_direct(src, os.O_RDONLY)
            off = 0
            while True:
                buf = free.get()
                try:
                    n = os.preadv(fd, [buf], off)
                except OSError as e:
                    if not direct or e.errno != errno.EINVAL:
                        raise
                    plain(fd)
                    direct = False
                    n = os.preadv(fd, [buf], off)
                if n == 0:
                    free.put(buf)
                    break
                full.put((i, buf, n))
                off += n
            os.close(fd)
        full.put(None)
    except BaseException as e:  # handed to the writer, which raises it
        full.put(e)


class Out:
    """One output file, written at increasing offsets; direct while offsets and lengths stay aligned."""

    def __init__(self, path: str | None):
        self.fd, self.direct = open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if path else (-1, False)
        self.at = 0
        self.stage, self.fill = mmap.mmap(-1, PIECE), 0  # bytes waiting for an aligned write

    def _write(self, view, n: int) -> None:
        if self.direct and (n % ALIGN or self.at % ALIGN):
            plain(self.fd)
            self.direct = False
        try:
            done = os.pwritev(self.fd, [view[:n]], self.at)
        except OSError as e:
            if not self.direct or e.errno != errno.EINVAL:
                raise
            plain(self.fd)
            self.direct = False
            done = os.pwritev(self.fd, [view[:n]], self.at)
        if done != n:
            raise OSError(errno.EIO, f"short write ({done} of {n} bytes)")
        self.at += n

    def take(self, buf, n: int) -> None:
        if self.fd < 0:
            return
        view = memoryview(buf)
        if self.fill == 0 and n % ALIGN == 0:
            self._write(view, n)
            return
        while n:  # staged: a piece joined after an unaligned end
            k = min(n, PIECE - self.fill)
            self.stage[self.fill:self.fill + k] = view[:k]
            self.fill, view, n = self.fill + k, view[k:], n - k
            if self.fill == PIECE:
                self._write(memoryview(self.stage), PIECE)
                self.fill = 0

    def finish(self) -> None:
        if self.fd < 0:
            return
        if self.fill:
            aligned = self.fill // ALIGN * ALIGN
            if aligned:
                self._write(memoryview(self.stage), aligned)
            if self.fill > aligned:
                self._write(memoryview(self.stage)[aligned:], self.fill - aligned)
            self.fill = 0
        os.fsync(self.fd)
        os.close(self.fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("-o", dest="out", help="the file the sources are joined into")
    where.add_argument("-d", dest="dir", help="the directory each source is copied into")
    where.add_argument("--null", action="store_true", help="read only")
    ap.add_argument("sources", nargs="+")
    a = ap.parse_args()
    if a.dir:
        os.makedirs(a.dir, exist_ok=True)
    buffers = [mmap.mmap(-1, PIECE) for _ in range(BUFFERS)]
    free: queue.Queue = queue.Queue()
    full: queue.Queue = queue.Queue()
    for b in buffers:
        free.put(b)
    threading.Thread(target=reader, args=(a.sources, free, full), daemon=True).start()
    outs: dict[int, Out] = {}
    last = None
    while (item := full.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        i, buf, n = item
        key = i if a.dir else 0
        if key not in outs:
            if last is not None:
                outs[last].finish()
            outs[key] = Out(os.path.join(a.dir, os.path.basename(a.sources[i])) if a.dir else a.out)
            last = key
        outs[key].take(buf, n)
        free.put(buf)
    if last is not None:
        outs[last].finish()
    for i, src in enumerate(a.sources):  # an empty source still makes its (empty) copy
        if a.dir and i not in outs:
            open(os.path.join(a.dir, os.path.basename(src)), "wb").close()
    if a.out and not outs:
        open(a.out, "wb").close()


if __name__ == "__main__":
    sys.exit(main())
