"""Mistral's fused `block_sparse_moe` layout (docs/formats.md, "Mistral fused files") as canonical lazy tensors.

Per layer, `block_sparse_moe.w1` and `.w3` are [E*H, D] with expert e in rows e*H:(e+1)*H,
and `block_sparse_moe.w2` is [E*H, D] with rows e*H:(e+1)*H the TRANSPOSE of expert e's w2.
So expert e's w1/w3 are row views of the fused tensor and its w2 a transposed row view: no
data is read or copied here. Every other key has its torrent name. The fused names are the
tensor table's `fused` column (model.tensors).
"""

from __future__ import annotations

import torch

from ..errors import ConvertError
from ..model.config import ModelConfig
from ..model.tensors import compile_pattern, fused_rows

_FUSED = [(compile_pattern(r.fused), r) for r in fused_rows()]


def _fused(name: str):
    for rx, row in _FUSED:
        m = rx.match(name)
        if m:
            return row, m.groupdict()
    return None


def is_fused(names) -> bool:
    return any(_fused(n) for n in names)


def unfuse(cfg: ModelConfig, tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Canonical name -> (view of) tensor; names that are not fused pass through unchanged."""
    E, H, D = cfg.num_experts, cfg.hidden_dim, cfg.dim
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        hit = _fused(name)
        if hit is None:
            out[name] = t
            continue
        row, m = hit
        if not row.per_expert:
            out[row.pattern.format(**m)] = t
            continue
        if tuple(t.shape) != (E * H, D):
            raise ConvertError(f"{where}: tensor '{name}' has shape {list(t.shape)}, the config implies "
                               f"[{E * H}, {D}] (num_experts * hidden_dim, dim); the checkpoint and its "
                               "params.json disagree")
        for e in range(E):
            rows = t[e * H:(e + 1) * H]
            out[row.pattern.format(e=e, **m)] = rows.t() if row.fused_transposed else rows
    return out
