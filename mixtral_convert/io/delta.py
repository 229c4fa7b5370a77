"""A delta on a base: what a finetune changed of one canonical tensor, and the merged tensor read a block at a time.

`Delta` is the data model every adapter reader fills (formats.adapters.hf for peft's LoRA): a whole
`replace`ment of the base's tensor (peft's `modules_to_save`), a low-rank term `scale · b·a` (b
[out, k] and a [k, in], already in canonical names and canonical row order), and a DoRA
`magnitude` [out]. `DeltaMerged` is the merged tensor, a pure lazy tensor like io.lora.LoraMerged,
and computes it in one fixed order of IEEE-754 float32 operations, rounded once to the base's dtype:

    V = W.float()  (or the replacement's values)
    P = Σ_k b[:, k] · a[k, :]        summed elementwise over k in order (io.lora.add_lora)
    V = V + P · scale                (scale a float32 number)
    DoRA: n = sqrt(Σ_j V[:, j]²)     a pairwise sum over the full row in a fixed tree (`row_norm`)
          V = V · (magnitude / n)
    out = V.to(dtype)

Each output element depends only on its own row of b (and of W, for DoRA's norm), its column of a
and its W element, so the bytes do not depend on the block asked for (the writer's block size, a
shard's column band), on the base's file layout, nor on the machine: no BLAS, no fused multiply-add,
no reduction whose order a kernel picks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .lazy import Lazy
from .lora import add_lora

DORA_ELEMENTS = 1 << 20  # DoRA: whole rows per step, about this many float32 values (4 MiB)


@dataclass(frozen=True)
class Lora:
    """`scale · b·a`: b [out, k], a [k, in] (lazy, canonical row order)."""

    b: Lazy
    a: Lazy
    scale: float


@dataclass(frozen=True)
class Delta:
    """What an adapter changes of one canonical tensor; `source` names it in messages (the adapter's key)."""

    source: str
    replace: Optional[Lazy] = None
    lora: Optional[Lora] = None
    magnitude: Optional[Lazy] = None  # DoRA: [out], with `lora`


class Rows(Lazy):
    """Rows [start, start + n) of `base` (a view)."""

    def __init__(self, base: Lazy, start: int, n: int, name: str = "?"):
        self.base, self.start, self.name = base, start, name
        self.shape, self.dtype = (n,) + tuple(base.shape[1:]), base.dtype

    def files(self):
        return self.base.files()

    def read(self, r0, r1, c0=None, c1=None):
        return self.base.read(self.start + r0, self.start + r1, c0, c1)


class Columns(Lazy):
    """Columns `cols` (an index tensor) of a 2-D `base`, gathered."""

    def __init__(self, base: Lazy, cols: torch.Tensor, name: str = "?"):
        self.base, self.cols, self.name = base, cols, name
        self.shape, self.dtype = (base.shape[0], int(cols.numel())), base.dtype

    def files(self):
        return self.base.files()

    def read(self, r0, r1, c0=None, c1=None):
        cols = self.cols if c0 is None else self.cols[c0:c1]
        lo, hi = int(cols.min()), int(cols.max()) + 1
        return self.base.read(r0, r1, lo, hi).index_select(1, cols - lo)


class Transposed(Lazy):
    """The transpose of a 2-D `base` (peft's embedding LoRA stores its factors transposed)."""

    def __init__(self, base: Lazy, name: str = "?"):
        self.base, self.name = base, name
        self.shape, self.dtype = tuple(base.shape[::-1]), base.dtype

    def files(self):
        return self.base.files()

    def read(self, r0, r1, c0=None, c1=None):
        if c0 is None:
            c0, c1 = 0, self.shape[1]
        return self.base.read(c0, c1, r0, r1).t()


def row_norm(v: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each row of a float32 [rows, n] tensor, its squares summed pairwise in a fixed tree
    (element j with j + half, halving; an odd tail carried), so that it does not depend on how many rows are asked."""
    s = v * v
    while s.shape[1] > 1:
        n = s.shape[1]
        half = n // 2
        top = s[:, :half] + s[:, half:2 * half]
        s = torch.cat((top, s[:, 2 * half:]), dim=1) if n % 2 else top
    return s[:, 0].sqrt()


class DeltaMerged(Lazy):
    """`base` with `delta` applied (module docstring); shape and dtype are the base's."""

    def __init__(self, base: Lazy, delta: Delta, name: Optional[str] = None):
        self.base, self.delta = base, delta
        # a replacement may be larger than the base (a vocabulary with added tokens); the dtype is the base's
        self.shape = tuple(delta.replace.shape) if delta.replace is not None else base.shape
        self.dtype, self.name = base.dtype, name or base.name
        self.scale = torch.tensor(delta.lora.scale if delta.lora else 1.0, dtype=torch.float32)

    def files(self):
        """The base's files (when read: not for a whole replacement) and every one the delta reads."""
        d = self.delta
        if d.replace is None:
            yield from self.base.files()
        for t in (d.replace, d.lora.b if d.lora else None, d.lora.a if d.lora else None, d.magnitude):
            if t is not None:
                yield from t.files()

    def _rows(self, r0, r1, c0, c1) -> torch.Tensor:
        """W (or the replacement) + scale · b·a over rows [r0, r1) and columns [c0, c1), a new float32 tensor."""
        src = self.delta.replace if self.delta.replace is not None else self.base
        out = src.read(r0, r1, c0, c1).float()
        if out.dtype == src.dtype:
            out = out.clone()  # never add into a view of the file or of a stored tensor
        lora = self.delta.lora
        if lora is not None:
            add_lora(out, lora.b.read(r0, r1), lora.a.read(0, lora.a.shape[0], c0, c1), self.scale)
        return out

    def read(self, r0, r1, c0=None, c1=None):
        if len(self.shape) == 1:
            src = self.delta.replace if self.delta.replace is not None else self.base
            return src.read(r0, r1).float().to(self.dtype)
        if c0 is None:
            c0, c1 = 0, self.shape[1]
        if self.delta.magnitude is None:
            return self._rows(r0, r1, c0, c1).to(self.dtype)
        # DoRA: each row's norm needs the whole row; a few rows at a time, so that a narrow column band asked
        # for does not hold the band's rows whole at once
        out = torch.empty((r1 - r0, c1 - c0), dtype=self.dtype)
        width = self.shape[1]
        step = max(1, DORA_ELEMENTS // width)
        for i in range(r0, r1, step):
            j = min(r1, i + step)
            v = self._rows(i, j, 0, width)
            m = self.delta.magnitude.read(i, j).float()
            v.mul_((m / row_norm(v)).unsqueeze(1))
            out[i - r0:j - r0] = v[:, c0:c1]  # one rounding to the dtype
        return out
