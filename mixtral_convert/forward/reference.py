"""A minimal reference Mixtral forward over canonical (torrent-named) weights, plain torch.

docs/parity.md, "The reference forward". The full model does not fit in memory, so `forward` runs layer by layer:
it asks `weights` for one layer's tensors, moves them to device/dtype, runs the layer and drops
them. `weights` is anything that gives a canonical name's tensor: a mapping, an object with
`.get(name)`, or a callable `name -> tensor`.

The layer pieces (`attention`, `moe`) are written so that they also compute one tensor-parallel
rank's *partial* contribution from a slice of the weights:
- `attention` takes any subset of heads: wq rows of some query heads, wk/wv rows of the KV heads
  those query heads use, wo the matching columns. Its output is that subset's share of wo · attn;
  summing the shares over a partition of the heads gives the full output.
- `moe` takes any subset of experts, each possibly sliced along the FFN dim (w1/w3 rows, w2
  columns). Routing always uses the full (replicated) gate. Summing over a partition of the
  experts and/or FFN dim gives the full output.
Norms, rotary and softmaxes are computed in float32; matmuls in the requested dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Optional

import torch
import torch.nn.functional as F

from ..model import tensors
from ..model.config import ModelConfig
from ..model.rope import RopeScaling

Getter = Callable[[str], torch.Tensor]
# One expert's (possibly sliced) weights: (global expert index, w1 [h, D], w2 [D, h], w3 [h, D]).
Expert = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]


def as_getter(weights) -> Getter:
    """`name -> tensor` from a mapping, an object with .get(name), or a callable."""
    if isinstance(weights, Mapping):
        return weights.__getitem__
    get = getattr(weights, "get", None)
    if callable(get):
        return get
    if callable(weights):
        return weights
    raise TypeError(f"weights must be a mapping, have .get(name), or be callable; got {type(weights).__name__}")


# ----- building blocks -----------------------------------------------------------------------

def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x * rsqrt(mean(x^2) + eps), in float32, cast back to x's dtype."""
    xf = x.float()
    y = w.float() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype)


def rope_angles(n_pos: int, head_dim: int, theta: float, device="cpu",
                scaling: Optional[RopeScaling] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n_pos, head_dim/2] (float32) for positions 0..n_pos-1; freqs_i = theta^(-2i/hd), divided
    by the factor of linear scaling (model.rope) as transformers does."""
    i = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device)
    freqs = theta ** (-i / head_dim)
    if scaling is not None:
        freqs = freqs / scaling.factor
    angles = torch.arange(n_pos, dtype=torch.float64, device=device)[:, None] * freqs[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of each head. x [B, S, n, hd]; cos/sin [S, hd/2]."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((a * c - b * s, a * s + b * c), dim=-1)
    return out.reshape(x.shape).to(x.dtype)


def linear(x: torch.Tensor, w, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x W^T (+ b): `w` a tensor, or anything with `apply(x)` (a LoRA linear computed unmerged, forward.peft)."""
    y = w.apply(x) if hasattr(w, "apply") else x @ w.T
    return y if b is None else y + b


def attention(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor,
              *, head_dim: int, cos: torch.Tensor, sin: torch.Tensor, biases: Optional[dict] = None) -> torch.Tensor:
    """Causal GQA self-attention of a subset of heads; returns their share of the output [B, S, D].

    x [B, S, D] (already normed); wq [nq*hd, D]; wk, wv [nkv*hd, D]; wo [D, nq*hd]. Query head j of
    the subset uses KV head j // (nq/nkv) of the subset, as in the full model when the subset is
    a run of whole KV groups (every tensor-parallel split is). `biases`: the subset's wq/wk/wv biases by
    short name, where the model has them; wo's bias is the caller's to add once, after the sum of the shares.
    """
    b = biases or {}
    B, S, _ = x.shape
    nq, nkv = wq.shape[0] // head_dim, wk.shape[0] // head_dim
    if nq * head_dim != wq.shape[0] or nkv * head_dim != wk.shape[0] or nq % nkv:
        raise ValueError(f"attention: wq {tuple(wq.shape)} / wk {tuple(wk.shape)} do not hold whole "
                         f"head groups of head_dim {head_dim}")
    q = apply_rope(linear(x, wq, b.get("wq")).view(B, S, nq, head_dim), cos, sin)
    k = apply_rope(linear(x, wk, b.get("wk")).view(B, S, nkv, head_dim), cos, sin)
    v = linear(x, wv, b.get("wv")).view(B, S, nkv, head_dim)
    rep = nq // nkv
    k = k.repeat_interleave(rep, dim=2)            # [B, S, nq, hd]
    v = v.repeat_interleave(rep, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, nq, S, hd]
    scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(head_dim)
    causal = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(x.dtype)
    out = (probs @ v).transpose(1, 2).reshape(B, S, nq * head_dim)
    return linear(out, wo)


def route(x: torch.Tensor, gate: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: (weights [T, k] float32, renormalized to sum 1; expert indices [T, k])."""
    p = torch.softmax(linear(x, gate).float(), dim=-1)
    top_p, top_e = torch.topk(p, k, dim=-1)
    return top_p / top_p.sum(-1, keepdim=True), top_e


def expert_ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
               b1=None, b2=None, b3=None) -> torch.Tensor:
    """w2(silu(w1 x + b1) * (w3 x + b3)) + b2; with w1/w3 rows and w2 columns sliced, the slice's partial
    output (biases only on whole experts)."""
    return linear(F.silu(linear(x, w1, b1)) * linear(x, w3, b3), w2, b2)


def moe(x: torch.Tensor, gate: torch.Tensor, experts: Iterable[Expert], k: int) -> torch.Tensor:
    """Sparse MoE over the given (possibly partial) experts; returns their share [.., D].

    x [..., D] (already normed); gate [E, D] the full router; experts: (e, w1, w2, w3) with e the
    global expert index. Each token's share from expert e is p_e * w2_e(silu(w1_e x) * w3_e x) if e
    is among its top k, else nothing. Accumulated in float32, returned in x's dtype.
    """
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    top_p, top_e = route(x, gate, k)
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e, *w in experts:  # (e, w1, w2, w3) or (e, w1, w2, w3, b1, b2, b3)
        tok, slot = torch.nonzero(top_e == e, as_tuple=True)
        if tok.numel():
            out = expert_ffn(x[tok], *w).float()
            y.index_add_(0, tok, out * top_p[tok, slot, None])
        del w  # let a lazily loaded expert go before the next one loads
    return y.to(x.dtype).reshape(shape)


# ----- the full forward ---------------------------------------------------------------------

def layer_names(L: int) -> dict[str, str]:
    """Short name -> canonical name of layer L's non-expert tensors (the tensor table's short names)."""
    return tensors.layer_names(L)


def expert_name(L: int, e: int, w: str) -> str:
    """Canonical name of layer L's expert e's w ('w1', 'w2' or 'w3')."""
    return tensors.expert_name(L, e, w)


@torch.no_grad()
def forward(cfg: ModelConfig, weights, tokens: torch.Tensor, *, dtype: torch.dtype = torch.float32,
            device="cpu") -> torch.Tensor:
    """float32 logits [B, S, V] of tokens [B, S], holding one layer's weights at a time. Biases are used
    where `weights` holds them (`name in weights`: a mapping or a TensorGetter)."""
    get = as_getter(weights)

    def load(name: str) -> torch.Tensor:
        return get(name).to(device=device, dtype=dtype)

    has = getattr(weights, "__contains__", None)  # the optional biases (model.tensors) are asked for where held

    def load_bias(weight: str) -> Optional[torch.Tensor]:
        name = tensors.bias_name(weight)
        return load(name) if has is not None and has(name) else None

    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, S], got shape {tuple(tokens.shape)}")
    cos, sin = rope_angles(tokens.shape[1], cfg.head_dim, cfg.rope_theta, device=device, scaling=cfg.rope_scaling)

    # Embedding: gather only the rows needed.
    h = get("tok_embeddings.weight")[tokens.cpu()].to(device=device, dtype=dtype)

    for L in range(cfg.n_layers):
        names = layer_names(L)
        w = {key: load(name) for key, name in names.items()}
        b = {m: load_bias(names[m]) for m in ("wq", "wk", "wv", "wo")}
        x = rms_norm(h, w["attention_norm"], cfg.norm_eps)
        a = attention(x, w["wq"], w["wk"], w["wv"], w["wo"], head_dim=cfg.head_dim, cos=cos, sin=sin, biases=b)
        h = h + (a if b["wo"] is None else a + b["wo"])
        x = rms_norm(h, w["ffn_norm"], cfg.norm_eps)
        # A generator: moe() loads one expert at a time and drops it before the next.
        experts = ((e, *(load(expert_name(L, e, m)) for m in ("w1", "w2", "w3")),
                    *_expert_biases([load_bias(expert_name(L, e, m)) for m in ("w1", "w2", "w3")]))
                   for e in range(cfg.num_experts))
        h = h + moe(x, w["gate"], experts, cfg.experts_per_tok)
        del w, x

    h = rms_norm(h, load("norm.weight"), cfg.norm_eps)
    return linear(h, load("output.weight")).float()


def _expert_biases(b: list) -> list:
    """An expert's (b1, b2, b3) where it has any, else nothing (the plain expert)."""
    return b if any(t is not None for t in b) else []

