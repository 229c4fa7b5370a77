"""sharded_forward over split shards == the reference forward over canonical weights, for both
layouts and every valid world size, on tiny configs of several shapes."""

from __future__ import annotations

import pytest
import torch

from mixtral_convert.errors import ConvertError
from mixtral_convert.forward.reference import forward
from mixtral_convert.forward.sharded import shard_tensors, sharded_forward
from mixtral_convert.model.config import ModelConfig
from mixtral_convert.model.layouts import Plan, valid_world_sizes

B, S = 2, 7

CONFIGS = {
    # base and sparse: N in 1, 2, 4
    "KV4-E4": ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=4,
                          vocab_size=96, num_experts=4, experts_per_tok=2, rope_theta=1e6),
    # GQA; base N in 1, 2 (E=2); sparse N in 1, 2, 4 (KV=4, H=48)
    "GQA-E2": ModelConfig(dim=64, n_layers=2, head_dim=8, hidden_dim=48, n_heads=8, n_kv_heads=4,
                          vocab_size=64, num_experts=2, experts_per_tok=1, rope_theta=1e4),
    # base N in 1, 3 (E=3, KV=3); sparse N in 1, 3 (H=30)
    "odd-N3": ModelConfig(dim=48, n_layers=1, head_dim=8, hidden_dim=30, n_heads=6, n_kv_heads=3,
                          vocab_size=33, num_experts=3, experts_per_tok=2, rope_theta=1e6),
}


def random_canonical(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = {}
    for name, shape in cfg.canonical_shapes().items():
        if len(shape) == 1:
            W[name] = 1 + 0.3 * torch.randn(shape, generator=g)
        elif name == "tok_embeddings.weight":
            W[name] = torch.randn(shape, generator=g)
        else:
            scale = 3.0 if name.endswith("gate.weight") else 1.0
            W[name] = scale * torch.randn(shape, generator=g) / shape[1] ** 0.5
    return W


split = shard_tensors  # the tests' name for it


CASES = [(name, layout, N) for name, cfg in CONFIGS.items() for layout in ("base", "sparse")
         for N in valid_world_sizes(layout, cfg)]


def test_cases_cover_several_world_sizes():
    assert {(layout, N) for _, layout, N in CASES} >= {("base", 1), ("base", 2), ("base", 3), ("base", 4),
                                                       ("sparse", 1), ("sparse", 2), ("sparse", 3), ("sparse", 4)}


_REF: dict = {}


def reference(name: str):
    if name not in _REF:
        cfg = CONFIGS[name]
        W = random_canonical(cfg)
        toks = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(1))
        _REF[name] = W, toks, forward(cfg, W, toks)
    return _REF[name]


@pytest.mark.parametrize("name,layout,N", CASES, ids=[f"{n}-{lay}-N{N}" for n, lay, N in CASES])
def test_sharded_forward_matches_reference(name, layout, N):
    cfg = CONFIGS[name]
    W, toks, ref = reference(name)
    plan = Plan(layout, cfg, N, {k: v.dtype for k, v in W.items()})
    shards = split(plan, W)
    if N > 1:  # a shard really holds only part of the model
        assert sum(t.numel() for t in shards[0].values()) < sum(t.numel() for t in W.values())
    out = sharded_forward(plan, shards, toks)
    scale = ref.abs().max().item()
    diff = (out - ref).abs().max().item()
    print(f"{name} {layout} N={N}: max|logits| {scale:.3g}, max|sharded - reference| {diff:.3g}")
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert diff <= 1e-5 * max(1.0, scale)


def test_sharded_forward_bf16():
    cfg = CONFIGS["KV4-E4"]
    W, toks, ref = reference("KV4-E4")
    plan = Plan("sparse", cfg, 4, {k: v.dtype for k, v in W.items()})
    out = sharded_forward(plan, split(plan, W), toks, dtype=torch.bfloat16)
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"sharded bf16 vs reference fp32: relative Frobenius {rel:.3g}")
    assert rel < 5e-2


@pytest.mark.parametrize("layout", ["base", "sparse"])
def test_wrong_shards_are_caught(layout):
    """Swapped shards are refused (base: other experts' keys) or change the logits (sparse: same
    keys); so does a corrupted expert slice; a missing tensor is named."""
    cfg = CONFIGS["KV4-E4"]
    W, toks, ref = reference("KV4-E4")
    plan = Plan(layout, cfg, 2, {k: v.dtype for k, v in W.items()})
    shards = split(plan, W)
    if layout == "base":
        with pytest.raises(ConvertError, match="rank 0's shard has no tensor 'llma.layers.0.feed_forward.experts.0"):
            sharded_forward(plan, [shards[1], shards[0]], toks)
    else:
        swapped = sharded_forward(plan, [shards[1], shards[0]], toks)
        assert (swapped - ref).abs().max() > 1e-2
    key = "llma.layers.1.feed_forward." + ("experts.2.w2.weight" if layout == "base" else "w2")
    bad = [dict(s) for s in shards]
    r = 1 if layout == "base" else 0
    bad[r][key] = bad[r][key].flip(0)
    assert (sharded_forward(plan, bad, toks) - ref).abs().max() > 1e-3


def test_shard_shape_must_match_plan():
    cfg = CONFIGS["KV4-E4"]
    W, toks, _ = reference("KV4-E4")
    plan = Plan("sparse", cfg, 2, {k: v.dtype for k, v in W.items()})
    shards = split(plan, W)
    shards[1]["llma.layers.0.attention.wq.weight"] = shards[1]["llma.layers.0.attention.wq.weight"][:-1]
    with pytest.raises(ConvertError, match="rank 1's 'llma.layers.0.attention.wq.weight' has shape"):
        sharded_forward(plan, shards, toks)


def test_shard_count_must_match_plan():
    cfg = CONFIGS["KV4-E4"]
    W, toks, _ = reference("KV4-E4")
    plan = Plan("base", cfg, 2, {k: v.dtype for k, v in W.items()})
    with pytest.raises(ConvertError, match="2 ranks"):
        sharded_forward(plan, split(plan, W)[:1], toks)


@pytest.mark.parametrize("layout,N", [("base", 2), ("sparse", 4)])
def test_written_shards_on_disk(tmp_path, layout, N):
    """Shards written by `split` to disk, read back mmap'd, run sharded == the torrent's forward;
    and a greedy continuation through the sharded forward equals the reference one."""
    from helpers import greedy, load_lazy

    from mixtral_convert.commands.options import OutputOptions, SplitOptions
    from mixtral_convert.commands.split import split as split_cmd
    from mixtral_convert.synth import tiny_config, write_torrent

    cfg = tiny_config(n_kv_heads=4)
    src = write_torrent(tmp_path / "src", cfg, seed=2, dtype=torch.float32)
    res = split_cmd(src, SplitOptions(layout, N), output=OutputOptions(tmp_path / "out", quiet=True))
    W = load_lazy(src / "consolidated.00.pth")
    shards = [load_lazy(res.out / f"consolidated.{r:02d}-of-{N:02d}.model.pth") for r in range(N)]
    plan = Plan(layout, cfg, N, {k: v.dtype for k, v in W.items()})
    toks = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(3))
    ref = forward(cfg, W, toks)
    diff = (sharded_forward(plan, shards, toks) - ref).abs().max().item()
    print(f"on disk {layout} N={N}: max|logits| {ref.abs().max():.3g}, max diff {diff:.3g}")
    assert diff <= 1e-5 * max(1.0, ref.abs().max().item())
    tok = res.out / "tokenizer.model"
    want = greedy(cfg, W, tok, "hello", 3)
    got = greedy(cfg, None, tok, "hello", 3, forward_fn=lambda t: sharded_forward(plan, shards, t))
    assert got == want
