"""HF hub tensor names <-> canonical (torrent) names, and the q/k rotary permutation; the names
and which rows are permuted come from the tensor table (model.tensors).

docs/formats.md, "HF hub layout". The table covers the hub checkpoint names
(`model.layers.{L}.block_sparse_moe.experts.{e}.w1.weight`, ...), i.e. what is stored in
`model.safetensors`; transformers >= 5 fuses the experts in memory (`mlp.experts.gate_up_proj`),
which is NOT what this table describes.

HF's q_proj and k_proj rows are permuted for its rotate-half rotary: one operation, `qk_gather`,
gives the row gather in either direction (n = n_heads for q, n_kv_heads for k; from HF, the
inverse of the gather to HF), and refuses a row count it cannot split into n heads of two halves
(`permute_qk_to_hf` / `permute_qk_from_hf` apply it to a tensor in memory).
"""

from __future__ import annotations

import torch

from ..errors import ConvertError
from . import tensors
from .tensors import compile_pattern

# (canonical pattern, HF hub pattern), from the tensor table; `{L}` = layer index, `{e}` = expert index.
NAME_TABLE: tuple[tuple[str, str], ...] = tuple((c, h) for c, h in tensors.hf_pairs() if c is not None)

# Canonical patterns whose rows HF permutes, and the ModelConfig field giving n.
PERMUTED_QK: dict[str, str] = {r.pattern: r.permute for r in tensors.TENSORS if r.permute}

_CANON_RX = [(compile_pattern(c), c, h) for c, h in NAME_TABLE]
_HF_RX = [(compile_pattern(h), c, h) for c, h in NAME_TABLE]
_IGNORED_RX = [compile_pattern(h) for c, h in tensors.hf_pairs() if c is None]


def _match(name: str, table) -> tuple[str, str, dict[str, str]] | None:
    for rx, canon, hf in table:
        m = rx.match(name)
        if m:
            return canon, hf, m.groupdict()
    return None


def hf_ignored(hf_name: str) -> bool:
    """Whether an HF name is one the table drops (a buffer, not a weight of the model)."""
    return any(rx.match(hf_name) for rx in _IGNORED_RX)


def hf_to_canonical(hf_name: str) -> str | None:
    """Canonical name of an HF hub tensor name, or None when the name is not in the table."""
    hit = _match(hf_name, _HF_RX)
    return None if hit is None else hit[0].format(**hit[2])


def canonical_to_hf(name: str) -> str | None:
    """HF hub name of a canonical tensor name, or None when the name is not in the table."""
    hit = _match(name, _CANON_RX)
    return None if hit is None else hit[1].format(**hit[2])


def qk_heads(name: str, cfg) -> int | None:
    """n for the q/k permutation of canonical tensor `name` (n_heads / n_kv_heads), else None."""
    hit = _match(name, _CANON_RX)
    if hit is None or hit[0] not in PERMUTED_QK:
        return None
    return int(getattr(cfg, PERMUTED_QK[hit[0]]))


def qk_gather(rows: int, n: int, to_hf: bool, name: str = "?") -> torch.Tensor:
    """The row gather of the q/k permutation, out[i] = W[gather[i]]: Meta's (adjacent-pair rotary)
    order to HF's (rotate-half), per head, or (not `to_hf`) its inverse. A ConvertError naming
    the tensor when its rows are not n heads of an even number of rows: the permutation pairs each
    head's rows in two halves, and such a tensor cannot be permuted, nor a permuted one undone."""
    if n <= 0 or rows % (2 * n):
        raise ConvertError(f"tensor '{name}': {rows} rows are not {n} heads of an even head_dim, so HF's q/k "
                           "permutation (rotate-half rotary) cannot be applied or undone; check the config's "
                           "head count and head_dim")
    order = torch.arange(rows).reshape(n, rows // n // 2, 2).transpose(1, 2).reshape(rows)
    return order if to_hf else torch.argsort(order)


def permute_qk_to_hf(W: torch.Tensor, n: int) -> torch.Tensor:
    """Meta (adjacent-pair rotary) row order -> HF (rotate-half) row order, per head."""
    return W.index_select(0, qk_gather(W.shape[0], n, True))


def permute_qk_from_hf(W: torch.Tensor, n: int) -> torch.Tensor:
    """HF (rotate-half) row order -> Meta (adjacent-pair rotary) row order; inverse of to_hf."""
    return W.index_select(0, qk_gather(W.shape[0], n, False))


def from_hf_tensor(name: str, W: torch.Tensor, cfg) -> torch.Tensor:
    """An HF tensor, already known under canonical `name`, in canonical row order."""
    n = qk_heads(name, cfg)
    return W if n is None else permute_qk_from_hf(W, n)
