"""A PEFT model computed unmerged: every LoRA linear as Accessory computes it, `x W^T + b + (x A^T) B^T`
(docs/formats.md, "Accessory PEFT saves"), for `verify --forward`. It checks the merge (io.lora)
independently: the weights are never added, each rank's rows of a column-parallel linear take that
rank's own A, and the output compared with it is the merged model's.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..io.lazy import Lazy, TensorGetter, materialize
from ..io.lora import LoraMerged


class LoraLinear:
    """W and its LoRA segments (rows [r0, r1) take (x A^T) B^T), for reference.linear."""

    def __init__(self, w: torch.Tensor, segments: list[tuple[int, int, torch.Tensor, torch.Tensor]]):
        self.w, self.segments = w, segments

    @property
    def shape(self):
        return self.w.shape

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "LoraLinear":
        return LoraLinear(self.w.to(device=device, dtype=dtype),
                          [(r0, r1, b.to(device=device, dtype=dtype), a.to(device=device, dtype=dtype))
                           for r0, r1, b, a in self.segments])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.w.T
        for r0, r1, b, a in self.segments:
            y[..., r0:r1] += (x @ a.T) @ b.T
        return y


def has_lora(canonical: dict[str, Lazy]) -> bool:
    return any(isinstance(t, LoraMerged) for t in canonical.values())


class UnmergedGetter(TensorGetter):
    """`name -> tensor` over a PEFT checkpoint's tensors, a LoRA'd weight as a `LoraLinear` (unmerged)."""

    def __call__(self, name: str):
        t = self.lazies[name]
        if not isinstance(t, LoraMerged):
            return super().__call__(name)
        return LoraLinear(materialize(t.weight), [(s.r0, s.r1, materialize(s.b), materialize(s.a))
                                                  for s in t.segments])


def unmerged_getter(canonical: dict[str, Lazy]) -> UnmergedGetter:
    return UnmergedGetter(canonical)
