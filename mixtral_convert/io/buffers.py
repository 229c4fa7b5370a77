"""Reused buffers for blocks: page-aligned anonymous memory, handed back to a small pool when the
last tensor viewing it is gone, so that reading a block does not fault in (and the kernel zero)
fresh pages every time (docs/performance.md, "Direct I/O"). Page alignment is also what direct
I/O needs of a buffer (`io.reads.SourceFile.read_direct`)."""

from __future__ import annotations

import mmap
import threading
import weakref

import torch

POOLED = 1 << 20  # blocks of at least this many bytes come from the pool, in whole multiples of it
KEEP_BYTES = 64 << 20  # free buffers kept for reuse, at most (they count as memory; 128 MiB measured no faster)
_pool_lock = threading.Lock()
_pool: list[tuple[int, mmap.mmap]] = []  # free buffers, oldest first
_kept = 0


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous tensor, as torch.empty; one of a megabyte or more lies in a
    reused page-aligned buffer, which goes back to the pool when the last view of it is gone."""
    count = 1
    for n in shape:
        count *= n
    nbytes = count * dtype.itemsize
    if nbytes < POOLED:
        return torch.empty(shape, dtype=dtype)
    return from_pool(nbytes).view(dtype).view(shape)


def from_pool(nbytes: int) -> torch.Tensor:
    """`nbytes` (a uint8 tensor) at the start of a page-aligned reused buffer."""
    size = -(-nbytes // POOLED) * POOLED
    global _kept
    buf = None
    with _pool_lock:
        for i, (n, b) in enumerate(_pool):
            if n == size:
                buf = b
                del _pool[i]
                _kept -= size
                break
    if buf is None:
        buf = mmap.mmap(-1, size)
    view = memoryview(buf)
    t = torch.frombuffer(view, dtype=torch.uint8, count=nbytes)  # keeps `view` alive as long as it lives
    weakref.finalize(view, _give_back, buf, size)
    del view
    return t


def _give_back(buf: mmap.mmap, size: int) -> None:
    """Keep a free buffer for reuse; past KEEP_BYTES the oldest free ones are dropped (and
    unmapped when their last reference goes)."""
    global _kept
    with _pool_lock:
        _pool.append((size, buf))
        _kept += size
        while _kept > KEEP_BYTES:
            n, _ = _pool.pop(0)
            _kept -= n
