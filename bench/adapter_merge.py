#!/usr/bin/env python3
"""An HF PEFT adapter merged as the base streams (docs/performance.md, "Adapter merges"): wall time against
`cp` of the base, and peak anonymous memory, at two depths to show whether memory is flat in model size.
`make bench`'s `adapter` step uses this file's `write_adapter` and times the same merge against cat + sync and the
direct copy as well (bench/bench.py); this script is the quick look without the references.

Generates a bf16 torrent checkpoint of the given width (default: Mixtral-8x7B's D 4096, H 14336, E 8, V 32000) at
each of --layers depths, and a hub-layout adapter of rank --rank on every linear (q/k/v/o_proj, the router, every
expert's w1/w2/w3) plus a full-vocabulary lm_head in modules_to_save (float32, streamed), then times, after
`cp -r SRC DST && sync`, `merge SRC --adapter A -o OUT` (the torrent layout). Peak anonymous RSS is sampled from
/proc every 10 ms (bench/bench.py's `measure`).

    python bench/adapter_merge.py [--layers 1 2] [--dim 4096 --hidden 14336 --vocab 32000] [--rank 16] [--dir D]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import torch  # noqa: E402

from bench import measure  # noqa: E402
from mixtral_convert.synth import tiny_config, write_torrent  # noqa: E402

MiB = 1 << 20


def write_adapter(out: Path, cfg, rank: int) -> Path:
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    sd, P = {}, "base_model.model.model.layers."
    D, H, E, q, kv = cfg.dim, cfg.hidden_dim, cfg.num_experts, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim

    def pair(mod, o, i):
        sd[f"{mod}.lora_A.weight"] = torch.randn(rank, i, generator=g) * 0.01
        sd[f"{mod}.lora_B.weight"] = torch.randn(o, rank, generator=g) * 0.01

    for L in range(cfg.n_layers):
        for name, o, i in (("q_proj", q, D), ("k_proj", kv, D), ("v_proj", kv, D), ("o_proj", D, q)):
            pair(f"{P}{L}.self_attn.{name}", o, i)
        pair(f"{P}{L}.block_sparse_moe.gate", E, D)
        for e in range(E):
            for w, o, i in (("w1", H, D), ("w2", D, H), ("w3", H, D)):
                pair(f"{P}{L}.block_sparse_moe.experts.{e}.{w}", o, i)
    sd["base_model.model.lm_head.weight"] = torch.randn(cfg.vocab_size, D, generator=g) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=rank, lora_alpha=2 * rank, lora_dropout=0.05, bias="none", modules_to_save=["lm_head"],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate", "w1", "w2", "w3"])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=14336)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="adapter-bench-", dir=a.dir))
    try:
        for n in a.layers:
            cfg = tiny_config(dim=a.dim, hidden_dim=a.hidden, vocab_size=a.vocab, n_layers=n, n_heads=32,
                              n_kv_heads=8, head_dim=a.dim // 32, num_experts=8, experts_per_tok=2)
            src = write_torrent(base / f"src{n}", cfg, seed=1, dtype=torch.bfloat16)
            ad = write_adapter(base / f"ad{n}", cfg, a.rank)
            cp = measure(["sh", "-c", f"cp -r {src} {base / 'cp'} && sync"])
            shutil.rmtree(base / "cp")
            py = [sys.executable, "-m", "mixtral_convert"]
            tool = measure(py + ["merge", str(src), "--adapter", str(ad), "-o", str(base / "out"), "-q"])
            shutil.rmtree(base / "out")
            size = (src / "consolidated.00.pth").stat().st_size
            print(json.dumps({"layers": n, "base_bytes": size, "adapter_bytes": (ad / "adapter_model.safetensors")
                              .stat().st_size, "cp_s": round(cp["wall_s"], 2), "merge_s": round(tool["wall_s"], 2),
                              "ratio": round(tool["wall_s"] / cp["wall_s"], 2), "merge_cpu_s": round(tool["cpu_s"], 1),
                              "peak_anon_mib": round(tool["peak_anon_bytes"] / MiB)}), flush=True)
            shutil.rmtree(src)
            shutil.rmtree(ad)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
