"""The reference forward (mixtral_convert.forward.reference) against transformers' MixtralForCausalLM, and
the partial (tensor-parallel) computations against the full ones.

transformers 5.x keeps Mixtral's experts fused in memory: `model.layers.{L}.mlp.gate.weight`,
`mlp.experts.gate_up_proj` [E, 2H, D] (w1 rows then w3 rows) and `mlp.experts.down_proj`
[E, D, H] (= w2); its loader renames the hub's `block_sparse_moe.experts.{e}.w1/w2/w3.weight`
into those. `hf_tiny.hub_state_dict` undoes that, so the test goes through the hub names that
mixtral_convert.model.names maps.
"""

from __future__ import annotations

import pytest
import torch

from mixtral_convert.forward.reference import attention, expert_name, forward, moe, rms_norm, rope_angles, route
from mixtral_convert.model import names as hfnames
from mixtral_convert.model.config import ModelConfig

transformers = pytest.importorskip("transformers")

from hf_tiny import canonical_from_hub, hf_model, hub_state_dict, tiny_cfg  # noqa: E402

B, S = 2, 9


def tokens_for(cfg: ModelConfig, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))


_CACHE: dict = {}


def reference(cfg: ModelConfig):
    """(canonical weights, tokens, HF logits) for cfg, cached per config."""
    if cfg not in _CACHE:
        model = hf_model(cfg)
        W = canonical_from_hub(hub_state_dict(model, cfg), cfg)
        toks = tokens_for(cfg)
        with torch.no_grad():
            ref = model(toks).logits.float()
        _CACHE[cfg] = (W, toks, ref)
    return _CACHE[cfg]


GQA = [
    pytest.param(tiny_cfg(), id="NH4-KV2"),
    pytest.param(tiny_cfg(n_kv_heads=1), id="NH4-KV1"),
    pytest.param(tiny_cfg(n_kv_heads=4), id="NH4-KV4"),
    pytest.param(tiny_cfg(head_dim=8), id="NH4-KV2-hd8"),  # head_dim != dim / n_heads
]


# ----- names and the q/k permutation --------------------------------------------------------

def test_permutations_inverse_and_formula():
    g = torch.Generator().manual_seed(0)
    for n, hd, D in [(4, 16, 64), (2, 8, 12), (1, 4, 3), (8, 128, 5)]:
        W = torch.randn(n * hd, D, generator=g)
        R = n * hd
        to = hfnames.permute_qk_to_hf(W, n)
        assert torch.equal(to, W.view(n, R // n // 2, 2, D).transpose(1, 2).reshape(R, D))
        assert torch.equal(hfnames.permute_qk_from_hf(to, n), W)
        assert torch.equal(hfnames.permute_qk_to_hf(hfnames.permute_qk_from_hf(W, n), n), W)
        assert not torch.equal(to, W) or hd == 2


def test_name_table_covers_every_tensor_both_ways():
    cfg = tiny_cfg()
    hub = hub_state_dict(hf_model(cfg), cfg)
    canon = set(cfg.canonical_shapes())
    assert {hfnames.hf_to_canonical(k) for k in hub} == canon
    for name in canon:
        hf = hfnames.canonical_to_hf(name)
        assert hf in hub and hfnames.hf_to_canonical(hf) == name
        assert tuple(hub[hf].shape) == cfg.canonical_shapes()[name]
    assert hfnames.hf_to_canonical("model.layers.0.mlp.experts.gate_up_proj") is None
    assert hfnames.canonical_to_hf("layers.0.attention.wq.weightx") is None
    assert hfnames.qk_heads("layers.3.attention.wq.weight", cfg) == 4
    assert hfnames.qk_heads("layers.3.attention.wk.weight", cfg) == 2
    assert hfnames.qk_heads("layers.3.attention.wv.weight", cfg) is None


# ----- the full forward against transformers ------------------------------------------------

@pytest.mark.parametrize("cfg", GQA)
def test_forward_matches_transformers(cfg):
    W, toks, ref = reference(cfg)
    out = forward(cfg, W, toks)
    assert out.dtype == torch.float32 and out.shape == (B, S, cfg.vocab_size)
    scale = ref.abs().max().item()
    diff = (out - ref).abs().max().item()
    print(f"max|logits| {scale:.3g}  max|ours - transformers| {diff:.3g}")
    assert scale > 1.0                      # not trivially small logits
    assert diff <= 1e-5 * max(1.0, scale)


def test_forward_bf16_close_to_fp32():
    """bf16 matmuls (norms/softmax in fp32): relative error of the logits below 5e-2."""
    cfg = tiny_cfg()
    W, toks, ref = reference(cfg)
    bf = forward(cfg, W, toks, dtype=torch.bfloat16)
    fp = forward(cfg, W, toks)
    assert bf.dtype == torch.float32
    rel = ((bf - fp).norm() / fp.norm()).item()
    rel_max = ((bf - fp).abs().max() / fp.abs().max()).item()
    print(f"bf16 vs fp32: relative Frobenius {rel:.3g}, max abs / max|logit| {rel_max:.3g}")
    assert rel < 5e-2 and rel_max < 1e-1
    # and the bf16 result is not simply the fp32 one
    assert not torch.equal(bf, fp)


def test_forward_loads_layer_by_layer():
    """weights may be a callable / .get object; names are asked for in layer order, once each."""
    cfg = tiny_cfg()
    W, toks, ref = reference(cfg)
    asked: list[str] = []

    class Source:
        def get(self, name):
            asked.append(name)
            return W[name]

    out = forward(cfg, Source(), toks)
    assert torch.equal(out, forward(cfg, lambda n: W[n], toks))
    assert sorted(asked) == sorted(W) and len(asked) == len(set(asked))
    layers = [int(n.split(".")[1]) for n in asked if n.startswith("layers.")]
    assert layers == sorted(layers)
    assert asked[0] == "tok_embeddings.weight" and asked[-1] == "output.weight"


# ----- partial computations sum to the full one ---------------------------------------------

def _layer0_input(cfg, W, toks):
    """Normed input of layer 0's attention, and rope tables."""
    h = W["tok_embeddings.weight"][toks]
    cos, sin = rope_angles(S, cfg.head_dim, cfg.rope_theta)
    return rms_norm(h, W["layers.0.attention_norm.weight"], cfg.norm_eps), cos, sin


@pytest.mark.parametrize("cfg", GQA)
@pytest.mark.parametrize("groups", [2, 4])
def test_attention_head_subsets_sum_to_full(cfg, groups):
    W, toks, _ = reference(cfg)
    x, cos, sin = _layer0_input(cfg, W, toks)
    hd, NH, KV = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    wq, wk, wv, wo = (W[f"layers.0.attention.{m}.weight"] for m in ("wq", "wk", "wv", "wo"))
    full = attention(x, wq, wk, wv, wo, head_dim=hd, cos=cos, sin=sin)
    parts = []
    for g in range(groups):
        q0, q1 = g * NH // groups, (g + 1) * NH // groups        # query heads of this group
        k0 = q0 * KV // NH                                       # their KV heads
        k1 = max(k0 + 1, q1 * KV // NH)
        parts.append(attention(x, wq[q0 * hd:q1 * hd], wk[k0 * hd:k1 * hd], wv[k0 * hd:k1 * hd],
                               wo[:, q0 * hd:q1 * hd], head_dim=hd, cos=cos, sin=sin))
    diff = (sum(parts) - full).abs().max().item()
    print(f"heads in {groups} groups: max diff {diff:.3g} (max|full| {full.abs().max():.3g})")
    assert diff <= 1e-5 * max(1.0, full.abs().max().item())


@pytest.mark.parametrize("e_groups,h_slices", [(2, 1), (1, 2), (2, 2), (4, 3)])
def test_moe_expert_and_ffn_subsets_sum_to_full(e_groups, h_slices):
    cfg = tiny_cfg()
    W, toks, _ = reference(cfg)
    x = torch.randn(B, S, cfg.dim, generator=torch.Generator().manual_seed(5))
    gate = W["layers.1.feed_forward.gate.weight"]
    E, H, K = cfg.num_experts, cfg.hidden_dim, cfg.experts_per_tok

    def ex(e, h0=0, h1=H):
        w1, w2, w3 = (W[expert_name(1, e, m)] for m in ("w1", "w2", "w3"))
        return e, w1[h0:h1], w2[:, h0:h1], w3[h0:h1]

    full = moe(x, gate, [ex(e) for e in range(E)], K)
    parts = []
    for g in range(e_groups):
        for s in range(h_slices):
            h0, h1 = s * H // h_slices, (s + 1) * H // h_slices
            parts.append(moe(x, gate, [ex(e, h0, h1) for e in range(g * E // e_groups, (g + 1) * E // e_groups)], K))
    diff = (sum(parts) - full).abs().max().item()
    print(f"experts in {e_groups} groups x FFN in {h_slices} slices: max diff {diff:.3g}")
    assert diff <= 1e-5 * max(1.0, full.abs().max().item())
    # every expert is used by some token, so each group's part is not zero
    assert all(p.abs().max() > 0 for p in parts)


def test_moe_matches_dense_definition():
    """moe() against a dense per-token loop written straight from FORMATS §7."""
    cfg = tiny_cfg()
    W, _, _ = reference(cfg)
    x = torch.randn(7, cfg.dim, generator=torch.Generator().manual_seed(6))
    gate = W["layers.0.feed_forward.gate.weight"]
    experts = [(e, *(W[expert_name(0, e, m)] for m in ("w1", "w2", "w3"))) for e in range(cfg.num_experts)]
    got = moe(x, gate, experts, cfg.experts_per_tok)
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        p = torch.softmax(gate @ x[t], -1)
        top = torch.topk(p, cfg.experts_per_tok)
        for pk, e in zip(top.values / top.values.sum(), top.indices.tolist(), strict=True):
            _, w1, w2, w3 = experts[e]
            want[t] += pk * (w2 @ (torch.nn.functional.silu(w1 @ x[t]) * (w3 @ x[t])))
    assert (got - want).abs().max() <= 1e-5
    wts, idx = route(x, gate, cfg.experts_per_tok)
    assert torch.allclose(wts.sum(-1), torch.ones(7)) and idx.shape == (7, cfg.experts_per_tok)
