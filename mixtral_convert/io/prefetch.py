"""Getting bytes off the disk ahead of the writer: kernel read-ahead of source ranges, and
blocks produced on a second thread.

- `warm`: ask the kernel (posix_fadvise WILLNEED) to start reading the file range behind every
  source region of a lazy tensor, so that the disk reads while the writer writes.
- `prefetched`: the same iterator, produced up to `depth` items ahead by a worker thread that is
  always joined, whatever way the consumer leaves.
- `file_producer` / `stream`: the block sources the writers consume (one worker per output
  file, the next tensor's source warmed while this one is written).
- `reuse_freed_blocks`: a malloc setting the CLI applies once at start-up (never at import).
"""

from __future__ import annotations

import ctypes
import queue
import sys
import threading
from contextlib import closing, contextmanager
from typing import Callable, Iterator, Optional, Sequence

from .lazy import BLOCK_BYTES, Assembled, Cast, Lazy, OnDisk, Region, TensorSpec, tensor_bytes
from .progress import Progress

_libc = None


def _lib():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6", use_errno=True)
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def reuse_freed_blocks() -> None:
    """Let glibc keep freed block-sized buffers for reuse instead of returning them to the OS:
    a fresh buffer costs a page fault (and the kernel's zeroing) per 4 KiB on first touch, which
    slows every read and copy (docs/performance.md), in one heap for all threads; the heap is
    not trimmed below 64 MiB of free space (freed heap counts as the process's anonymous memory:
    512 MiB let it grow past the bound). Resident memory stays bounded by the few blocks alive at
    once; writers working together also call `release_freed_blocks` once per tensor. Called once
    by the CLI's entry point, before any thread starts."""
    if not sys.platform.startswith("linux") or _lib() is None:
        return
    try:
        _lib().mallopt(-3, 2 * BLOCK_BYTES)  # M_MMAP_THRESHOLD
        _lib().mallopt(-1, 4 * BLOCK_BYTES)  # M_TRIM_THRESHOLD
        # M_ARENA_MAX: one heap for every thread. Each worker thread (block producer, hashers)
        # would otherwise get an arena of its own that keeps its freed blocks, and the kept
        # blocks add up (docs/performance.md: split-sparse's peak anonymous memory).
        _lib().mallopt(-8, 1)
    except AttributeError:
        pass


def release_freed_blocks() -> None:
    """Give the heap's free pages back to the OS now (malloc_trim): N writers' freed blocks, kept
    for reuse, would otherwise add up to more than the blocks alive at once."""
    if _lib() is not None and sys.platform.startswith("linux"):
        try:
            _lib().malloc_trim(0)
        except AttributeError:
            pass


def warm(lazy: Lazy, region: Optional[Region] = None) -> None:
    """Ask the kernel to start reading, in the background, the file range that `region`
    (default: all) of `lazy` lies in (posix_fadvise WILLNEED), so that the disk reads while the
    writer writes. A hint: nothing happens where no file is behind it."""
    if isinstance(lazy, OnDisk):
        if not lazy.read_once(region):  # a direct read does not go through the page cache
            lazy.file.advise(*lazy.span(region))
    elif isinstance(lazy, Assembled):  # a region of the result maps to the same sources: warm them all
        for p in lazy.placements:
            warm(p.src, p.src_region)
    elif hasattr(lazy, "base"):  # a cast (the same region) or a row permutation (warmed whole)
        warm(lazy.base, region if isinstance(lazy, Cast) else None)


_DONE = object()


def prefetched(blocks: Iterator, depth: int = 1) -> Iterator:
    """The same items, produced by a second thread up to `depth` ahead of the consumer, so that
    computing blocks (reads, copies, transposes: they release the GIL) overlaps writing them.
    Close it (`contextlib.closing`) to stop and join the worker at once when the consumer leaves
    early."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        """Queue item unless the consumer has gone (then False): never block on a full queue
        nobody reads, or the consumer's join of this thread would wait forever."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for b in blocks:
                if not put(b):
                    return
            put(_DONE)
        except BaseException as e:  # re-raised in the consumer
            put(e)

    th = threading.Thread(target=produce, daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        th.join()


def stream(lazy: Lazy, progress: Progress):
    """A lazy tensor's bytes, block by block, computed a little ahead on a second thread."""
    with closing(prefetched(lazy.blocks())) as blocks:  # on any exit, stop and join the producer now
        for block in blocks:
            buf = tensor_bytes(block)
            yield buf
            progress.advance(len(buf))


def _file_blocks(specs: Sequence[TensorSpec], lazy_of: Callable[[TensorSpec], Lazy],
                 gate: Optional[Callable[[int], None]], block_bytes: int, share=None):
    lazies = [lazy_of(s) for s in specs]
    for i, s in enumerate(specs):
        if gate is not None:
            gate(i)  # e.g. wait until the other files' producers reach their tensor i too
        for ahead in lazies[i:i + 2] if i == 0 else lazies[i + 1:i + 2]:
            if share is None or not share.serves(ahead):
                warm(ahead)  # the disk reads the next tensor's source while this one is written
        for block in lazies[i].blocks(block_bytes, share):
            yield s.name, tensor_bytes(block)  # strided blocks are gathered here, off the writer's thread


@contextmanager
def file_producer(specs: Sequence[TensorSpec], lazy_of: Callable[[TensorSpec], Lazy], progress: Progress,
                  gate: Optional[Callable[[int], None]] = None, block_bytes: int = BLOCK_BYTES, share=None):
    """`produce(spec)` for a writer that asks for `specs` in order: every tensor's blocks, computed
    ahead on one worker thread for the whole file (not one per tensor: see docs/performance.md),
    which is joined on any exit. `gate(i)`, when given, runs on that thread before tensor i; `share`
    (an `io.bandshare.BandShare`) serves the transposed bands the ranks written together read (a
    tensor read through it is not warmed: its chunks are read past the page cache)."""
    with closing(prefetched(_file_blocks(specs, lazy_of, gate, block_bytes, share))) as blocks:  # joined on any exit
        def produce(spec: TensorSpec):
            left = spec.nbytes
            while left > 0:
                name, buf = next(blocks)
                if name != spec.name:
                    raise AssertionError(f"writer asked for {spec.name} but the blocks are {name}'s")
                left -= len(buf)
                yield buf
                progress.advance(len(buf))
        yield produce
