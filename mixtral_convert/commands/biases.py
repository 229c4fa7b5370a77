"""Biases are part of the model: what a writing command does with a checkpoint that has them.

A checkpoint's biases (optional rows of the tensor table; a PEFT save's `bias_tuning`) are kept
where the output can hold them (split's mixtral_peft layout), and dropped only when every one is
zero (the same model, exactly) or when asked for (`--drop-biases`, recorded in the manifest and
the summary). A target that cannot hold them refuses a non-zero one before anything is written.
One check, here, for every command (split, split-sparse, merge's targets by `Target.holds_biases`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..errors import ConvertError
from ..formats.checkpoint import Checkpoint
from ..model import tensors


@dataclass(frozen=True)
class Dropped:
    """Non-zero biases left out with --drop-biases: how many, the first, its largest |value|."""

    count: int
    first: str
    max_abs: float

    def as_dict(self) -> dict:
        return {"count": self.count, "first": self.first, "max_abs": self.max_abs}

    def note(self) -> str:
        return (f"--drop-biases: {self.count} non-zero bias tensor(s) left out (first '{self.first}'; largest "
                f"|value| {self.max_abs:.3g}); the output is NOT the source's model: verify --forward measures by how "
                "much")


def bias_names(ck: Checkpoint) -> list[str]:
    return [k for k in ck.canonical if (m := tensors.match(k)) is not None and m[0].optional]


def _max_abs(t) -> float:
    return max((float(b.float().abs().max()) for b in t.blocks() if b.numel()), default=0.0)


def nonzero(ck: Checkpoint) -> list[tuple[str, float]]:
    """(name, max |value|) of every bias that is not all zeros, in the table's order (reads only biases)."""
    out = []
    for k in bias_names(ck):
        v = _max_abs(ck.canonical[k])
        if v != 0 or any(torch.isnan(b).any() for b in ck.canonical[k].blocks()):
            out.append((k, v))
    return out


def settle(ck: Checkpoint, holds_biases: bool, drop: bool, target: str) -> tuple[Checkpoint, bool, Optional[Dropped]]:
    """(the checkpoint to write, whether it keeps biases, what --drop-biases dropped). Zero biases are
    left out (nothing changes); non-zero ones are kept where `holds_biases`, dropped with `drop`, and
    otherwise refused, naming the first and what to do instead."""
    names = bias_names(ck)
    if not names:
        return ck, False, None
    found = nonzero(ck)
    if not found:
        return _without(ck, names), False, None
    if holds_biases:
        return ck, True, None
    name, value = found[0]
    if not drop:
        raise ConvertError(f"{ck.where}: tensor '{name}' is a non-zero bias (max |value| {value:.3g}; {len(found)} "
                           f"non-zero bias tensor(s) in all), and {target} has no biases: writing it would change "
                           "the model. Use `split` (its mixtral_peft output keeps them), or pass --drop-biases to "
                           "write it without them (verify --forward then measures the difference)")
    return _without(ck, names), False, Dropped(len(found), name, max(v for _, v in found))


def _without(ck: Checkpoint, names) -> Checkpoint:
    drop = set(names)
    return replace(ck, canonical={k: v for k, v in ck.canonical.items() if k not in drop})
