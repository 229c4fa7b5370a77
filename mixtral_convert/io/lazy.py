"""Tensors that are read a block at a time.

A `Lazy` tensor has a shape and a dtype and gives any block of rows (and optionally a column
range) on demand. `OnDisk` is a tensor as it lies in a source file: the file, the byte offset
of its first element, its shape, dtype and element strides; reading a region asks the read
layer (`io.reads`, the one place where bytes come off the disk) for exactly those bytes.
`Stored` wraps a tensor already in memory. `Assembled` is a tensor defined as placements of
regions of other lazy tensors, optionally transposed: a shard tensor is assembled from
canonical tensors (split), a canonical tensor from shard tensors (merge), and the two compose
(reshard). The writer and the verifier only ever ask for bounded blocks, so nothing holds a
whole checkpoint.

`TensorSpec` is what a writer needs to know of a tensor before its bytes arrive (name, shape,
dtype), and `tensor_bytes` turns a block into the buffer a writer takes.

These types are pure data: they read only when asked for a block, start no threads and make
no kernel calls of their own; read-ahead and background production live in `io.prefetch`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..errors import ConvertError
from . import buffers, reads, tiles

BLOCK_BYTES = 16 << 20  # bytes per block handed to the writer or the comparer
GROUP_BLOCKS = 2  # blocks of an all-transposed tensor assembled at once (Assembled._grouped_blocks)
BAND_BLOCKS = 4  # blocks of a transposed placement read in one band (Assembled._transposed_blocks)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as a writer sees it before its bytes: name, shape, dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: how files and messages name a dtype."""
    return str(dtype).replace("torch.", "")


def tensor_bytes(t: torch.Tensor):
    """A tensor's bytes as a buffer (made contiguous first; no copy when it already is)."""
    t = t.contiguous()
    if t.dim() == 0:
        t = t.reshape(1)
    return t.view(-1).view(torch.uint8).numpy() if t.numel() else b""

Region = tuple[int, int, Optional[int], Optional[int]]  # rows [r0, r1), cols [c0, c1) or None for 1-D


class Lazy:
    shape: tuple[int, ...]
    dtype: torch.dtype
    name: str = "?"

    def read(self, r0: int, r1: int, c0: Optional[int] = None, c1: Optional[int] = None) -> torch.Tensor:
        raise NotImplementedError

    def files(self) -> Iterator["reads.SourceFile"]:
        """The source files this tensor's bytes are read from (what a command checks unchanged
        before it publishes anything made of them); every kind of lazy tensor says."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


    def row_blocks(self, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, int]]:
        """Row ranges [r0, r1) of about block_bytes each, covering the tensor."""
        rows = self.shape[0] if self.shape else 1
        row_bytes = max(1, self.nbytes // max(rows, 1))
        step = max(1, block_bytes // row_bytes)
        for r0 in range(0, rows, step):
            yield r0, min(rows, r0 + step)

    def blocks(self, block_bytes: int = BLOCK_BYTES, share=None) -> Iterator[torch.Tensor]:
        """Blocks of about block_bytes, rows in order (`share`, an `io.bandshare.BandShare`, is
        used by `Assembled` only)."""
        if not self.shape:
            yield self.read(0, 1)
            return
        for r0, r1 in self.row_blocks(block_bytes):
            yield self.read(r0, r1)


class OnDisk(Lazy):
    """A tensor as it lies in a source file: `file` (an `io.reads.SourceFile`), the byte
    `offset` of its first element, `shape`, `dtype` and element `strides` (row-major when not
    given). Row slices and the transpose are descriptions too (the fused format's experts are
    row views and transposed row views of one tensor); nothing is read until a block is asked for."""

    def __init__(self, file, offset: int, shape, dtype: torch.dtype, strides=None, name: str = "?"):
        self.file, self.offset, self.shape, self.dtype, self.name = file, offset, tuple(shape), dtype, name
        self.strides = tuple(strides) if strides is not None else reads.contiguous_strides(self.shape)

    def files(self):
        yield self.file

    def named(self, name: str) -> "OnDisk":
        return OnDisk(self.file, self.offset, self.shape, self.dtype, self.strides, name)

    def __getitem__(self, rows: slice) -> "OnDisk":
        """Rows [start, stop) (a view, as torch's t[a:b])."""
        a, b, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("only contiguous row slices")
        b = max(a, b)
        return OnDisk(self.file, self.offset + a * self.strides[0] * self.dtype.itemsize,
                      (b - a,) + self.shape[1:], self.dtype, self.strides, self.name)

    def t(self) -> "OnDisk":
        """The transpose of a 2-D tensor (a view)."""
        return OnDisk(self.file, self.offset, self.shape[::-1], self.dtype, self.strides[::-1], self.name)

    def _region(self, r0, r1, c0=None, c1=None) -> tuple[int, tuple[int, ...]]:
        """(byte offset, shape) of rows [r0, r1) and columns [c0, c1) (all when None)."""
        if not self.shape:
            return self.offset, ()
        item, shape = self.dtype.itemsize, list(self.shape)
        off = self.offset + r0 * self.strides[0] * item
        shape[0] = r1 - r0
        if c0 is not None:
            off += c0 * self.strides[1] * item
            shape[1] = c1 - c0
        return off, tuple(shape)

    def span(self, region: Optional[Region] = None) -> tuple[int, int]:
        """(byte offset, bytes) of the file range that a region (default: all) lies in."""
        off, shape = self._region(*region) if region is not None and self.shape else (self.offset, self.shape)
        return off, (reads.span(shape, self.strides) if shape else 1) * self.dtype.itemsize

    def read_once(self, region: Optional[Region] = None) -> bool:
        """Whether a region (default: all) is read by direct I/O, past the page cache (so that
        asking the kernel to read it ahead would read it twice)."""
        _, shape = self._region(*region) if region is not None and self.shape else (self.offset, self.shape)
        return bool(shape) and reads.reads_direct(shape, self.strides, self.dtype.itemsize) and self.file.direct

    def read(self, r0, r1, c0=None, c1=None):
        off, shape = self._region(r0, r1, c0, c1)
        if not shape:
            return reads.read_view(self.file, off, (1,), (1,), self.dtype)
        return reads.read_view(self.file, off, shape, self.strides, self.dtype)


class Stored(Lazy):
    """A tensor already in memory."""

    def __init__(self, tensor: torch.Tensor, name: str = "?"):
        self.t, self.name = tensor, name
        self.shape, self.dtype = tuple(tensor.shape), tensor.dtype

    def files(self):
        return iter(())

    def read(self, r0, r1, c0=None, c1=None):
        if not self.shape:
            return self.t.reshape(1)
        block = self.t[r0:r1]
        return block if c0 is None else block[:, c0:c1]


def transpose_into(dst: torch.Tensor, src: torch.Tensor, tile: int = 16) -> None:
    """dst[:] = src.t(), a few source rows at a time: each step reads a few contiguous runs of
    the source and writes narrow columns of dst, which stays in cache; several times faster
    than one strided copy of a large matrix, and needs no staging buffer."""
    for i in range(0, src.shape[0], tile):
        dst[:, i:i + tile].copy_(src[i:i + tile].t())


@dataclass(frozen=True)
class Placement:
    """dst[dst_region] = src[src_region] (transposed when `transpose`)."""

    dst: Region
    src: Lazy
    src_region: Region
    transpose: bool = False


class Assembled(Lazy):
    """A tensor of `shape` whose placements must tile it exactly (`io.tiles`: checked as intervals, so
    an overlap cannot hide a gap that would be read from a reused buffer); a ConvertError names it if not."""

    def __init__(self, shape, dtype, placements: list[Placement], name: str = "?",
                 fix: str = "the pieces that assemble it are wrong (a bug in mixtral-convert; please report it)"):
        self.shape, self.dtype, self.placements, self.name = tuple(shape), dtype, placements, name
        tiles.check_tiling(name, self.shape, (p.dst for p in placements), fix)

    def files(self):
        for p in self.placements:
            yield from p.src.files()


    def read(self, r0, r1, c0=None, c1=None):
        two_d = len(self.shape) == 2
        if two_d and c0 is None:
            c0, c1 = 0, self.shape[1]
        out = None
        for p in self.placements:
            dr0, dr1, dc0, dc1 = p.dst
            a, b = max(r0, dr0), min(r1, dr1)
            if a >= b:
                continue
            if two_d:
                c, d = max(c0, dc0), min(c1, dc1)
                if c >= d:
                    continue
            sr0, _, sc0, _ = p.src_region
            whole = (a, b) == (r0, r1) and (not two_d or (c, d) == (c0, c1))
            if out is None and not (whole and not p.transpose):
                out = buffers.empty((r1 - r0, c1 - c0) if two_d else (r1 - r0,), self.dtype)
            if p.transpose:  # dst rows are src columns
                src = p.src.read(sr0 + c - dc0, sr0 + d - dc0, sc0 + a - dr0, sc0 + b - dr0)
                transpose_into(out[a - r0:b - r0, c - c0:d - c0], src)
                continue
            if two_d:
                data = p.src.read(sr0 + a - dr0, sr0 + b - dr0, sc0 + c - dc0, sc0 + d - dc0)
            else:
                data = p.src.read(sr0 + a - dr0, sr0 + b - dr0)
            if whole:
                return data  # one placement covers the whole request: a view, no copy
            if two_d:
                out[a - r0:b - r0, c - c0:d - c0] = data
            else:
                out[a - r0:b - r0] = data
        if out is None:
            raise AssertionError(f"{self.name}: rows {r0}:{r1} are covered by no placement")
        return out

    def full_rows(self) -> bool:
        """Whether every placement spans whole rows (whole tensors, row chunks, expert slices, a
        sparse rank's transposed w2 band)."""
        return len(self.shape) != 2 or all((p.dst[2], p.dst[3]) == (0, self.shape[1]) for p in self.placements)

    def blocks(self, block_bytes: int = BLOCK_BYTES, share=None) -> Iterator[torch.Tensor]:
        """Rows in order. Where placements span whole rows (whole tensors, row chunks, expert
        slices), each placement's rows are yielded separately, so a contiguous region of the
        source goes to the writer as a view, never copied into an assembly buffer. A transposed
        placement that `share` serves is transposed out of full source rows read once for every
        rank (`io.bandshare`)."""
        two_d = len(self.shape) == 2
        if not self.full_rows():
            if two_d and all(p.transpose for p in self.placements):
                yield from self._grouped_blocks(block_bytes)  # merge of a sparse w2: column bands of the ranks
            else:
                yield from super().blocks(block_bytes)
            return
        row_bytes = max(1, self.nbytes // max(self.shape[0], 1))
        step = max(1, block_bytes // row_bytes)
        for p in sorted(self.placements, key=lambda p: p.dst[0]):
            if p.transpose and share is not None and share.serves_placement(p):
                yield from share.transposed_blocks(self, p, step)
            elif p.transpose:
                yield from self._transposed_blocks(p, step, row_bytes, block_bytes)
            else:
                for a in range(p.dst[0], p.dst[1], step):
                    yield self.read(a, min(a + step, p.dst[1]))

    def _grouped_blocks(self, block_bytes: int):
        """The usual blocks of rows, assembled GROUP_BLOCKS at a time and handed out as views: a
        tensor whose every placement is a transposed band (a canonical w2 from the sparse ranks'
        pieces) then costs one positioned read per source row for several blocks, not one each."""
        spans = list(self.row_blocks(block_bytes))
        for i in range(0, len(spans), GROUP_BLOCKS):
            part = spans[i:i + GROUP_BLOCKS]
            g0 = part[0][0]
            group = self.read(g0, part[-1][1])
            for a, b in part:
                yield group[a - g0:b - g0]
            del group

    def _transposed_blocks(self, p: Placement, step: int, row_bytes: int, block_bytes: int):
        """A transposed placement's blocks of `step` rows, from bands of up to BAND_BLOCKS blocks
        read at once: each row of the band is one positioned read for several blocks (a narrow
        block of a w2 column band would cost one read of a few hundred bytes per source row)."""
        dr0, dr1, _, _ = p.dst
        sr0, _, sc0, _ = p.src_region
        width = self.shape[1]
        group = step * max(1, min(BAND_BLOCKS, BLOCK_BYTES // max(1, step * row_bytes)))
        for g in range(dr0, dr1, group):
            ge = min(g + group, dr1)
            band = p.src.read(sr0, sr0 + width, sc0 + g - dr0, sc0 + ge - dr0)  # source rows x these columns
            for a in range(g, ge, step):
                b = min(a + step, ge)
                out = buffers.empty((b - a, width), self.dtype)
                transpose_into(out, band[:, a - g:b - g])
                yield out
            del band


def files_of(tensors) -> tuple["reads.SourceFile", ...]:
    """The source files a collection of lazy tensors reads, each once, in the order first met."""
    return tuple(dict.fromkeys(f for t in tensors for f in t.files()))


def materialize(lz: Lazy) -> torch.Tensor:
    """A lazy tensor as a tensor: the tensor itself when in memory, else read whole (only ever
    one tensor of one layer at a time, as the forward asks for them)."""
    if isinstance(lz, Stored):
        return lz.t
    return lz.read(0, lz.shape[0]) if lz.shape else lz.read(0, 1).reshape(())


class TensorGetter:
    """`name -> tensor` over lazy tensors, keeping the last few it read: the sharded forward asks
    for a stacked expert tensor once per expert, and reading it again each time would multiply
    the I/O."""

    def __init__(self, lazies: dict[str, Lazy], keep: int = 3):
        self.lazies, self.keep = lazies, keep
        self.recent: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __contains__(self, name: str) -> bool:
        return name in self.lazies

    def __call__(self, name: str) -> torch.Tensor:
        if name in self.recent:
            self.recent.move_to_end(name)
            return self.recent[name]
        t = materialize(self.lazies[name])
        if not isinstance(self.lazies[name], Stored):
            self.recent[name] = t
            while len(self.recent) > self.keep:
                self.recent.popitem(last=False)
        return t


FLOAT16_MAX = 65504.0  # the largest finite float16


class CastOverflow(ConvertError):
    """Values of a tensor that a cast to float16 would turn into infinities."""

    def __init__(self, where: str, name: str, count: int):
        super().__init__(f"{where}: tensor '{name}' has {count} value(s) beyond ±{FLOAT16_MAX:g}, which float16 "
                         "cannot hold (they would become inf); keep the source's dtype or use --dtype bfloat16")
        self.name, self.count = name, count


class Cast(Lazy):
    """`base` in another dtype, cast a block at a time as it is read. A cast to float16 refuses
    finite values beyond its range (they would silently become inf): `CastOverflow` names the
    tensor and counts them in the whole tensor."""

    def __init__(self, base: Lazy, dtype: torch.dtype, where: str = "source"):
        self.base, self.dtype, self.shape, self.name, self.where = base, dtype, base.shape, base.name, where

    def files(self):
        return self.base.files()

    def read(self, r0, r1, c0=None, c1=None):
        block = self.base.read(r0, r1, c0, c1)
        if self.dtype == torch.float16 and block.dtype != torch.float16 and block.numel() \
                and _beyond_float16(block).any():
            raise CastOverflow(self.where, self.name, self.overflow_count())
        return block.to(self.dtype)

    def overflow_count(self) -> int:
        return sum(int(_beyond_float16(b).sum()) for b in self.base.blocks())


def _beyond_float16(t: torch.Tensor) -> torch.Tensor:
    t = t.float()  # compared in float32: in bfloat16 the bound itself rounds up to 65536
    return t.isfinite() & (t.abs() > FLOAT16_MAX)
