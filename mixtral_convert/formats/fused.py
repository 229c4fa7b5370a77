"""Mistral's fused `block_sparse_moe` layout (docs/formats.md, "Mistral fused files") as canonical lazy tensors.

Per layer, `block_sparse_moe.w1` and `.w3` are [E*H, D] with expert e in rows e*H:(e+1)*H,
and `block_sparse_moe.w2` is [E*H, D] with rows e*H:(e+1)*H the TRANSPOSE of expert e's w2.
So expert e's w1/w3 are row views of the fused tensor and its w2 a transposed row view: no
data is read or copied here. Every other key has its torrent name.
"""

from __future__ import annotations

import re

import torch

from ..errors import ConvertError
from ..model.config import ModelConfig

_FUSED = re.compile(r"layers\.(\d+)\.block_sparse_moe\.(w1|w2|w3|gate\.weight)\Z")


def is_fused(names) -> bool:
    return any(_FUSED.match(n) for n in names)


def unfuse(cfg: ModelConfig, tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Canonical name -> (view of) tensor; names that are not fused pass through unchanged."""
    E, H, D = cfg.num_experts, cfg.hidden_dim, cfg.dim
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        m = _FUSED.match(name)
        if m is None:
            out[name] = t
            continue
        L, w = m.group(1), m.group(2)
        prefix = f"layers.{L}.feed_forward."
        if w == "gate.weight":
            out[prefix + "gate.weight"] = t
            continue
        if tuple(t.shape) != (E * H, D):
            raise ConvertError(f"{where}: tensor '{name}' has shape {list(t.shape)}, the config implies "
                               f"[{E * H}, {D}] (num_experts * hidden_dim, dim); the checkpoint and its "
                               "params.json disagree")
        for e in range(E):
            rows = t[e * H:(e + 1) * H]
            out[prefix + f"experts.{e}.{w}.weight"] = rows.t() if w == "w2" else rows
    return out
