"""Full source rows read once for the rank writers that each transpose a band of their columns.

In the sparse layout every rank holds a band of columns of every expert's w2, transposed. Written
together (`commands.split`, a thread per rank, in step tensor by tensor), each rank used to read its
band row by row: one positioned read of a few hundred bytes per source row per rank, through the
page cache, whose read-around brought in the whole rows anyway. A `BandShare` instead reads the
source's full rows in chunks of about `CHUNK_BYTES` (one contiguous read each, by direct I/O where
the file allows it) and hands each chunk to every rank; a rank transposes its own columns out of it
(`io.lazy.Assembled`), and the chunk is dropped when the last of its consumers is done with it.

The consumers of each source region are counted before any thread starts (`count`), from the same
test the readers apply (`band_keys`), so a chunk is freed exactly when every rank that
will read it has. At most `window` chunks are alive at once: a rank that runs ahead waits for the
slowest to finish the oldest one. The slowest never waits (its next chunk exists or may be made),
so the wait ends unless a rank has stopped, which `stop` (set by the writers on any error) ends too.

The ranks hold their bands of one source region at once (together, the whole region), so a region
larger than `MAX_SHARED_BYTES` is not shared: each rank reads its band row by row, as before.
"""

from __future__ import annotations

import threading
from typing import Callable, Hashable, Iterable, Iterator, Optional

import torch

from . import buffers, reads
from .lazy import Assembled, Lazy, OnDisk, Placement, transpose_into

CHUNK_BYTES = 8 << 20  # full source rows per chunk: about this many bytes
WINDOW = 2  # chunks alive at once
MAX_SHARED_BYTES = 128 << 20  # a source region larger than this is not shared: the ranks' bands of it
# are held at once (one whole w2: 117 MiB for 8x7B; 8x22B's 201 MiB would pass the 512 MiB bound)


def _shareable(src: Lazy) -> bool:
    """A source whose full rows are one contiguous range each (a row-major 2-D tensor on disk)."""
    return isinstance(src, OnDisk) and len(src.shape) == 2 and src.strides == reads.contiguous_strides(src.shape)


def _key(p: Placement) -> tuple:
    """What identifies the source rows a transposed placement reads, across the ranks' placements."""
    s = p.src
    return (id(s.file), s.offset, s.shape, s.dtype, p.src_region[0], p.src_region[1])


def band_keys(lz) -> list:
    """The source regions `Assembled.blocks` reads through a share when given one: each transposed
    placement of whole rows whose source is a row-major tensor on disk (a sparse rank's w2 band)."""
    if not isinstance(lz, Assembled) or len(lz.shape) != 2 or not lz.full_rows():
        return []
    return [_key(p) for p in lz.placements if p.transpose and _shareable(p.src) and _small(p)]


def _small(p: Placement) -> bool:
    """Whether the source rows a transposed placement reads (all the ranks' bands together) fit
    MAX_SHARED_BYTES."""
    r0, r1 = p.src_region[0], p.src_region[1]
    return (r1 - r0) * p.src.shape[1] * p.src.dtype.itemsize <= MAX_SHARED_BYTES


class Stopped(Exception):
    """The writers stopped (another rank failed, or the run was interrupted) while this one waited."""


class _Chunk:
    __slots__ = ("ready", "rows", "error", "left")

    def __init__(self, left: int):
        self.ready, self.rows, self.error, self.left = threading.Event(), None, None, left


class BandShare:
    """Chunks of full source rows, read by the first rank that asks and shared by `consumers[key]`
    ranks (`key` as `Assembled.band_keys` gives it)."""

    def __init__(self, consumers: dict[Hashable, int], stop: threading.Event, window: Optional[int] = None,
                 chunk_bytes: Optional[int] = None):
        self.consumers, self.stop = dict(consumers), stop
        self.window, self.chunk_bytes = window or WINDOW, chunk_bytes or CHUNK_BYTES
        self.reads = 0  # chunks read (each once, whatever the consumers)
        self._chunks: dict[tuple, _Chunk] = {}
        self._cond = threading.Condition()

    @classmethod
    def count(cls, lazies: Iterable, stop: threading.Event, **kw) -> Optional["BandShare"]:
        """A share for the band keys of these lazy tensors (every rank's), or None when none has any."""
        consumers: dict[Hashable, int] = {}
        for lz in lazies:
            for key in band_keys(lz):
                consumers[key] = consumers.get(key, 0) + 1
        return cls(consumers, stop, **kw) if consumers else None

    def serves(self, lz) -> bool:
        """Whether any placement of this lazy tensor is read through the share."""
        return any(k in self.consumers for k in band_keys(lz))

    def serves_placement(self, p: Placement) -> bool:
        return _shareable(p.src) and _key(p) in self.consumers  # counted keys are of small regions only

    def transposed_blocks(self, lz: Assembled, p: Placement, step: int):
        """A transposed placement of `lz` from the shared chunks of full source rows: this rank's columns
        of each chunk transposed into its band (cache-sized tiles), then the band handed out in blocks of
        `step` rows (views: no further copy)."""
        dr0, dr1, _, _ = p.dst
        sr0, _, sc0, _ = p.src_region
        width, src = lz.shape[1], p.src
        band = buffers.empty((dr1 - dr0, width), lz.dtype)
        row_bytes = src.shape[1] * src.dtype.itemsize
        for a, rows in self.rows(_key(p), sr0, sr0 + width, row_bytes, src.read):
            transpose_into(band[:, a - sr0:a - sr0 + rows.shape[0]], rows[:, sc0:sc0 + dr1 - dr0])
        for a in range(0, dr1 - dr0, step):
            yield band[a:a + step]

    def rows(self, key: Hashable, r0: int, r1: int, row_bytes: int,
             read: Callable[[int, int], torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
        """(a, rows a..b of the source) for chunks covering rows [r0, r1); `read(a, b)` reads them."""
        step = max(1, self.chunk_bytes // max(1, row_bytes))
        for j, a in enumerate(range(r0, r1, step)):
            chunk = self._take(key, j, lambda a=a: read(a, min(r1, a + step)))
            try:
                yield a, chunk.rows
            finally:
                self._done(key, j, chunk)

    def _wait(self, ok: Callable[[], bool]) -> None:
        """Wait (holding the condition) until ok(), or raise Stopped when the writers stop."""
        while not ok():
            if self.stop.is_set():
                raise Stopped()
            self._cond.wait(0.1)

    def _take(self, key: Hashable, j: int, read: Callable[[], torch.Tensor]) -> _Chunk:
        with self._cond:
            chunk = self._chunks.get((key, j))
            mine = chunk is None
            if mine:
                self._wait(lambda: (key, j) in self._chunks or len(self._chunks) < self.window)
                chunk = self._chunks.get((key, j))
                mine = chunk is None
                if mine:
                    chunk = self._chunks[(key, j)] = _Chunk(self.consumers[key])
        if mine:
            try:
                chunk.rows = read()
                with self._cond:
                    self.reads += 1
            except BaseException as e:  # every consumer of the chunk raises it
                chunk.error = e
                raise
            finally:
                chunk.ready.set()
        else:
            while not chunk.ready.wait(0.1):
                if self.stop.is_set():
                    raise Stopped()
            if chunk.error is not None:
                raise chunk.error
        return chunk

    def _done(self, key: Hashable, j: int, chunk: _Chunk) -> None:
        with self._cond:
            chunk.left -= 1
            if chunk.left <= 0:
                self._chunks.pop((key, j), None)
                self._cond.notify_all()
