"""The same forwards with --device cuda: sharded vs reference on the GPU, bf16 and fp32, both
layouts, N in {1, 2, 4, 8}; verify --forward on cuda; --distributed over NCCL where there are
enough GPUs. Marked `gpu`; skipped without CUDA."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import WIDE, cli, load

from mixtral_convert.forward.parity import TOLERANCES, ParityReport, compare
from mixtral_convert.forward.reference import forward
from mixtral_convert.forward.sharded import sharded_forward
from mixtral_convert.model.layouts import Plan
from mixtral_convert.synth import materialize, tiny_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CASES = [(layout, N, dtype) for layout in ("base", "sparse") for N in (1, 2, 4, 8)
         for dtype in ("float32", "bfloat16")]


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(**WIDE)
    W = {k: v.to(torch.bfloat16) for k, v in materialize(cfg, seed=1).items()}
    toks = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    return cfg, W, toks


@pytest.mark.parametrize("layout,N,dtype", CASES, ids=[f"{lay}-N{N}-{d}" for lay, N, d in CASES])
def test_sharded_matches_reference_on_cuda(model, layout, N, dtype):
    from test_sharded import split
    cfg, W, toks = model
    dt = getattr(torch, dtype)
    ref = forward(cfg, W, toks, dtype=dt, device="cuda")
    plan = Plan(layout, cfg, N, {k: v.dtype for k, v in W.items()})
    out = sharded_forward(plan, split(plan, W), toks, dtype=dt, device="cuda")
    assert out.device.type == "cuda" and out.dtype == torch.float32
    rep = ParityReport(dtype, "cuda")
    compare(ref, out, rep, TOLERANCES[dtype])
    print(f"cuda {layout} N={N} {dtype}: max abs {rep.max_abs_diff:.3g} rel {rep.max_rel_diff:.3g} "
          f"rms {rep.rms_rel_diff:.3g} top-1 {rep.top1_agreement:.3f}")
    assert rep.ok, rep.problems
    if dtype == "float32":  # the GPU computes the CPU's model
        cpu = forward(cfg, W, toks)
        assert (ref.cpu() - cpu).abs().max() <= 1e-4 * max(1.0, cpu.abs().max().item())


@pytest.mark.parametrize("layout", ["base", "sparse"])
def test_verify_forward_on_cuda(wide_src, tmp_path, capsys, layout):
    d = tmp_path / "out"
    assert cli("split" if layout == "base" else "split-sparse", wide_src, "-n", 2, "-o", d, "-q")[0] == 0
    for dtype in ("float32", "bfloat16"):
        code, out, _ = cli("verify", d, "--source", wide_src, "--forward", "--json", "--device", "cuda",
                           "--dtype", dtype, capsys=capsys)
        f = json.loads(out)["forward"]
        assert code == 0 and f["ok"] and f["device"] == "cuda", f


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_distributed_nccl(wide_src, tmp_path, capsys):
    d = tmp_path / "out"
    assert cli("split", wide_src, "-n", 2, "-o", d, "-q")[0] == 0
    t = tmp_path / "t.pt"
    torch.save(torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0)), t)
    code, out, err = cli("forward", d, "--tokens-file", t, "-o", tmp_path / "one.pt", "--device", "cuda", capsys=capsys)
    assert code == 0, err
    code, out, err = cli("forward", d, "--tokens-file", t, "-o", tmp_path / "dist.pt", "--device", "cuda",
                         "--distributed", capsys=capsys)
    assert code == 0 and "(nccl)" in out, err
    one, dist = load(tmp_path / "one.pt"), load(tmp_path / "dist.pt")
    assert (one - dist).abs().max() <= 1e-5 * max(1.0, one.abs().max().item())
