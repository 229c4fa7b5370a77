#!/usr/bin/env python3
"""verify --forward parity figures (fp32 and bf16) for both layouts at N = 1, 2, 4, 8 on the
8-expert tiny fixture; prints a Markdown table.

    .venv/bin/python bench/parity_table.py
"""
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

from mixtral_convert.synth import tiny_config, write_torrent

T = pathlib.Path(tempfile.mkdtemp(prefix="par-"))
WIDE = dict(dim=64, hidden_dim=48, n_heads=16, n_kv_heads=8, head_dim=4, num_experts=8, vocab_size=128, n_layers=2)
src = write_torrent(T / "src", tiny_config(**WIDE), seed=1)
print("| layout | N | dtype | max abs | max rel | rms rel | top-1 | exit |\n|---|---|---|---|---|---|---|---|")
for cmd, layout in (("split", "base"), ("split-sparse", "sparse")):
    for N in (1, 2, 4, 8):
        out = T / f"{layout}{N}"
        subprocess.run([sys.executable, "-m", "mixtral_convert", cmd, str(src), "-n", str(N), "-o", str(out), "-q"],
                       check=True)
        for dt in ("float32", "bfloat16"):
            p = subprocess.run([sys.executable, "-m", "mixtral_convert", "verify", str(out), "--source", str(src),
                                "--forward", "--json", "--dtype", dt], capture_output=True, text=True)
            f = json.loads(p.stdout)["forward"]
            figures = " | ".join(f"{f[k]:.2e}" for k in ("max_abs_diff", "max_rel_diff", "rms_rel_diff"))
            print(f"| {layout} | {N} | {dt} | {figures} | {f['top1_agreement']:.3f} | {p.returncode} |")
shutil.rmtree(T, ignore_errors=True)
