"""A weight with LoRA merged into it, read a block at a time: `W + B·A` (docs/formats.md, "Accessory PEFT saves").

`LoraMerged` is a pure lazy tensor like `lazy.Cast`: its rows are split into segments, each with
its own B rows and A (a column-parallel weight's rank r rows go with rank r's own A). A block is
computed in float32 and rounded once to the weight's dtype.

The bytes must not depend on the block asked for (the writer's block size, a shard's column band,
the output layout or N) nor on the machine. A BLAS matmul does not promise that: its summation
order depends on the shapes and the CPU's kernels. So the rank-r product is summed elementwise in
one fixed order, `acc = ((0 + B[:,0]A[0,:]) + B[:,1]A[1,:]) + ...`, a separate float32 multiply
and add per term (no fused multiply-add), then `W.float() + acc`, then one rounding to the dtype.
Every output element is then a function of its own row of B, column of A and W element only, each
step an IEEE-754 float32 operation, exactly rounded on every machine. Its cost is in
docs/performance.md ("LoRA merge").

`add_lora` computes it over the cores: a block's rows are cut into tiles of about CHUNK_ELEMENTS
float32 values (two 1 MiB buffers, the product and one term, stay in a core's cache while the r
terms are added), and contiguous runs of tiles go to a pool of `workers()` threads. Each tile is
numpy's separate float32 multiply and add (ufuncs, never fused, single-threaded, the GIL released
while they run), so a row's arithmetic is the same whichever thread and tile it falls in: the bytes
do not depend on the thread count (tests/adapters/test_merge_threads.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .lazy import Lazy
from .workers import executor, workers

CHUNK_ELEMENTS = 1 << 18  # rows per tile of the product: about this many float32 elements (1 MiB) per buffer


@dataclass(frozen=True)
class Segment:
    """Rows [r0, r1) of the weight take `W + b·a`: b [r1 - r0, k] and a [k, in] (lazy)."""

    r0: int
    r1: int
    b: Lazy
    a: Lazy


def _tiles(out: np.ndarray, b: np.ndarray, a: np.ndarray, scale: Optional[np.ndarray], r0: int, r1: int) -> None:
    """Rows [r0, r1) of out += (Σ_k b[:, k]·a[k, :]) [· scale], a tile of rows at a time (the module's docstring)."""
    step = max(1, CHUNK_ELEMENTS // max(1, out.shape[1]))
    acc = np.empty((min(step, r1 - r0), out.shape[1]), dtype=np.float32)
    term = np.empty_like(acc)
    cols = [a[k:k + 1] for k in range(a.shape[0])]
    for i in range(r0, r1, step):
        j = min(r1, i + step)
        p, t, bk = acc[:j - i], term[:j - i], b[i:j].T[:, :, None]
        p.fill(0)
        for k, ak in enumerate(cols):
            np.multiply(bk[k], ak, out=t)  # [rows, 1] · [1, cols]: one float32 product per element
            np.add(p, t, out=p)
        if scale is not None:
            np.multiply(p, scale, out=p)
        np.add(out[i:j], p, out=out[i:j])


def add_lora(out: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: Optional[torch.Tensor] = None,
             threads: Optional[int] = None) -> None:
    """out += b·a (times `scale`, a float32 scalar tensor, when given), in place: out a float32 [n, c] tensor,
    b [n, k], a [k, c] in any float dtype (widened to float32, exactly). The sum over k is the fixed order of
    the module's docstring, its tiles spread over `threads` (default `workers()`) threads."""
    bn = b.float().contiguous().numpy()
    an = a.float().contiguous().numpy()
    sn = None if scale is None else scale.to(torch.float32).numpy()
    on = out.numpy()
    rows = on.shape[0]
    tiles = -(-rows // max(1, CHUNK_ELEMENTS // max(1, on.shape[1])))
    k = max(1, min(threads or workers(), tiles))
    if k == 1:
        _tiles(on, bn, an, sn, 0, rows)
        return
    bounds = [rows * i // k for i in range(k + 1)]
    futures = [executor(k).submit(_tiles, on, bn, an, sn, bounds[i], bounds[i + 1]) for i in range(k)]
    errors = [f.exception() for f in futures]  # every span finishes before an error is raised
    for err in errors:
        if err is not None:
            raise err


class LoraMerged(Lazy):
    """`weight` with each segment's `b·a` added (segments cover disjoint rows; rows outside any keep W)."""

    def __init__(self, weight: Lazy, segments: list[Segment], name: Optional[str] = None):
        self.weight, self.segments = weight, segments
        self.shape, self.dtype, self.name = weight.shape, weight.dtype, name or weight.name

    def files(self):
        yield from self.weight.files()
        for s in self.segments:
            yield from s.b.files()
            yield from s.a.files()

    def read(self, r0, r1, c0=None, c1=None):
        if c0 is None:
            c0, c1 = 0, self.shape[1]
        out = self.weight.read(r0, r1, c0, c1).float()  # a new float32 tensor (never a view of the file)
        if out.dtype == self.weight.dtype:
            out = out.clone()
        for s in self.segments:
            a, b = max(r0, s.r0), min(r1, s.r1)
            if a >= b:
                continue
            add_lora(out[a - r0:b - r0], s.b.read(a - s.r0, b - s.r0), s.a.read(0, s.a.shape[0], c0, c1))
        return out.to(self.dtype)
