#!/usr/bin/env python3
"""verify --forward parity figures (fp32 and bf16) for both layouts at N = 1, 2, 4, 8; prints a
Markdown table.

    .venv/bin/python bench/parity_table.py              # the 8-expert random tiny fixture, default tokens
    .venv/bin/python bench/parity_table.py --trained    # fixtures/trained, over held-out text
                                                        # (16 rows of 128 tokens; needs the corpus)
    .venv/bin/python bench/parity_table.py --trained --n 8   # only N = 8
With --trained, two more rows per layout and N: shards written in bf16 (`--dtype bfloat16`)
judged against the fp32 source, computed in fp32 and in bf16.
"""
import json
import pathlib
import subprocess
import sys
import tempfile

import torch

from mixtral_convert.synth import tiny_config, write_torrent

ROOT = pathlib.Path(__file__).resolve().parents[1]
T = pathlib.Path(tempfile.mkdtemp(prefix="par-"))
WIDE = dict(dim=64, hidden_dim=48, n_heads=16, n_kv_heads=8, head_dim=4, num_experts=8, vocab_size=128, n_layers=2)
trained = "--trained" in sys.argv
SIZES = [int(sys.argv[sys.argv.index("--n") + 1])] if "--n" in sys.argv else [1, 2, 4, 8]
tokens = []
if trained:
    sys.path.insert(0, str(ROOT / "fixtures" / "trained"))
    from measure import held_out_tokens
    src = ROOT / "fixtures" / "trained"
    torch.save(held_out_tokens(src / "tokenizer.model", 16)[:, :-1].contiguous(), T / "heldout.pt")
    tokens = ["--tokens-file", str(T / "heldout.pt")]
else:
    src = write_torrent(T / "src", tiny_config(**WIDE), seed=1)


def tool(*args):
    return subprocess.run([sys.executable, "-m", "mixtral_convert", *map(str, args)], capture_output=True, text=True)


print("| layout | N | shards | compute | max abs | max rel | rms rel | top-1 | exit |\n"
      "|---|---|---|---|---|---|---|---|---|")
for cmd, layout in (("split", "base"), ("split-sparse", "sparse")):
    for N in SIZES:
        for stored in ("source", "bfloat16") if trained else ("source",):
            out = T / f"{layout}{N}{stored}"
            cast = ["--dtype", stored] if stored != "source" else []
            assert tool(cmd, src, "-n", N, "-o", out, "-q", *cast).returncode == 0
            for dt in ("float32", "bfloat16"):
                p = tool("verify", out, "--source", src, "--forward", "--json", "--dtype", dt, *tokens)
                f = json.loads(p.stdout)["forward"]
                figures = " | ".join(f"{f[k]:.2e}" for k in ("max_abs_diff", "max_rel_diff", "rms_rel_diff"))
                print(f"| {layout} | {N} | {stored} | {dt} | {figures} | {f['top1_agreement']:.4f} | {p.returncode} |",
                      flush=True)
