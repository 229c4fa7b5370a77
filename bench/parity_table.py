#!/usr/bin/env python3
"""verify --forward parity figures (fp32 and bf16) for both layouts at N = 1, 2, 4, 8 on the
8-expert tiny fixture; prints a Markdown table.

    .venv/bin/python bench/parity_table.py
"""
import json, shutil, subprocess, sys, tempfile, pathlib
from mixtral_convert.synth import tiny_config, write_torrent
T = pathlib.Path(tempfile.mkdtemp(prefix="par-"))
WIDE = dict(dim=64, hidden_dim=48, n_heads=16, n_kv_heads=8, head_dim=4, num_experts=8, vocab_size=128, n_layers=2)
src = write_torrent(T / "src", tiny_config(**WIDE), seed=1)
print("| layout | N | dtype | max abs | max rel | rms rel | top-1 | exit |\n|---|---|---|---|---|---|---|---|")
for cmd, layout in (("split", "base"), ("split-sparse", "sparse")):
    for N in (1, 2, 4, 8):
        out = T / f"{layout}{N}"
        subprocess.run([sys.executable, "-m", "mixtral_convert", cmd, str(src), "-n", str(N), "-o", str(out), "-q"], check=True)
        for dt in ("float32", "bfloat16"):
            p = subprocess.run([sys.executable, "-m", "mixtral_convert", "verify", str(out), "--source", str(src), "--forward", "--json", "--dtype", dt], capture_output=True, text=True)
            f = json.loads(p.stdout)["forward"]
            print(f"| {layout} | {N} | {dt} | {f.get('max_abs_diff', f.get('max_abs')):.2e} | {f.get('max_rel_diff', f.get('max_rel')):.2e} | {f.get('rms_rel_diff', f.get('rms_rel')):.2e} | {f.get('top1_agreement', f.get('top1')):.3f} | {p.returncode} |")
shutil.rmtree(T, ignore_errors=True)
