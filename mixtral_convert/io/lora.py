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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .lazy import Lazy

CHUNK_ELEMENTS = 1 << 20  # rows per step of the product: about this many float32 elements (4 MiB) per buffer


@dataclass(frozen=True)
class Segment:
    """Rows [r0, r1) of the weight take `W + b·a`: b [r1 - r0, k] and a [k, in] (lazy)."""

    r0: int
    r1: int
    b: Lazy
    a: Lazy


def lora_product(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """b·a in float32, summed over k in a fixed order, elementwise (see the module's docstring)."""
    b, a = b.float(), a.float()
    acc = torch.zeros((b.shape[0], a.shape[1]), dtype=torch.float32)
    term = torch.empty_like(acc)
    for k in range(b.shape[1]):
        torch.mul(b[:, k:k + 1], a[k:k + 1, :], out=term)
        acc.add_(term)
    return acc


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
        step = max(1, CHUNK_ELEMENTS // max(1, c1 - c0))
        for s in self.segments:
            a, b = max(r0, s.r0), min(r1, s.r1)
            if a >= b:
                continue
            k = s.a.shape[0]
            A = s.a.read(0, k, c0, c1)
            for i in range(a, b, step):
                j = min(b, i + step)
                out[i - r0:j - r0].add_(lora_product(s.b.read(i - s.r0, j - s.r0), A))
        return out.to(self.dtype)
