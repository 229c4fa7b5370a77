#!/usr/bin/env python3
"""GPU parity in one command, with nothing to install beyond torch, click and sentencepiece (no pytest,
no gguf package, no isal): the checks of tests/forward/test_gpu.py and verify --forward on a full-width
layer, printed as a table and written as JSON.

    python3 bench/gpu_parity.py [--out DIR] [--skip-full-width]

1. The sharded forward against the reference forward on CUDA, for both layouts, N in 1, 2, 4, 8,
   in float32 and bfloat16, on the tests' wide model (tests/helpers.py WIDE: 16 heads / 8 KV, 8
   experts), the shards assembled through the partition table as split writes them; judged by
   forward.parity's tolerances (docs/parity.md). In float32 the GPU's reference is also compared
   with the CPU's.
2. A one-layer checkpoint of Mixtral-8x7B's full width (dim 4096, FFN 14336, 8 experts, 32 heads / 8
   KV, vocabulary 32000; 3.4 GB in bfloat16, random), `split -n 8` and `split-sparse -n 8`, then
   `verify OUT --source SRC --forward --device cuda` in float32 and bfloat16, through the CLI.

Exit status 0 when every check is within its tolerance, 1 when one is not, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from mixtral_convert.forward.parity import TOLERANCES, ParityReport, compare  # noqa: E402
from mixtral_convert.forward.reference import forward  # noqa: E402
from mixtral_convert.forward.sharded import shard_tensors, sharded_forward  # noqa: E402
from mixtral_convert.model.layouts import Plan  # noqa: E402
from mixtral_convert.synth import materialize, tiny_config, write_torrent  # noqa: E402

WIDE = dict(dim=64, hidden_dim=48, n_heads=16, n_kv_heads=8, head_dim=4, num_experts=8, vocab_size=128, n_layers=2)
FULL_WIDTH = dict(dim=4096, hidden_dim=14336, n_heads=32, n_kv_heads=8, head_dim=128, vocab_size=32000,
                  num_experts=8, experts_per_tok=2, n_layers=1)


def sharded_cases(device: str = "cuda") -> list[dict]:
    cfg = tiny_config(**WIDE)
    W = {k: v.to(torch.bfloat16) for k, v in materialize(cfg, seed=1).items()}
    toks = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    rows = []
    for dtype in ("float32", "bfloat16"):
        dt = getattr(torch, dtype)
        ref = forward(cfg, W, toks, dtype=dt, device=device)
        cpu_gap = None
        if dtype == "float32" and device != "cpu":  # the GPU computes the CPU's model
            cpu = forward(cfg, W, toks)
            cpu_gap = (ref.cpu() - cpu).abs().max().item() / max(1.0, cpu.abs().max().item())
        for layout in ("base", "sparse"):
            for N in (1, 2, 4, 8):
                plan = Plan(layout, cfg, N, {k: v.dtype for k, v in W.items()})
                out = sharded_forward(plan, shard_tensors(plan, W), toks, dtype=dt, device=device)
                rep = ParityReport(dtype, device)
                compare(ref, out, rep, TOLERANCES[dtype])
                ok = rep.ok and out.device.type == torch.device(device).type and (cpu_gap is None or cpu_gap <= 1e-4)
                rows.append(dict(check="sharded vs reference", layout=layout, N=N, dtype=dtype, ok=ok,
                                 max_abs=rep.max_abs_diff, max_rel=rep.max_rel_diff, rms_rel=rep.rms_rel_diff,
                                 top1=rep.top1_agreement, gpu_vs_cpu_rel=cpu_gap, problems=rep.problems))
    return rows


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixtral_convert", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def full_width_cases(work: Path, device: str = "cuda") -> list[dict]:
    src = work / "src"
    t0 = time.perf_counter()
    write_torrent(src, tiny_config(**FULL_WIDTH), seed=0, dtype=torch.bfloat16)
    print(f"wrote a one-layer full-width checkpoint in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for cmd, layout in (("split", "base"), ("split-sparse", "sparse")):
        out = work / layout
        r = cli(cmd, src, "-n", 8, "-o", out, "-q")
        if r.returncode != 0:
            rows.append(dict(check="verify --forward", layout=layout, N=8, ok=False, problems=[r.stderr[-2000:]]))
            continue
        for dtype in ("float32", "bfloat16"):
            t0 = time.perf_counter()
            r = cli("verify", out, "--source", src, "--forward", "--json", "--device", device, "--dtype", dtype)
            try:
                f = json.loads(r.stdout)["forward"]
            except (ValueError, KeyError):
                rows.append(dict(check="verify --forward", layout=layout, N=8, dtype=dtype, ok=False,
                                 problems=[(r.stdout + r.stderr)[-2000:]]))
                continue
            rows.append(dict(check="verify --forward (full width, 1 layer)", layout=layout, N=8, dtype=dtype,
                             ok=r.returncode == 0 and f["ok"] and f["device"].split(":")[0] == device.split(":")[0],
                             max_abs=f.get("max_abs_diff"), max_rel=f.get("max_rel_diff"),
                             rms_rel=f.get("rms_rel_diff"), top1=f.get("top1_agreement"),
                             seconds=round(time.perf_counter() - t0, 1), problems=f.get("problems", [])))
        subprocess.run(["rm", "-rf", str(out)])
    return rows


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="where to write gpu-parity.json (default: print only)")
    ap.add_argument("--skip-full-width", action="store_true", help="only the small model's cases")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory for the full-width checkpoint")
    ap.add_argument("--device", default="cuda", help="cuda (cuda:K); cpu runs the same checks, for the tests")
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    cuda = a.device.startswith("cuda")
    info = dict(device=torch.cuda.get_device_name(0) if cuda else "cpu", torch=torch.__version__,
                cuda=torch.version.cuda, gpus=torch.cuda.device_count() if cuda else 0)
    rows = sharded_cases(a.device)
    if not a.skip_full_width:
        with tempfile.TemporaryDirectory(dir=a.work) as d:
            rows += full_width_cases(Path(d), a.device)
    print(f"{info['device']}, torch {info['torch']}, CUDA {info['cuda']}, {info['gpus']} GPU(s)")
    print(f"{'check':<40} {'layout':<7} {'N':>2} {'dtype':<9} {'max abs':>9} {'max rel':>9} {'rms rel':>9} "
          f"{'top-1':>6} ok")
    for r in rows:
        print(f"{r['check']:<40} {r['layout']:<7} {r['N']:>2} {r.get('dtype', '-'):<9} {fmt(r.get('max_abs')):>9} "
              f"{fmt(r.get('max_rel')):>9} {fmt(r.get('rms_rel')):>9} {fmt(r.get('top1')):>6} "
              f"{'ok' if r['ok'] else 'FAIL ' + '; '.join(map(str, r['problems']))[:300]}")
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "gpu-parity.json").write_text(json.dumps(dict(info, rows=rows), indent=2) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
