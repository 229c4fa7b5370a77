"""The names of llama.cpp's first MoE layout (docs/formats.md, "Old per-expert GGUFs"): one tensor per expert,
`blk.L.ffn_{gate,down,up}.E.weight`, where today's layout stacks them (formats.gguf.write). The names are the
tensor table's `gguf_per_expert` column (model.tensors), compiled by its one pattern compiler. How
formats.gguf.source reads such a file's experts, and what formats.gguf.restack restacks."""

from __future__ import annotations

from typing import Optional

from ...model import tensors

LAYOUT = "llama.cpp's per-expert layout, which today's llama.cpp no longer loads"
_RX = [(tensors.compile_pattern(r.gguf_per_expert), r) for r in tensors.TENSORS if r.gguf_per_expert]


def match(name: str) -> Optional[tuple[tensors.Row, int, int]]:
    """(the tensor table's row, layer L, expert e) of an old per-expert tensor name, else None."""
    for rx, r in _RX:
        m = rx.match(name)
        if m:
            return r, int(m["L"]), int(m["e"])
    return None


def canonical_hit(name: str):
    """(the tensor table's row, its placeholder values L and e) for an old per-expert tensor name, like
    tensors.gguf_match, else None: expert e of layer L is the row's expert e (one expert, not a stack)."""
    hit = match(name)
    return None if hit is None else (hit[0], {"L": str(hit[1]), "e": str(hit[2])})
