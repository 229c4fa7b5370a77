"""HF hub tensor names <-> canonical (torrent) names, and the q/k rotary permutation.

docs/formats.md, "HF hub layout". The table covers the hub checkpoint names
(`model.layers.{L}.block_sparse_moe.experts.{e}.w1.weight`, ...), i.e. what is stored in
`model.safetensors`; transformers >= 5 fuses the experts in memory (`mlp.experts.gate_up_proj`),
which is NOT what this table describes.

HF's q_proj and k_proj rows are permuted for its rotate-half rotary: reading an HF checkpoint
needs `permute_qk_from_hf(W, n)` on them (n = n_heads for q, n_kv_heads for k), writing one
needs `permute_qk_to_hf`.
"""

from __future__ import annotations

import re

import torch

# (canonical pattern, HF hub pattern); `{L}` = layer index, `{e}` = expert index.
NAME_TABLE: tuple[tuple[str, str], ...] = (
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("layers.{L}.attention.wq.weight", "model.layers.{L}.self_attn.q_proj.weight"),
    ("layers.{L}.attention.wk.weight", "model.layers.{L}.self_attn.k_proj.weight"),
    ("layers.{L}.attention.wv.weight", "model.layers.{L}.self_attn.v_proj.weight"),
    ("layers.{L}.attention.wo.weight", "model.layers.{L}.self_attn.o_proj.weight"),
    ("layers.{L}.attention_norm.weight", "model.layers.{L}.input_layernorm.weight"),
    ("layers.{L}.ffn_norm.weight", "model.layers.{L}.post_attention_layernorm.weight"),
    ("layers.{L}.feed_forward.gate.weight", "model.layers.{L}.block_sparse_moe.gate.weight"),
    ("layers.{L}.feed_forward.experts.{e}.w1.weight", "model.layers.{L}.block_sparse_moe.experts.{e}.w1.weight"),
    ("layers.{L}.feed_forward.experts.{e}.w2.weight", "model.layers.{L}.block_sparse_moe.experts.{e}.w2.weight"),
    ("layers.{L}.feed_forward.experts.{e}.w3.weight", "model.layers.{L}.block_sparse_moe.experts.{e}.w3.weight"),
)

# Canonical patterns whose rows HF permutes, and the ModelConfig field giving n.
PERMUTED_QK: dict[str, str] = {
    "layers.{L}.attention.wq.weight": "n_heads",
    "layers.{L}.attention.wk.weight": "n_kv_heads",
}


def _regex(pattern: str) -> re.Pattern:
    rx = re.escape(pattern).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(rx + r"\Z")


_CANON_RX = [(_regex(c), c, h) for c, h in NAME_TABLE]
_HF_RX = [(_regex(h), c, h) for c, h in NAME_TABLE]


def _match(name: str, table) -> tuple[str, str, dict[str, str]] | None:
    for rx, canon, hf in table:
        m = rx.match(name)
        if m:
            return canon, hf, m.groupdict()
    return None


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


def permute_qk_to_hf(W: torch.Tensor, n: int) -> torch.Tensor:
    """Meta (adjacent-pair rotary) row order -> HF (rotate-half) row order, per head."""
    R, D = W.shape
    return W.reshape(n, R // n // 2, 2, D).transpose(1, 2).reshape(R, D)


def permute_qk_from_hf(W: torch.Tensor, n: int) -> torch.Tensor:
    """HF (rotate-half) row order -> Meta (adjacent-pair rotary) row order; inverse of to_hf."""
    R, D = W.shape
    return W.reshape(n, 2, R // n // 2, D).transpose(1, 2).reshape(R, D)


def from_hf_tensor(name: str, W: torch.Tensor, cfg) -> torch.Tensor:
    """An HF tensor, already known under canonical `name`, in canonical row order."""
    n = qk_heads(name, cfg)
    return W if n is None else permute_qk_from_hf(W, n)
