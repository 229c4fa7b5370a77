"""That a tensor's pieces tile it exactly: every element covered once, none twice.

Counting elements is not a proof (an overlap and a gap of the same size add up to the right
count, and the gap would then be written with whatever a reused buffer held), so the regions
are checked as intervals: the row boundaries of all pieces cut the tensor into bands, and in
each band the pieces' column intervals must follow each other from 0 to the width exactly.
"""

from __future__ import annotations

from typing import Iterable, Optional

from ..errors import ConvertError

Region = tuple[int, int, Optional[int], Optional[int]]  # rows [r0, r1), cols [c0, c1) or None for 1-D


def check_tiling(name: str, shape: tuple[int, ...], regions: Iterable[Region], fix: str) -> None:
    """Raise a ConvertError naming tensor `name` unless `regions` tile `shape` (1-D or 2-D; a
    scalar is one row) without gap or overlap; `fix` ends the message."""
    rows = shape[0] if shape else 1
    cols = shape[1] if len(shape) == 2 else None
    spans = []
    for r0, r1, c0, c1 in regions:
        c0, c1 = (0, 1) if cols is None else (c0, c1)
        if not (0 <= r0 <= r1 <= rows) or not (0 <= c0 <= c1 <= (cols or 1)):
            raise ConvertError(f"tensor '{name}' {list(shape)}: a piece [{r0}:{r1}, {c0}:{c1}] lies outside it; {fix}")
        if r0 < r1 and c0 < c1:  # an empty piece covers nothing
            spans.append((r0, r1, c0, c1))
    if rows == 0 or cols == 0:
        return
    cuts = sorted({0, rows} | {s[0] for s in spans} | {s[1] for s in spans})
    for a, b in zip(cuts, cuts[1:], strict=False):
        at = 0
        for _, _, c0, c1 in sorted((s for s in spans if s[0] < b and a < s[1]), key=lambda s: s[2:]):
            where = f"rows {a}:{b}" + ("" if cols is None else f", column {at}")
            if c0 > at:
                raise ConvertError(f"tensor '{name}' {list(shape)}: its pieces leave a gap at {where}; {fix}")
            if c0 < at:
                raise ConvertError(f"tensor '{name}' {list(shape)}: its pieces overlap at rows {a}:{b}"
                                   + ("" if cols is None else f", column {c0}") + f"; {fix}")
            at = c1
        if at != (cols or 1):
            where = f"rows {a}:{b}" + ("" if cols is None else f", column {at}")
            raise ConvertError(f"tensor '{name}' {list(shape)}: its pieces leave a gap at {where}; {fix}")
