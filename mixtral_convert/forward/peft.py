"""A PEFT model computed unmerged: every LoRA linear as Accessory computes it, `x W^T + b + (x A^T) B^T`
(docs/formats.md, "Accessory PEFT saves"), for `verify --forward`. It checks the merge (io.lora)
independently: the weights are never added, each rank's rows of a column-parallel linear take that
rank's own A, and the output compared with it is the merged model's. An HF PEFT adapter's modules
(formats.adapters.hf) are computed as peft's forward computes them (`DeltaLinear`: scale, DoRA, the
embedding's rows), the router and lm_head included.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..io.delta import DeltaMerged
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


class DeltaLinear:
    """An HF PEFT adapter's module computed as peft's forward does (formats.adapters.hf): `x W^T + s (x A^T) B^T`,
    with DoRA that times `m / ||W + s B A||` per output row; as an embedding, rows `W[i] + s (B A)^T[i]`."""

    def __init__(self, w, b, a, scale: float, m=None):
        self.w, self.b, self.a, self.scale, self.m = w, b, a, scale, m

    @property
    def shape(self):
        return self.w.shape

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "DeltaLinear":
        def mv(t):
            return None if t is None else t.to(device=device, dtype=dtype)
        return DeltaLinear(mv(self.w), mv(self.b), mv(self.a), self.scale, mv(self.m))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.w.T + self.scale * ((x @ self.a.T) @ self.b.T)
        if self.m is not None:
            norm = torch.linalg.norm(self.w.double() + self.scale * (self.b.double() @ self.a.double()), dim=1)
            y = y * (self.m.double() / norm).to(y.dtype)
        return y

    def __getitem__(self, idx) -> torch.Tensor:  # the embedding's rows
        return self.w[idx] + self.scale * (self.b[idx] @ self.a)


def has_lora(canonical: dict[str, Lazy]) -> bool:
    return any(isinstance(t, (LoraMerged, DeltaMerged)) for t in canonical.values())


class UnmergedGetter(TensorGetter):
    """`name -> tensor` over a PEFT checkpoint's tensors, a LoRA'd weight as a `LoraLinear` (unmerged)."""

    def __call__(self, name: str):
        t = self.lazies[name]
        if isinstance(t, DeltaMerged) and t.delta.lora is not None:
            d = t.delta
            w = materialize(d.replace if d.replace is not None else t.base)
            return DeltaLinear(w, materialize(d.lora.b), materialize(d.lora.a), d.lora.scale,
                               None if d.magnitude is None else materialize(d.magnitude))
        if not isinstance(t, LoraMerged):
            return super().__call__(name)
        return LoraLinear(materialize(t.weight), [(s.r0, s.r1, materialize(s.b), materialize(s.a))
                                                  for s in t.segments])


def unmerged_getter(canonical: dict[str, Lazy]) -> UnmergedGetter:
    return UnmergedGetter(canonical)
