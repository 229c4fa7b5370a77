"""The names of llama.cpp's first MoE layout (docs/formats.md, "Old per-expert GGUFs"): one tensor per expert,
`blk.L.ffn_{gate,down,up}.E.weight`, where today's layout stacks them (formats.gguf.write). How
formats.gguf.source reads such a file's experts, and what formats.gguf.restack restacks."""

from __future__ import annotations

import re

from ...model import tensors

PER_EXPERT_RE = re.compile(r"blk\.(?P<L>\d+)\.ffn_(?P<kind>gate|down|up)\.(?P<e>\d+)\.weight\Z")
CANONICAL = {"gate": "w1", "down": "w2", "up": "w3"}  # the short name (model.tensors) of each kind
LAYOUT = "llama.cpp's per-expert layout, which today's llama.cpp no longer loads"


def canonical_hit(name: str):
    """(the tensor table's row, its placeholder values L and e) for an old per-expert tensor name, like
    tensors.gguf_match, else None: expert e of layer L is the row's expert e (one expert, not a stack)."""
    m = PER_EXPERT_RE.match(name)
    if m is None:
        return None
    return tensors.row(CANONICAL[m["kind"]]), {"L": m["L"], "e": str(int(m["e"]))}
