"""Tiny random transformers Mixtral models and their weights under hub / canonical names.

transformers 5.x keeps Mixtral's experts fused in memory: `model.layers.{L}.mlp.gate.weight`,
`mlp.experts.gate_up_proj` [E, 2H, D] (w1 rows then w3 rows) and `mlp.experts.down_proj`
[E, D, H] (= w2); its loader renames the hub's `block_sparse_moe.experts.{e}.w1/w2/w3.weight`
into those. `hub_state_dict` undoes that, so tests go through the hub names that
mixtral_convert.model.names maps. rope_theta lives in `rope_parameters["rope_theta"]`.
"""

from __future__ import annotations

import torch
import transformers

from mixtral_convert.model import names as hfnames
from mixtral_convert.model.config import ModelConfig


def tiny_cfg(**over) -> ModelConfig:
    base = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2,
                vocab_size=101, num_experts=4, experts_per_tok=2, norm_eps=1e-5, rope_theta=1e6)
    base.update(over)
    return ModelConfig(**base)


def hf_model(cfg: ModelConfig, seed: int = 0, rope_parameters=None):
    """A random MixtralForCausalLM for cfg, weights scaled so attention and routing are not flat;
    `rope_parameters` replaces the default (no scaling, cfg's theta)."""
    hcfg = transformers.MixtralConfig(
        hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size, num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_tok, rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=False,
    )
    hcfg._attn_implementation = "eager"
    model = transformers.MixtralForCausalLM(hcfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:        # norms: around 1, not exactly 1, so a misplaced norm shows
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:                   # fan-in scaling; the router a bit sharper
                scale = 3.0 if name.endswith("mlp.gate.weight") else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def hub_state_dict(model, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The in-memory (5.x fused-expert) state dict under the hub checkpoint's names."""
    H = cfg.hidden_dim
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("mlp.experts.gate_up_proj"):
            p = k[: -len("mlp.experts.gate_up_proj")] + "block_sparse_moe.experts."
            for e in range(v.shape[0]):
                out[p + f"{e}.w1.weight"] = v[e, :H]
                out[p + f"{e}.w3.weight"] = v[e, H:]
        elif k.endswith("mlp.experts.down_proj"):
            p = k[: -len("mlp.experts.down_proj")] + "block_sparse_moe.experts."
            for e in range(v.shape[0]):
                out[p + f"{e}.w2.weight"] = v[e]
        else:
            out[k.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = v
    return out


def canonical_from_hub(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for hf_name, W in sd.items():
        name = hfnames.hf_to_canonical(hf_name)
        assert name is not None, hf_name
        out[name] = hfnames.from_hf_tensor(name, W, cfg).contiguous()
    return out
